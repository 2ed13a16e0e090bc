"""bench/bench_unipt_step.py --toy: both modes run; trainable counts are the models' own, the rows add up."""

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import bench_unipt_step as bench  # noqa: E402

from modules.clip_names import TINY_MODELS  # noqa: E402
from modules.modeling import CLIP4Clip, CLIP4ClipConfig, freeze_clip_layers  # noqa: E402
from modules.module_clip import CLIP  # noqa: E402
from modules.module_cross import CrossConfig  # noqa: E402


def trainable(tuning: str) -> int:
    """Parameters that get a gradient in the tiny model, counted here rather than by the bench."""
    clip = CLIP(**TINY_MODELS["tiny-random-ViT/16"]).state_dict()
    config = CLIP4ClipConfig(max_words=32, max_frames=2, precision="fp32", tuning=tuning)
    model = CLIP4Clip(CrossConfig.get_config("cross-base"), clip, config)
    freeze_clip_layers(model, 0, "2d")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_toy_bench_compares_full_and_unipt(capsys):
    results = bench.main(["--toy", "--batch", "2", "--frames", "2", "--steps", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    full, unipt = results["full"], results["unipt"]
    assert full["trainable"] == trainable("full") and unipt["trainable"] == trainable("unipt")
    assert unipt["trainable"] < full["trainable"]
    rows = {line[:30].strip(): line[30:].split() for line in out.splitlines() if line[:30].strip()}
    mib = 2**20
    for mode, column in ((full, 0), (unipt, 1)):
        total = (mode["rest_bytes"] + mode["step_bytes"]) / mib
        assert rows["peak memory, total (MiB)"][column] == f"{total:.2f}"
        assert rows["trainable parameters (M)"][column] == f"{mode['trainable'] / 1e6:.2f}"
    # The ratio stands apart from the target mark, which says MISSED when a noisy toy step misses it.
    assert rows["step time (s)"][2] == f"{unipt['step_s'] / full['step_s']:.2f}"
    assert rows["step time (s)"][3] == "<="
