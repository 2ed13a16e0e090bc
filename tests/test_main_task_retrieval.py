"""The driver end to end on a tiny CLIP and a few synthetic videos: train, evaluate, resume, two processes, errors.

Runs go through subprocesses (the real command line, a fresh process group each); one tiny data set and one tiny
CLIP file are shared by the module.
"""

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_clip_state_dict

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "main_task_retrieval.py")

import engine.checkpoint  # noqa: E402
import engine.config  # noqa: E402
import engine.evaluate  # noqa: E402
import engine.train  # noqa: E402
import main_task_retrieval as mtr  # noqa: E402
import util  # noqa: E402
from engine.config import build_config  # noqa: E402
from engine.context import RunContext, start_run, wrap_ddp  # noqa: E402
from engine.flags import parse_flags  # noqa: E402
from engine.model import init_model  # noqa: E402
from modules.modeling import CLIP4Clip, CLIP4ClipConfig  # noqa: E402
from modules.tokenization_clip import SimpleTokenizer as ClipTokenizer  # noqa: E402


def _env():
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from preprocess.make_synthetic_dataset import make_dataset

    root = tmp_path_factory.mktemp("driver")
    paths = make_dataset(root / "data", seed=0, num_train=8, num_val=2, num_test=6, size=32, fps=2, seconds=2)
    clip = root / "tiny-clip.pt"
    torch.save(make_clip_state_dict(), clip)
    return root, paths, clip


def _common(clip, out):
    return [
        "--output_dir",
        str(out),
        "--pretrained_clip_name",
        str(clip),
        "--max_words",
        "8",
        "--max_frames",
        "2",
        "--batch_size",
        "4",
        "--batch_size_val",
        "4",
        "--num_thread_reader",
        "0",
        "--n_display",
        "1",
        "--lr",
        "1e-4",
        "--coef_lr",
        "1",
        "--loose_type",
        "--seed",
        "0",
        "--slice_framepos",
        "2",
    ]


def msvd_args(paths, clip, out, *extra):
    return [
        "--datatype",
        "msvd",
        "--data_path",
        str(paths["msvd_data_path"]),
        "--features_path",
        str(paths["msvd_features_path"]),
        *_common(clip, out),
        *extra,
    ]


def msrvtt_args(paths, clip, out, *extra):
    return [
        "--datatype",
        "msrvtt",
        "--train_csv",
        str(paths["msrvtt_train_csv"]),
        "--val_csv",
        str(paths["msrvtt_val_csv"]),
        "--data_path",
        str(paths["msrvtt_data_path"]),
        "--features_path",
        str(paths["msrvtt_features_path"]),
        "--expand_msrvtt_sentences",
        *_common(clip, out),
        *extra,
    ]


def run_cli(args, nproc=0, timeout=240, ok=True):
    """python main_task_retrieval.py ... (nproc 0) or torchrun --nproc_per_node=nproc ...; ``ok``: must succeed."""
    cmd = [sys.executable, SCRIPT, *args]
    if nproc:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(_free_port()),
            SCRIPT,
            *args,
        ]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert (proc.returncode == 0) == ok, proc.stderr[-3000:]
    return proc


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_losses(log_text):
    return [float(x) for x in re.findall(r"Epoch: 1/\d+, Step: \d+/\d+, Lr: [0-9.\-]+, Loss: ([0-9.]+)", log_text)]


def read_metrics(path):
    return json.loads(Path(path).read_text())


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------- pure pieces


def _tiny_model(header, clip_file):
    config = CLIP4ClipConfig(
        pretrained_clip_name=str(clip_file),
        sim_header=header,
        cross_num_hidden_layers=2,
        max_words=8,
        max_frames=4,
        precision="fp32",
    )
    torch.manual_seed(0)
    return CLIP4Clip.from_config(config).eval()


@pytest.mark.parametrize("header", ["meanP", "seqLSTM", "seqTransf", "tightTransf"])
def test_blocked_similarity_equals_original_per_batch_pairs(header, setup, monkeypatch):
    model = _tiny_model(header, setup[2])
    gen = torch.Generator().manual_seed(1)
    n_text, n_video, frames = 11, 9, 4
    seq = torch.randn(n_text, 1, 512, generator=gen)
    text_mask = torch.ones(n_text, 8, dtype=torch.long)
    vis = torch.randn(n_video, frames, 512, generator=gen)
    video_mask = (torch.arange(frames) < torch.randint(1, frames + 1, (n_video, 1), generator=gen)).long()
    # Small blocks so several of them are stitched together.
    monkeypatch.setattr(engine.evaluate, "SIM_BLOCK_ELEMENTS", 40)
    monkeypatch.setattr(engine.evaluate, "TIGHT_PAIRS_PER_BLOCK", 8)
    monkeypatch.setattr(engine.evaluate, "TIGHT_VIDEOS_PER_BLOCK", 4)
    with torch.no_grad():
        ours = engine.evaluate.similarity_columns(model, seq, text_mask, vis, video_mask, torch.device("cpu"))
        # The original: batches of 3 texts × batches of 3 videos, the head re-applied for every pair of batches.
        rows = []
        for t0 in range(0, n_text, 3):
            row = [
                model.get_similarity_logits(
                    seq[t0 : t0 + 3],
                    vis[v0 : v0 + 3],
                    text_mask[t0 : t0 + 3],
                    video_mask[v0 : v0 + 3],
                    loose_type=model.loose_type,
                )[0]
                for v0 in range(0, n_video, 3)
            ]
            rows.append(torch.cat(row, dim=1))
        original = torch.cat(rows)
    assert ours.shape == (n_text, n_video)
    assert torch.allclose(ours, original, rtol=1e-5, atol=1e-5)


