"""A tiny CLIP with random weights, the same on every call, for demos and tests without a download."""

from __future__ import annotations

import math

import torch

from modules.clip_names import TINY_MODELS
from modules.module_clip import CLIP

TINY_SEED = 0
# Every OpenAI checkpoint, which is what CLIP4Clip fine-tunes, carries a logit scale of 100. The CLIP class's own
# start value (1, so logits are cosines times e) only exists to be overwritten by such a file; a tiny CLIP left at
# it trains with a 37x softer softmax and learns retrieval far more slowly (docs/demo.md).
TINY_LOGIT_SCALE = math.log(100.0)


def tiny_state_dict(name: str) -> dict[str, torch.Tensor]:
    """A freshly initialised tiny CLIP with logit scale 100, seeded locally so the caller's RNG stream is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = CLIP(**TINY_MODELS[name])
    state = dict(model.state_dict())
    state["logit_scale"] = torch.tensor(TINY_LOGIT_SCALE)
    return state
