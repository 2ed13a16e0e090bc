"""bench/bench_optimizer.py at its toy size, so the bench cannot rot (its table, not its timings)."""

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import bench_optimizer as bench  # noqa: E402


def test_toy_bench_prints_every_column(capsys):
    result = bench.main(["--toy", "--rounds", "1"])
    out = capsys.readouterr().out
    numel = 512 * 768 + 768 + 3 * 64 * 33 + 1 + 2048 * 128 + 77 * 512
    assert result["numel"] == numel and result["tensors"] == 6
    assert f"{numel / 1e6:.1f} M fp32 parameters in 6 tensors" in out
    # The limit is 36 bytes per element at the measured bandwidth.
    assert result["copy-bandwidth limit"] == 36 * numel / result["bandwidth"]
    for name in (
        "BertAdam (now)",
        "BertAdam (torch update)",
        "BertAdam (original per-tensor)",
        "AdamW fused",
        "AdamW foreach",
    ):
        assert result[name] > 0
        assert out.count(name) == 1
    assert "copy-bandwidth limit" in out and "this/limit" in out


def test_vit_b_32_shapes_are_clip_s():
    shapes = bench.vit_b_32_shapes()
    assert len(shapes) == 302 and sum(s.numel() for s in shapes) == 151_277_313