def test_optimizer_groups_follow_spec(setup):
    model = _tiny_model("seqTransf", setup[2])
    args = argparse.Namespace(lr=1e-4, warmup_proportion=0.1)
    opt = mtr.prep_optimizer(args, model, 50.0, coef_lr=1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [{names[id(p)] for p in g["params"]} for g in opt.param_groups]
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(1e-7), 1e-4, pytest.approx(1e-7), 1e-4]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.2, 0.0, 0.0]
    assert {"clip.logit_scale", "clip.ln_final.weight", "clip.visual.proj"} <= groups[0]
    assert {"frame_position_embeddings.weight", "transformerClip.resblocks.0.ln_1.weight"} <= groups[1]
    assert "clip.ln_final.bias" in groups[2] and "transformerClip.resblocks.0.ln_1.bias" in groups[3]
    assert sum(len(g) for g in groups) == len(names)
    assert opt.defaults["t_total"] == 50.0 and opt.defaults["schedule"] == "warmup_cosine"
    assert (opt.defaults["b1"], opt.defaults["b2"], opt.defaults["e"]) == (0.9, 0.98, 1e-6)


# ----------------------------------------------------------------------------------------------- command line


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--no_such_flag"], "unrecognized arguments"),
        (["--do_train", "--sim_header", "meanP"], "needs --loose_type"),
        (["--do_train", "--gradient_accumulation_steps", "0"], "gradient_accumulation_steps"),
        ([], "At least one of `do_train` or `do_eval`"),
        (["--do_train", "--freeze_layer_num", "13"], "freeze_layer_num"),
        (["--do_train", "--sim_header", "meanP", "--loose_type", "--resume_model", "{clip}"], "--init_model"),
        (["--do_eval", "--sim_header", "meanP", "--loose_type", "--init_model", "missing.bin"], "--init_model"),
        (["--do_eval", "--loose_type", "--pretrained_clip_name", "ViT-X/99"], "--pretrained_clip_name"),
        (["--do_eval", "--loose_type", "--features_path", "/nonexistent/videos"], "--features_path"),
        (["--do_train", "--loose_type", "--lr", "0"], "--lr must be a positive finite number, got 0.0"),
        (["--do_train", "--loose_type", "--lr", "nan"], "--lr must be a positive finite number, got nan"),
        (["--do_train", "--loose_type", "--lr", "inf"], "--lr must be a positive finite number, got inf"),
        (["--do_train", "--loose_type", "--coef_lr", "-1"], "--coef_lr must be a positive finite number, got -1.0"),
        (["--do_train", "--loose_type", "--warmup_proportion", "1"], "--warmup_proportion must be in [0, 1), got 1.0"),
        (["--do_train", "--loose_type", "--warmup_proportion", "-0.1"], "--warmup_proportion must be in [0, 1)"),
        (
            ["--do_train", "--loose_type", "--warmup_proportion", "nan"],
            "--warmup_proportion must be in [0, 1), got nan",
        ),
        (["--do_train", "--loose_type", "--max_words", "2"], "--max_words must be >= 3"),
        (["--do_train", "--loose_type", "--dsl_temperature", "inf"], "--dsl_temperature must be a positive finite"),
        (["--do_train", "--loose_type", "--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
        (["--do_train", "--loose_type", "--max_words", "78"], "--max_words must be <= 77 (CLIP's text context"),
        (["--do_train", "--loose_type", "--output_dir", "{clip}/out"], "cannot write there (Not a directory)"),
    ],
)
def test_bad_flags_give_one_line(extra, message, setup, capsys, tmp_path):
    _, paths, clip = setup
    args = msvd_args(paths, clip, tmp_path / "out")
    args.remove("--loose_type")
    args += [e.format(clip=clip) for e in extra]
    assert mtr.main(args) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("main_task_retrieval.py: error:") and message in err, err


