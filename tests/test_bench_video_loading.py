"""bench/bench_video_loading.py --toy: one small video, every method, the same frames bit for bit."""

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import bench_video_loading as bench  # noqa: E402


def test_toy_bench_times_every_method_on_identical_frames(tmp_path, capsys):
    results = bench.main(["--toy", "--video_dir", str(tmp_path)])
    out = capsys.readouterr().out
    name, r = next((k, v) for k, v in results.items() if k != "cached sample")
    assert set(results) == {"64x48 toy", "cached sample"}
    assert name == "64x48 toy" and (tmp_path / "64x48_toy.mp4").is_file()
    assert r["identical"] is True
    for key in ("baseline", "ours", "ours_pil", "cache", "limit"):
        assert r[key] > 0
    row = next(line for line in out.splitlines() if line.startswith(name))
    assert f"{r['baseline'] / r['ours']:>8.2f}x" in row and "yes" in row
    # the limit line names which decode and which transform made it
    assert r["limit_how"] in row and r["limit_how"].split(" + ")[0] in ("sequential", "seek each")
    # the cached training sample: ours against np.load + tokenising, printed side by side, the same item
    sample = results["cached sample"]
    assert sample["identical"] is True and sample["frames"] == 2  # a 2 s video, one frame a second (the end is past it)
    for key in ("ours", "limit", "read_cached", "np.load", "np.load mmap"):
        assert sample[key] > 0
    assert f"{sample['ours'] / sample['limit']:>11.2f}x" in out
