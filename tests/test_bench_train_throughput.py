"""bench/bench_train_throughput.py at a toy size (tiny CLIP, one step each), so the bench cannot rot."""

import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import bench_train_throughput as bench  # noqa: E402


def test_bench_runs_and_its_figures_agree(tmp_path, capsys):
    results = bench.main(
        [
            "--clip",
            "tiny-random-ViT/16",
            "--batch",
            "2",
            "--frames",
            "3",
            "--workers",
            "0",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--seconds",
            "2",
            "--no_compile",
            "--data_dir",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    # Videos of 2 s at 1 frame per second give frames 0 and 1 (second 2 is past the end): 2 frames per clip.
    for name in ("loader first", "loader cached", "loader float64"):
        assert results[name]["frames_s"] == pytest.approx(2 * results[name]["clips_s"])
    # The frame cache was filled by the first pass: one .npy per video, 2 videos (one step of 2 clips).
    assert len(list((tmp_path / "frame_cache").rglob("*.npy"))) == 2
    for variant in ("before", "now"):
        step = results[f"model {variant}"]
        assert step["clips_s"] == pytest.approx(2 / sum(step[p] for p in bench.PHASES))
    whole = results["whole"]
    # Phases are timed inside the loop's wall time, so they cannot add up to more than it.
    assert sum(whole[p] for p in bench.PHASES) * whole["clips_s"] <= 2 * 1.001
    # The optimizer's share, before and after, is the optimizer phase over the step's phases.
    for key, label in (("whole per-tensor", "per-tensor BertAdam"), ("whole", "BertAdam now")):
        step = results[key]
        percent = 100 * step["optimizer"] / sum(step[p] for p in bench.PHASES)
        assert f"one step, {label}: " in out
        assert f"optimizer {step['optimizer'] * 1e3:.1f} ms ({percent:.0f}%)" in out
    shares = [
        100 * results[f"model {v}"]["optimizer"] / sum(results[f"model {v}"][p] for p in bench.PHASES)
        for v in ("before", "now")
    ]
    assert f"optimizer share of the step: before {shares[0]:.0f}%, now {shares[1]:.0f}%" in out
    hours = bench.RECIPE_PAIRS * bench.RECIPE_EPOCHS / whole["clips_s"] / 3600
    assert f"{hours:.3g} h at {whole['clips_s']:.3g} clips/s" in out
    for line in ("loader alone", "model step alone", "whole/min(loader, model)"):
        assert line in out
