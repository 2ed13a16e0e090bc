"""The tiny random CLIP: the same tensors on every call and as before it had its own file, the caller's RNG kept."""

from __future__ import annotations

import hashlib

import pytest
import torch

from modules.clip_names import TINY_MODELS, available_models
from modules.module_clip import CLIP, build_model, clip_config_from_state_dict
from modules.tiny_clip import tiny_state_dict

# sha256 over (key, dtype, bytes) of every tensor in key order, computed with the code before the move.
TINY_SHA256 = "1564be393805cd3666c4eb10676ddd2b02c70ddbf66bdfceb91002d10d1f10b3"


def images(n: int, size: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_tiny_tensors_are_unchanged():
    state = tiny_state_dict("tiny-random-ViT/16")
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(str(state[key].dtype).encode())
        digest.update(state[key].contiguous().numpy().tobytes())
    assert digest.hexdigest() == TINY_SHA256


def test_tiny_named_architecture_is_deterministic_and_leaves_rng_alone():
    assert "tiny-random-ViT/16" in TINY_MODELS and "tiny-random-ViT/16" in available_models()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = CLIP.get_config("tiny-random-ViT/16")
    assert torch.equal(torch.get_rng_state(), before)
    second = CLIP.get_config("tiny-random-ViT/16")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert clip_config_from_state_dict(first) == dict(
        embed_dim=512,
        image_resolution=64,
        vision_layers=2,
        vision_width=128,
        vision_patch_size=16,
        context_length=77,
        vocab_size=49408,
        transformer_width=512,
        transformer_heads=8,
        transformer_layers=2,
    )
    # OpenAI's initialisation: token embedding std 0.02, text projection std width ** -0.5.
    assert abs(first["token_embedding.weight"].std().item() - 0.02) < 1e-3
    assert abs(first["text_projection"].std().item() - 512**-0.5) < 2e-3
    # The logit scale of OpenAI's checkpoints, not the class's placeholder exp(1).
    assert first["logit_scale"].dtype == torch.float32 and first["logit_scale"].exp().item() == pytest.approx(100.0)
    model = build_model(first)
    assert model.visual.input_resolution == 64
    with torch.no_grad():
        assert model.encode_image(images(1, 64)).shape == (1, 512)
