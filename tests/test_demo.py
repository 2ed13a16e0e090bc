"""End-to-end smoke run of demo.sh: data set, stage 1 (meanP), stage 2 (the head, from stage 1), evaluation,
order-dependent evaluation, table; then a second head that reuses stage 1.

Tiny settings (16 train and 8 test videos, 1 + 2 epochs, 2 frames): it checks that the path runs and writes sane
files, not that the model learns (the full demo's figures are in the README).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
METRIC_LINE = re.compile(r">>>  R@1: ([\d.]+) - R@5: ([\d.]+) - R@10: ([\d.]+) - Median R: ([\d.]+) - Mean R: ([\d.]+)")


def check_metrics(record: dict, num_videos: int) -> None:
    """Percentages in [0, 100], ranks in [1, num_videos], all finite, R@1 <= R@5 <= R@10."""
    for side in ("text_to_video", "video_to_text"):
        m = record[side]
        assert all(math.isfinite(v) for v in m.values()), m
        assert 0 <= m["R1"] <= m["R5"] <= m["R10"] <= 100, m
        assert 1 <= m["MR"] <= num_videos and 1 <= m["MeanR"] <= num_videos, m


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        INSTALL="0",
        OUT=str(out),
        PRETRAIN_EPOCHS="1",
        EPOCHS="2",
        NUM_TRAIN="16",
        NUM_TEST="8",
        SIM_HEADER="seqTransf",
    )
    # --output_dir among the extra arguments moves the run; the order evaluation must follow it.
    result = subprocess.run(
        [
            "bash",
            str(REPO / "demo.sh"),
            "--max_frames",
            "2",
            "--batch_size",
            "8",
            "--n_display",
            "1",
            "--output_dir",
            str(out / "my_run"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout, result.stdout + result.stderr


def test_stage_two_starts_from_stage_one(demo_run):
    out, stdout, _ = demo_run
    pre = out / "pretrain_seed0_train16_test8_epochs1"
    state = torch.load(pre / "pytorch_model.bin.0", map_location="cpu", weights_only=True)
    assert "clip.logit_scale" in state and not any(k.startswith("transformerClip.") for k in state)  # meanP
    assert not list(pre.glob("pytorch_opt.bin.*"))
    assert json.loads((pre / "metrics_epoch0.json").read_text())["sim_header"] == "meanP"
    assert f"init_model: {pre / 'pytorch_model.bin.0'}" in (out / "my_run" / "log.txt").read_text()
    assert "== stage 1: training" in stdout

    # A second run (meanP with UniPT) reuses stage 1 instead of training it again.
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        INSTALL="0",
        OUT=str(out),
        PRETRAIN_EPOCHS="1",
        EPOCHS="1",
        NUM_TRAIN="16",
        NUM_TEST="8",
        TUNING="unipt",
    )
    before = (pre / "pytorch_model.bin.0").stat().st_mtime_ns
    result = subprocess.run(
        ["bash", str(REPO / "demo.sh"), "--max_frames", "2", "--batch_size", "8"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"== stage 1: reusing {pre / 'pytorch_model.bin.0'}" in result.stdout
    assert (pre / "pytorch_model.bin.0").stat().st_mtime_ns == before
    run = out / "run_meanP_unipt"
    assert json.loads((run / "metrics_epoch0.json").read_text())["sim_header"] == "meanP"
    state = torch.load(run / "pytorch_model.bin.0", map_location="cpu", weights_only=True)
    assert "text_adapter.gate_layer.weight" in state and "image_adapter.gate_layer.weight" in state
    # The frozen CLIP is the stage-1 one, unchanged.
    stage1 = torch.load(pre / "pytorch_model.bin.0", map_location="cpu", weights_only=True)
    assert torch.equal(state["clip.visual.proj"], stage1["clip.visual.proj"])
    assert (run / "order" / "metrics_eval.json").is_file()


def test_demo_writes_checkpoint_and_metrics(demo_run):
    out, _, _ = demo_run
    run = out / "my_run"
    assert not (out / "run_seqTransf").exists()
    state = torch.load(run / "pytorch_model.bin.1", map_location="cpu", weights_only=True)
    assert "clip.logit_scale" in state and "transformerClip.resblocks.0.attn.in_proj_weight" in state
    assert (run / "pytorch_opt.bin.1").is_file()
    # Only the last epoch's checkpoint is kept.
    assert not (run / "pytorch_model.bin.0").exists() and not (run / "pytorch_opt.bin.0").exists()

    for epoch in (0, 1):
        test_record = json.loads((run / f"metrics_epoch{epoch}.json").read_text())
        assert (test_record["sim_header"], test_record["num_texts"], test_record["num_videos"]) == ("seqTransf", 8, 8)
        check_metrics(test_record, 8)

    order_record = json.loads((run / "order" / "metrics_eval.json").read_text())
    meta = json.loads(next(out.glob("data_*/synthetic_meta.json")).read_text())
    twins = sum(1 for v in meta["videos"].values() if v["split"] == "test" and v["twin"] is not None)
    assert twins >= 2 and order_record["num_videos"] == twins
    assert order_record["model_file"] == str(run / "pytorch_model.bin.1")
    check_metrics(order_record, twins)


def test_demo_prints_metric_lines_and_table(demo_run):
    out, stdout, log = demo_run
    lines = [tuple(map(float, m.groups())) for m in METRIC_LINE.finditer(log)]
    assert len(lines) == 1 + 2  # one per training epoch (stage 1, stage 2); the order evaluation logs to its own file
    for epoch, line in enumerate(lines):
        run = out / ("pretrain_seed0_train16_test8_epochs1" if epoch == 0 else "my_run")
        record = json.loads((run / f"metrics_epoch{max(epoch - 1, 0)}.json").read_text())["text_to_video"]
        assert line == pytest.approx(tuple(round(record[k], 1) for k in ("R1", "R5", "R10", "MR", "MeanR")))
    assert "Epoch: 2/2, Step: 2/2" in log  # 16 videos in batches of 8, logged every step

    table = stdout[stdout.index("== CLIP4Clip seqTransf") :].splitlines()
    assert table[1].startswith("| split") and len(table) == 5
    order_row = [c.strip() for c in table[4].split("|")[1:-1]]
    order_record = json.loads((out / "my_run" / "order" / "metrics_eval.json").read_text())
    assert order_row[0] == "test, order-dependent only" and int(order_row[1]) == order_record["num_videos"]
    assert float(order_row[3]) == pytest.approx(order_record["text_to_video"]["R1"], abs=0.05)


def test_demo_leaves_a_ready_evaluation_command(demo_run):
    """``bash <run>/eval.sh`` evaluates the last checkpoint again (same numbers) and writes the report."""
    out, stdout, _ = demo_run
    run = out / "my_run"
    assert f"bash {run}/eval.sh" in stdout
    done = subprocess.run(["bash", str(run / "eval.sh")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    again = json.loads((run / "eval" / "metrics_eval.json").read_text())
    last = json.loads((run / "metrics_epoch1.json").read_text())
    assert again["text_to_video"] == pytest.approx(last["text_to_video"])
    assert (run / "eval" / "eval_report.html").stat().st_size > 1000