def test_bad_checkpoint_contents_give_one_line(setup, capsys, tmp_path):
    _, paths, clip = setup
    bad = tmp_path / "not-a-checkpoint.bin"
    bad.write_text("hello")
    assert mtr.main(["--do_eval", "--init_model", str(bad), *msvd_args(paths, clip, tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("main_task_retrieval.py: error: --init_model") and str(bad) in err


@pytest.mark.parametrize("flag, package", [("--eval_report", "matplotlib"), ("--tensorboard", "tensorboard")])
def test_missing_optional_package_is_named(flag, package, setup, capsys, tmp_path, monkeypatch):
    _, paths, clip = setup
    real = engine.config.importlib.util.find_spec
    monkeypatch.setattr(
        engine.config.importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a)
    )
    assert mtr.main(["--do_eval", flag, *msvd_args(paths, clip, tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"main_task_retrieval.py: error: {flag} needs the {package} package: pip install -r requirements-report.txt"
    )
    assert not (tmp_path / "out").exists()  # said before anything ran


# ----------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def run_a(setup):
    """Single process, MSVD (multi-sentence test), 2 epochs with an eval after each."""
    root, paths, clip = setup
    out = root / "run_a"
    run_cli(["--do_train", "--epochs", "2", "--eval_dsl", *msvd_args(paths, clip, out)])
    return out


@pytest.mark.cuda
def test_train_two_epochs_and_evaluate(run_a):
    names = {p.name for p in run_a.iterdir()}
    assert {
        "log.txt",
        "pytorch_model.bin.0",
        "pytorch_opt.bin.0",
        "pytorch_model.bin.1",
        "pytorch_opt.bin.1",
        "metrics_epoch0.json",
        "metrics_epoch1.json",
    } <= names
    assert not [n for n in names if ".tmp" in n]
    log = (run_a / "log.txt").read_text()
    for line in (
        "Effective parameters:",
        "***** Running training *****",
        "Epoch 1/2 Finished, Train Loss:",
        "Model saved to",
        "Optimizer saved to",
        "Eval under the multi-sentence per video clip setting.",
        "sentence num: 30, video num: 6",
        "before reshape, sim matrix size: 30 x 6",
        "after reshape, sim matrix size: 6 x 5 x 6",
        "Text-to-Video:",
        "Video-to-Text:",
        "V2T$R@1:",
        "The best model is:",
        "dual-softmax re-ranked",
        "DSL$R@1:",
    ):
        assert line in log, line
    assert re.search(r"Epoch: 1/2, Step: 2/10, Lr: 0\.000\d{6}, Loss: \d+\.\d{6}, Time/step: \d+\.\d{6}", log)
    m = read_metrics(run_a / "metrics_epoch1.json")
    assert (m["num_texts"], m["num_videos"]) == (30, 6)
    logged = re.findall(r"\t>>>  R@1: ([0-9.]+) - R@5: ([0-9.]+)", log)[-1]
    assert float(logged[0]) == pytest.approx(round(m["text_to_video"]["R1"], 1))
    opt = weights(run_a / "pytorch_opt.bin.1")
    assert opt["epoch"] == 1 and opt["global_step"] == 20 and len(opt["rng_states"]) == 1
    state = next(iter(opt["optimizer_state_dict"]["state"].values()))
    assert state["step"] == 20 and set(state) == {"step", "next_m", "next_v"}


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.cuda
def test_metrics_jsonl_equals_the_logged_values(run_a):
    records = read_jsonl(run_a / "metrics.jsonl")
    log = (run_a / "log.txt").read_text()
    logged = re.findall(r"Epoch: (\d+)/2, Step: (\d+)/10, Lr: ([0-9.\-]+), Loss: ([0-9.]+), Time/step: ([0-9.]+)", log)
    steps = [r for r in records if r["event"] == "step"]
    assert len(steps) == len(logged) == 20
    for r, (epoch, step, lrs, loss, per_step) in zip(steps, logged):
        assert (r["epoch"], r["step"]) == (int(epoch), int(step))
        assert r["global_step"] == (r["epoch"] - 1) * 10 + r["step"]  # n_display 1: every optimizer step
        assert "-".join("%.9f" % lr for lr in r["lr"]) == lrs
        assert "%f" % r["loss"] == loss and "%f" % r["time_per_step"] == per_step
    epochs = [r for r in records if r["event"] == "epoch"]
    train_losses = re.findall(r"Epoch (\d)/2 Finished, Train Loss: ([0-9.]+)", log)
    assert [(str(r["epoch"]), "%f" % r["train_loss"]) for r in epochs] == train_losses
    evals = [r for r in records if r["event"] == "eval"]
    assert [(r["tag"], r["global_step"]) for r in evals] == [("epoch0", 10), ("epoch1", 20)]
    for r in evals:
        saved = read_metrics(run_a / f"metrics_{r['tag']}.json")
        assert {k: r[k] for k in saved} == saved
    assert [e["event"] for e in records] == ["step"] * 10 + ["epoch", "eval"] + ["step"] * 10 + ["epoch", "eval"]


@pytest.mark.cuda
def test_interrupted_and_resumed_run_is_bit_identical(run_a, setup):
    root, paths, clip = setup
    out = root / "run_b"
    args = ["--do_train", "--epochs", "2", "--eval_dsl", *msvd_args(paths, clip, out)]
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, *args], cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 180
    while not (out / "pytorch_opt.bin.0").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.kill()  # killed right after epoch 0's checkpoint landed
    proc.wait()
    assert (out / "pytorch_opt.bin.0").exists()
    run_cli([*args, "--init_model", str(out / "pytorch_model.bin.0"), "--resume_model", str(out / "pytorch_opt.bin.0")])
    resumed, uninterrupted = weights(out / "pytorch_model.bin.1"), weights(run_a / "pytorch_model.bin.1")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    assert not torch.equal(weights(out / "pytorch_model.bin.0")["clip.visual.proj"], resumed["clip.visual.proj"])
    log = (out / "log.txt").read_text()
    assert "Resumed from" in log and "Epoch: 2/2, Step: 1/10" in log
    assert (
        read_metrics(out / "metrics_epoch1.json")["text_to_video"]
        == read_metrics(run_a / "metrics_epoch1.json")["text_to_video"]
    )


@pytest.mark.cuda
def test_eval_only_of_saved_checkpoint(run_a, setup):
    root, paths, clip = setup
    # In this process (no launcher): the checkpoint of epoch 1 scores what the training run logged for it.
    out = root / "eval_msvd"
    assert (
        mtr.main(["--do_eval", "--init_model", str(run_a / "pytorch_model.bin.1"), *msvd_args(paths, clip, out)]) == 0
    )
    ours, logged = read_metrics(out / "metrics_eval.json"), read_metrics(run_a / "metrics_epoch1.json")
    for side in ("text_to_video", "video_to_text"):
        assert ours[side] == pytest.approx(logged[side])
    # The same checkpoint on the single-sentence MSR-VTT test.
    out = root / "eval_msrvtt"
    assert (
        mtr.main(["--do_eval", "--init_model", str(run_a / "pytorch_model.bin.1"), *msrvtt_args(paths, clip, out)]) == 0
    )
    log = (out / "log.txt").read_text()
    assert "sim matrix size: 6, 6" in log and "\t Length-T: 6, Length-V:6" in log
    assert read_metrics(out / "metrics_eval.json")["num_texts"] == 6


def test_checkpoints_that_do_not_fit_give_one_line(run_a, setup, capsys, tmp_path):
    _, paths, clip = setup
    meanp = run_a / "pytorch_model.bin.1"
    resnet = tmp_path / "resnet.bin"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}, resnet)
    misshaped = tmp_path / "misshaped.bin"
    torch.save(dict(weights(meanp), **{"clip.visual.proj": torch.zeros(3, 512)}), misshaped)
    cases = [
        (
            ["--init_model", str(meanp), "--sim_header", "seqTransf"],
            f"--init_model {meanp} was trained with --linear_patch 2d --sim_header meanP",
        ),
        (["--init_model", str(resnet)], f"--init_model {resnet}: none of its 2 weights is one of this model's"),
        (["--init_model", str(misshaped)], "clip.visual.proj has shape (3, 512)"),
    ]
    for extra, message in cases:
        assert mtr.main(["--do_eval", *msvd_args(paths, clip, tmp_path / "out"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("main_task_retrieval.py: error:") and message in err, err
    # A meanP checkpoint holds no layer count: the message claims none, whatever the run used.
    extra = ["--init_model", str(meanp), "--sim_header", "seqTransf", "--cross_num_hidden_layers", "2"]
    assert mtr.main(["--do_eval", *msvd_args(paths, clip, tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert "trained with --linear_patch 2d --sim_header meanP" in err and "cross_num_hidden_layers" not in err, err


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_at_load_naming_the_file(bad, run_a, setup, capsys, tmp_path):
    _, paths, clip = setup
    damaged = tmp_path / "damaged.bin"
    state = weights(run_a / "pytorch_model.bin.1")
    state["clip.visual.proj"][0, 0] = bad
    torch.save(state, damaged)
    out = tmp_path / "out"
    assert mtr.main(["--do_eval", "--init_model", str(damaged), *msvd_args(paths, clip, out)]) == 2
    _one_line_error(capsys, f"--init_model {damaged}: weights hold NaN or Inf values (clip.visual.proj)")
    assert not (out / "metrics_eval.json").exists()


def test_an_error_while_training_keeps_its_traceback(setup, tmp_path):
    _, paths, clip = setup
    # A ValueError raised mid-run is a failure of the run, not a bad flag: traceback and exit 1, not one line and 2.
    code = (
        "import sys, engine.run, main_task_retrieval as m\n"
        "def broken(*args, **kwargs):\n    raise ValueError('video 3 became unreadable')\n"
        "engine.run.train_epoch = broken\nsys.exit(m.main(sys.argv[1:]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "--do_train", "--epochs", "1", *msvd_args(paths, clip, tmp_path / "out")],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback (most recent call last)" in proc.stderr and "in broken" in proc.stderr
    assert "ValueError: video 3 became unreadable" in proc.stderr


def test_eval_report_and_tensorboard(run_a, setup):
    pytest.importorskip("matplotlib", reason="--eval_report needs matplotlib: pip install -r requirements-report.txt")
    pytest.importorskip("tensorboard", reason="--tensorboard needs tensorboard: pip install -r requirements-report.txt")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, paths, clip = setup
    out = root / "eval_report"
    assert (
        mtr.main(
            [
                "--do_eval",
                "--eval_report",
                "--tensorboard",
                "--init_model",
                str(run_a / "pytorch_model.bin.1"),
                *msrvtt_args(paths, clip, out),
            ]
        )
        == 0
    )
    log, page = (out / "log.txt").read_text(), (out / "eval_report.html").read_text()
    logged = re.findall(
        r"\t>>>  (?:V2T\$)?R@1: ([0-9.]+) - (?:V2T\$)?R@5: ([0-9.]+) - (?:V2T\$)?R@10: ([0-9.]+) - "
        r"(?:V2T\$)?Median R: ([0-9.]+) - (?:V2T\$)?Mean R: ([0-9.]+)",
        log,
    )
    table = re.findall(r"<tr><td>([^<]+)</td>((?:<td>[^<]+</td>)+)</tr>", page)
    assert [name for name, _ in table] == ["Text-to-Video", "Video-to-Text"]
    assert [tuple(re.findall(r"<td>([^<]+)</td>", cells)) for _, cells in table] == logged
    assert page.count("data:image/png;base64,") == 1  # the rank plots; an evaluation-only run has no curves
    ranks = [int(r) for r in re.findall(r'data-rank="(\d+)"', page)]
    assert len(ranks) == 6 and ranks == sorted(ranks, reverse=True)  # every caption of 6, worst first
    assert page.count('class="video right"') == 6 and page.count("data:image/jpeg;base64,") >= 6

    record = read_metrics(out / "metrics_eval.json")
    assert read_jsonl(out / "metrics.jsonl")[-1]["text_to_video"] == record["text_to_video"]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for name, key in (("R1", "R1"), ("R5", "R5"), ("R10", "R10"), ("MdR", "MR"), ("MnR", "MeanR")):
        (scalar,) = events.Scalars(f"eval/t2v_{name}")
        assert scalar.step == 0 and scalar.value == pytest.approx(record["text_to_video"][key])
        (scalar,) = events.Scalars(f"eval/v2t_{name}")
        assert scalar.value == pytest.approx(record["video_to_text"][key])


def test_two_process_training_and_evaluation(run_a, setup):
    root, paths, clip = setup
    out = root / "run_2proc"
    # Global batch 4 = 2 per process; the DistributedSampler gives the two ranks' batches the samples of the
    # single process's batch, and every rank computes the loss of the gathered batch (as the original's AllGather).
    run_cli(["--do_train", "--epochs", "1", *msvd_args(paths, clip, out)], nproc=2)
    two = step_losses((out / "log.txt").read_text())
    one = step_losses((run_a / "log.txt").read_text())
    assert len(two) == 10
    # Step 1 has lr 0, so step 2 also starts from the same weights.
    assert two[:2] == pytest.approx(one[:2], abs=2e-6)
    # The two-process evaluation after the epoch equals a one-process evaluation of the saved checkpoint.
    single = root / "run_2proc_eval"
    assert (
        mtr.main(["--do_eval", "--init_model", str(out / "pytorch_model.bin.0"), *msvd_args(paths, clip, single)]) == 0
    )
    distributed, one_process = read_metrics(out / "metrics_epoch0.json"), read_metrics(single / "metrics_eval.json")
    assert (distributed["num_texts"], distributed["num_videos"]) == (30, 6)
    for side in ("text_to_video", "video_to_text"):
        assert distributed[side] == pytest.approx(one_process[side])


def first_step_grads(argv):
    """Loss and averaged gradients of the first training batch, set up exactly as the driver does."""
    from dataloaders.data_dataloaders import DATALOADER_DICT

    config = build_config(vars(parse_flags(argv)))
    context = start_run(config)
    model = init_model(config, context)
    per_process = config.optim.batch_size // context.dist.world_size
    loader, _, sampler = DATALOADER_DICT[config.data.datatype]["train"](
        config.data, config.train_sampling, ClipTokenizer(), per_process
    )
    sampler.set_epoch(0)
    ddp = wrap_ddp(model, context.dist)
    ddp.train()
    input_ids, input_mask, segment_ids, video, video_mask = next(iter(loader))
    loss = ddp(input_ids, segment_ids, input_mask, video, video_mask)
    loss.backward()
    return {"loss": loss.detach(), "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None}}


GRAD_WORKER = """
import sys, torch, util
from test_main_task_retrieval import first_step_grads
result = first_step_grads(sys.argv[2:])
if util.get_rank() == 0:
    torch.save(result, sys.argv[1])
util.cleanup_distributed()
"""


def test_two_processes_stop_together_when_process_0_cannot_save(setup):
    """Process 0 alone saves; when it cannot, process 1 stops too instead of waiting at the evaluation's first
    collective (the timeout below would catch a hang: gloo's own is 30 minutes)."""
    root, paths, clip = setup
    out = root / "run_2proc_nosave"
    (out / "pytorch_model.bin.0").mkdir(parents=True)  # the checkpoint's name taken by a folder: the save fails
    proc = run_cli(["--do_train", "--epochs", "1", *msvd_args(paths, clip, out)], nproc=2, timeout=180, ok=False)
    assert "main_task_retrieval.py: error: cannot save the checkpoint of epoch 0 to" in proc.stderr
    assert "main_task_retrieval.py: error: process 0 could not save the checkpoint of epoch 0; stopping" in proc.stderr
    assert not (out / "pytorch_opt.bin.0").exists() and (out / "pytorch_model.bin.0").is_dir()


def test_two_process_gradients_are_one_over_world_size(setup, tmp_path):
    root, paths, clip = setup
    worker = tmp_path / "grad_worker.py"
    worker.write_text(GRAD_WORKER)
    dump = tmp_path / "grads2.pt"
    args = ["--do_train", "--epochs", "1", *msvd_args(paths, clip, tmp_path / "out2")]
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            str(worker),
            str(dump),
            *args,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = torch.load(dump, weights_only=True)
    one = first_step_grads(["--do_train", "--epochs", "1", *msvd_args(paths, clip, tmp_path / "out1")])
    assert torch.allclose(one["loss"], two["loss"], atol=1e-6)
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 10
    # logit_scale is not gathered: every rank has the full gradient, and DDP's average keeps it.
    assert torch.allclose(two["grads"]["clip.logit_scale"], one["grads"]["clip.logit_scale"], rtol=1e-4)
    # Everything upstream of the all-gather gets its local slice only: 1/world_size after the average.
    for name, g1 in one["grads"].items():
        if name != "clip.logit_scale":
            assert (2 * two["grads"][name] - g1).norm() <= 1e-4 * g1.norm() + 1e-12, name


# ----------------------------------------------------------------------------------------------- failures mid-run


class _NaNAfterOneStep(torch.nn.Module):
    """A model whose loss is finite at the first step and NaN from the second on."""

    def __init__(self):
        super().__init__()
        self.clip = torch.nn.Module()
        self.clip.logit_scale = torch.nn.Parameter(torch.tensor(1.0))
        self.w = torch.nn.Parameter(torch.ones(2))
        self.calls = 0

    def forward(self, *batch):
        self.calls += 1
        return self.w.sum() * (1.0 if self.calls == 1 else float("nan"))


def test_nan_loss_stops_at_its_step_before_the_update(tmp_path):
    model = _NaNAfterOneStep()
    args = argparse.Namespace(
        n_display=100, gradient_accumulation_steps=1, epochs=1, precision="fp32", lr=0.1, warmup_proportion=0.0
    )
    optimizer = mtr.prep_optimizer(args, model, 10.0)
    batches = [tuple(torch.zeros(1, 1) for _ in range(5))] * 3
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    with pytest.raises(mtr.RunError, match=r"the training loss is nan at epoch 1, step 2 \(after 1 optimizer steps\)"):
        config = argparse.Namespace(optim=args)
        cpu = util.DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), initialized=False)
        engine.train.train_epoch(0, config, RunContext(cpu, "fp32"), model, batches, optimizer, scaler, 0)
    assert torch.isfinite(model.w).all() and model.calls == 2  # the NaN never reached the weights
    assert list(tmp_path.iterdir()) == []


def _tiny_optimizer():
    model = torch.nn.Linear(2, 2)
    args = argparse.Namespace(lr=1e-3, warmup_proportion=0.1)
    return model, mtr.prep_optimizer(args, model, 10.0)


def test_failed_save_leaves_neither_file_and_the_previous_pair_usable(tmp_path, monkeypatch):
    model, optimizer = _tiny_optimizer()
    args = argparse.Namespace(output_dir=str(tmp_path))
    mtr.save_model(0, args, model, optimizer, 1.0, {"global_step": 1})
    before = sorted(p.name for p in tmp_path.iterdir())
    real_save = torch.save

    def disk_full_at_the_second_file(obj, f):
        if "pytorch_opt" in str(f):
            raise OSError(28, "No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", disk_full_at_the_second_file)
    with pytest.raises(mtr.RunError, match=r"cannot save the checkpoint of epoch 1 to .* \(No space left on device\)"):
        mtr.save_model(1, args, model, optimizer, 1.0, {"global_step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == before == ["pytorch_model.bin.0", "pytorch_opt.bin.0"]
    assert weights(tmp_path / "pytorch_opt.bin.0")["global_step"] == 1
    assert torch.equal(weights(tmp_path / "pytorch_model.bin.0")["weight"], model.weight.detach())


def test_save_killed_midway_is_cleaned_up_by_the_next_run(tmp_path, caplog):
    # A process killed (SIGKILL, no clean-up of its own) while writing the pair leaves only temporary files.
    child = (
        f"import os, sys; sys.path.insert(0, {str(ROOT)!r}); import util\n"
        f"with util.atomic_path({str(tmp_path / 'pytorch_opt.bin.3')!r}) as o, "
        f"util.atomic_path({str(tmp_path / 'pytorch_model.bin.3')!r}) as m:\n"
        f"    m.write_bytes(b'model'); o.write_bytes(b'half'); os.kill(os.getpid(), 9)\n"
    )
    assert subprocess.run([sys.executable, "-c", child]).returncode == -9
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2 and all(n.startswith(".pytorch_") and ".tmp" in n for n in left)
    with caplog.at_level(logging.WARNING, logger="logger"):
        engine.checkpoint.remove_stale_temporaries(str(tmp_path))
    assert list(tmp_path.iterdir()) == []
    assert "removed 2 temporary file(s) of an interrupted save" in caplog.text


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip"])
def test_unreadable_clip_weights_give_one_line(content, setup, capsys, tmp_path):
    _, paths, _ = setup
    bad = tmp_path / "ViT-B-32.pt"
    bad.write_bytes(content)
    assert mtr.main(["--do_eval", *msvd_args(paths, bad, tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"main_task_retrieval.py: error: cannot read CLIP weights from {bad}")


# ----------------------------------------------------------------------------------------------- UniPT


def test_unipt_optimizer_groups_hold_only_the_adapters(setup):
    config = CLIP4ClipConfig(
        pretrained_clip_name=str(setup[2]),
        cross_num_hidden_layers=2,
        max_words=8,
        max_frames=4,
        precision="fp32",
        tuning="unipt",
    )
    torch.manual_seed(0)
    model = CLIP4Clip.from_config(config).train()
    opt = mtr.prep_optimizer(argparse.Namespace(lr=1e-3, warmup_proportion=0.1), model, 4.0, coef_lr=1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [{names[id(p)] for p in g["params"]} for g in opt.param_groups]
    adapters = {n for n in names.values() if n.startswith(("image_adapter.", "text_adapter."))}
    assert groups[0] == set() and groups[2] == set()
    assert groups[1] == {n for n in adapters if n.endswith(".weight")}
    assert groups[3] == {n for n in adapters if n.endswith(".bias")}
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.2, 0.0, 0.0]
    assert opt.param_groups[1]["lr"] == opt.param_groups[3]["lr"] == 1e-3

    # Two steps (the first has lr 0): only adapter tensors change, and no other tensor ever gets a gradient.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[[49406, 5, 6, 49407, 0, 0, 0, 0]], [[49406, 7, 49407, 0, 0, 0, 0, 0]]])
    video = torch.randn(2, 1, 4, 1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        loss = model(ids, torch.zeros_like(ids), (ids != 0).long(), video, torch.ones(2, 1, 4, dtype=torch.long))
        loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if n not in adapters)
        opt.step()
        opt.zero_grad(set_to_none=False)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    # The gate's bias shifts every layer's score alike and the softmax ignores that, so its gradient is zero up to
    # rounding: it may or may not move. Every other adapter tensor must.
    gate_biases = {"image_adapter.gate_layer.bias", "text_adapter.gate_layer.bias"}
    assert adapters - gate_biases <= changed <= adapters


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--do_eval", "--tuning", "full", "--init_model", "{unipt}"], "--tuning full: --init_model"),
        (["--do_eval", "--tuning", "unipt", "--init_model", "{full}"], "evaluating it with --tuning unipt"),
        (["--do_train", "--tuning", "unipt", "--sim_header", "tightTransf"], "cannot use sim_header tightTransf"),
        (["--do_eval", "--init_model", "{unipt}", "--sim_header", "tightTransf"], "cannot use sim_header tightTransf"),
    ],
)
def test_unipt_flag_and_checkpoint_mismatches_give_one_line(extra, message, setup, capsys, tmp_path):
    _, paths, clip = setup
    full = tmp_path / "full.bin"
    torch.save({"clip.logit_scale": torch.tensor(4.6)}, full)
    unipt = tmp_path / "unipt.bin"
    torch.save({"text_adapter.gate_layer.bias": torch.zeros(1)}, unipt)
    args = msvd_args(paths, clip, tmp_path / "out") + [e.format(unipt=unipt, full=full) for e in extra]
    assert mtr.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("main_task_retrieval.py: error:") and message in err, err


def test_unipt_train_resume_and_eval(setup):
    """Two epochs with --tuning unipt; a resume from epoch 0 (no flag: the checkpoint selects unipt) gives the same
    epoch-1 weights bit for bit; evaluating that checkpoint reproduces the logged metrics."""
    root, paths, clip = setup
    out = root / "unipt_a"
    run_cli(["--do_train", "--epochs", "2", "--tuning", "unipt", *msvd_args(paths, clip, out)])
    first, second = weights(out / "pytorch_model.bin.0"), weights(out / "pytorch_model.bin.1")
    clip_file = make_clip_state_dict()
    for key, value in second.items():
        if key.startswith("clip.") and key[5:] in clip_file:
            assert torch.equal(value, clip_file[key[5:]]), key  # CLIP stays as loaded
    assert not torch.equal(first["text_adapter.gate_layer.weight"], second["text_adapter.gate_layer.weight"])

    resumed = root / "unipt_b"
    proc = run_cli(
        [
            "--do_train",
            "--epochs",
            "2",
            *msvd_args(paths, clip, resumed),
            "--init_model",
            str(out / "pytorch_model.bin.0"),
            "--resume_model",
            str(out / "pytorch_opt.bin.0"),
        ]
    )
    log = (resumed / "log.txt").read_text()
    assert "holds UniPT adapters" in log and "Resumed from" in log, proc.stderr[-2000:]
    again = weights(resumed / "pytorch_model.bin.1")
    assert again.keys() == second.keys() and all(torch.equal(again[k], second[k]) for k in again)

    # Two processes: the adapters' gradients go through DDP and the all-gather as in full tuning.
    two_proc = root / "unipt_2proc"
    run_cli(["--do_train", "--epochs", "1", "--tuning", "unipt", *msvd_args(paths, clip, two_proc)], nproc=2)
    two, one = step_losses((two_proc / "log.txt").read_text()), step_losses((out / "log.txt").read_text())
    assert len(two) == 10 and two[:2] == pytest.approx(one[:2], abs=2e-6)

    evaluated = root / "unipt_eval"
    assert (
        mtr.main(["--do_eval", "--init_model", str(out / "pytorch_model.bin.1"), *msvd_args(paths, clip, evaluated)])
        == 0
    )
    ours, logged = read_metrics(evaluated / "metrics_eval.json"), read_metrics(out / "metrics_epoch1.json")
    for side in ("text_to_video", "video_to_text"):
        assert ours[side] == pytest.approx(logged[side])


# ------------------------------------------------------------------------------------------------ one user-error type


def test_help_and_a_bad_flag_answer_before_torch_is_imported():
    code = (
        "import sys; sys.argv = ['main_task_retrieval.py', '--bogus']\n"
        "import main_task_retrieval\n"
        "try:\n    main_task_retrieval.parse_flags(['--bogus'])\nexcept Exception as e:\n    print(type(e).__name__)\n"
        "print(sorted(m for m in ('torch', 'numpy', 'cv2', 'pandas') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=_env())
    assert out.stdout.split("\n")[:2] == ["UsageError", "[]"]
    bad = subprocess.run([sys.executable, SCRIPT, "--bogus"], cwd=ROOT, capture_output=True, text=True, env=_env())
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_a_bug_in_model_building_keeps_its_traceback(setup, monkeypatch, capsys):
    import engine.model

    def shape_bug(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")

    monkeypatch.setattr(engine.model.CLIP4Clip, "from_pretrained", shape_bug)
    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        root, paths, clip = setup
        mtr.main(msvd_args(paths, clip, root / "bug", "--do_eval"))


# ----------------------------------------------------------------------------------------------- runs and resume


def _one_line_error(capsys, message):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("main_task_retrieval.py: error:") and message in err, err


def test_second_run_into_a_locked_output_dir_is_refused(setup, capsys, tmp_path):
    from engine.runlock import run_lock

    _, paths, clip = setup
    out = tmp_path / "out"
    out.mkdir()
    with run_lock(str(out)):  # a first run holds the folder
        assert mtr.main(["--do_train", *msvd_args(paths, clip, out)]) == 2
        _one_line_error(capsys, f"--output_dir {out}: another run (pid {os.getpid()} on ")
        assert sorted(p.name for p in out.iterdir()) == [".run.lock"]  # not even a log line written


def test_resume_pairs_are_checked_before_anything_trains(run_a, setup, capsys, tmp_path):
    _, paths, clip = setup
    model0, opt1 = run_a / "pytorch_model.bin.0", run_a / "pytorch_opt.bin.1"
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(model0.read_bytes())
    negative = tmp_path / "negative.bin"
    torch.save(dict(weights(opt1), epoch=-2), negative)
    cases = [
        (model0, opt1, "3", f"--init_model {model0} is the model of epoch 0, --resume_model {opt1} the optimizer of"),
        (renamed, opt1, "3", f"--init_model {renamed} is not the model saved with --resume_model {opt1}"),
        (run_a / "pytorch_model.bin.1", opt1, "2", "ends epoch 2 of the run and --epochs 2 leaves nothing to train"),
        (model0, negative, "3", f"--resume_model {negative}: its epoch is -2; expected a whole number >= 0"),
    ]
    for init, opt, epochs, message in cases:
        out = tmp_path / f"out{epochs}"
        args = ["--do_train", "--epochs", epochs, "--init_model", str(init), "--resume_model", str(opt)]
        assert mtr.main([*args, *msvd_args(paths, clip, out)]) == 2
        _one_line_error(capsys, message)
        assert not [p for p in out.iterdir() if p.name.startswith("pytorch_")]


def test_an_old_opt_file_without_a_fingerprint_is_resumed_with_a_warning(run_a, tmp_path, caplog):
    old = tmp_path / "pytorch_opt.bin.0"
    state = weights(run_a / "pytorch_opt.bin.0")
    assert len(state.pop("model_sha256")) == 64
    torch.save(state, old)
    with caplog.at_level(logging.WARNING, logger="logger"):
        loaded = engine.checkpoint.load_resume_state(str(old), str(run_a / "pytorch_model.bin.0"), 2)
    assert loaded["epoch"] == 0 and "records no fingerprint of its model file" in caplog.text


def test_data_path_messages_name_what_is_wanted(setup, capsys, tmp_path, monkeypatch):
    import engine.run

    _, paths, clip = setup
    monkeypatch.setattr(engine.run, "init_model", lambda *a: pytest.fail("the model was built"))
    folder = Path(paths["msrvtt_data_path"]).parent
    args = msrvtt_args(paths, clip, tmp_path / "out")
    args[args.index("--data_path") + 1] = str(folder)
    assert mtr.main(["--do_train", *args]) == 2
    _one_line_error(capsys, f"--data_path {folder}: is a folder; MSR-VTT wants the MSRVTT_data.json file")
    msvd = tmp_path / "msvd"
    msvd.mkdir()
    (msvd / "raw-captions.pkl").write_bytes((Path(paths["msvd_data_path"]) / "raw-captions.pkl").read_bytes())
    (msvd / "val_list.txt").write_text("a\n")
    args = msvd_args(paths, clip, tmp_path / "out")
    args[args.index("--data_path") + 1] = str(msvd)
    assert mtr.main(["--do_eval", *args]) == 2
    _one_line_error(capsys, f"--data_path {msvd}: no test_list.txt there (an MSVD folder holds raw-captions.pkl")


@pytest.mark.parametrize("content", ["", "not json", "[1, 2]", '{"text_to_video": {}}'])
def test_a_damaged_earlier_metrics_file_on_resume_is_named(content, tmp_path):
    (tmp_path / "metrics_epoch0.json").write_text(content)
    with pytest.raises(util.UsageError, match=rf"{tmp_path}/metrics_epoch0\.json: expected an earlier epoch's metrics"):
        engine.checkpoint.previous_best(str(tmp_path), 1)
