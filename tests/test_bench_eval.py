"""bench/bench_eval.py at its toy size: ours and the original's loop give the same similarities."""

import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import bench_eval  # noqa: E402


def test_toy_bench_compares_equal_matrices(capsys):
    results = bench_eval.main(["--toy", "--heads", "meanP", "--orig_text_batches", "2"])
    out = capsys.readouterr().out
    assert out.startswith(f"{bench_eval.TOY_TEXTS} captions x {bench_eval.TOY_VIDEOS} videos")
    meanp = results["meanP"]
    # The same model on the same features: the two orders of work agree to float32 rounding.
    assert meanp["diff"] < 1e-5
    # The original is timed on 2 of ceil(50 / 16) = 4 text batches and scaled by 4 / 2.
    assert meanp["ours_s"] > 0 and meanp["orig_s"] > 0
    row = next(line for line in out.splitlines() if line.startswith("meanP"))
    assert f"{meanp['orig_s'] / meanp['ours_s']:8.1f}x" in row
    assert meanp["orig_bytes"] >= 2 * bench_eval.TOY_TEXTS * bench_eval.TOY_VIDEOS * 4
    assert float(row.split()[-1]) == pytest.approx(meanp["diff"], rel=0.01, abs=1e-12)
