"""bench/bench_model_step.py --toy: both children run and the table's ratios are theirs."""

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import bench_model_step as bench  # noqa: E402


def test_toy_bench_prints_both_configurations(capsys):
    results = bench.main(["--toy", "--batch", "2", "--frames", "2", "--steps", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    plain, ckpt = results[False], results[True]
    assert plain["precision"] == ckpt["precision"] == "fp32"
    assert plain["step_s"] > 0 and ckpt["step_s"] > 0
    assert "tiny CLIP shapes" in out
    row = next(line for line in out.splitlines() if line.startswith("forward+backward (s)"))
    assert row.split()[-1] == f"{ckpt['step_s'] / plain['step_s']:.2f}"
    row = next(line for line in out.splitlines() if line.startswith("peak step memory (MiB)"))
    assert row.split()[-1] == f"{ckpt['peak_bytes'] / max(plain['peak_bytes'], 1):.2f}"
