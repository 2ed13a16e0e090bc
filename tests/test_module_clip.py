"""CLIP backbone: architecture inference, weight files, fp16 set, and numbers against open_clip (an independent CLIP)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_clip_state_dict
from torch import nn

from modules.module_clip import (
    CLIP,
    LayerNorm,
    QuickGELU,
    build_model,
    clip_config_from_state_dict,
    convert_weights,
)

open_clip_model = pytest.importorskip("open_clip.model")

TINY_CONFIG = dict(
    embed_dim=512,
    image_resolution=32,
    vision_layers=2,
    vision_width=64,
    vision_patch_size=16,
    context_length=77,
    vocab_size=49408,
    transformer_width=512,
    transformer_heads=8,
    transformer_layers=2,
)
END = 49407  # end-of-text id: the largest id, so argmax finds it


def fp32_clip(state_dict: dict[str, torch.Tensor], linear_patch: str = "2d") -> CLIP:
    """Our CLIP in fp32 holding ``state_dict`` (no convert_weights), eval mode."""
    model = CLIP(**clip_config_from_state_dict(state_dict), linear_patch=linear_patch)
    model.load_state_dict(state_dict, strict=linear_patch == "2d")
    return model.eval()


def open_clip_reference(state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """open_clip's CLIP (QuickGELU, fp32) with the same weights."""
    c = clip_config_from_state_dict(state_dict)
    model = open_clip_model.CLIP(
        c["embed_dim"],
        vision_cfg=open_clip_model.CLIPVisionCfg(
            layers=c["vision_layers"],
            width=c["vision_width"],
            patch_size=c["vision_patch_size"],
            image_size=c["image_resolution"],
        ),
        text_cfg=open_clip_model.CLIPTextCfg(
            context_length=c["context_length"],
            vocab_size=c["vocab_size"],
            width=c["transformer_width"],
            heads=c["transformer_heads"],
            layers=c["transformer_layers"],
        ),
        quick_gelu=True,
    )
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def make_texts(lengths, context: int = 77, seed: int = 0) -> torch.Tensor:
    """(len(lengths), context) ids: start token, random words, end token at position length-1, zero padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), context, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, 0] = 49406
        ids[row, 1 : n - 1] = torch.randint(1, 49000, (n - 2,), generator=gen)
        ids[row, n - 1] = END
    return ids


def images(n: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_fp32(tiny_clip_state_dict) -> CLIP:
    return fp32_clip(tiny_clip_state_dict)


# --- small pieces -------------------------------------------------------------------------------------------------


def test_quick_gelu_and_fp32_layernorm():
    x = torch.tensor([1.0, -2.0, 0.0])
    expected = torch.tensor([1 / (1 + math.exp(-1.702)), -2 / (1 + math.exp(3.404)), 0.0])
    torch.testing.assert_close(QuickGELU()(x), expected)

    ln = LayerNorm(4)
    h = torch.tensor([[1.0, 2.0, 3.0, 1000.5]]).half()
    out = ln(h)
    assert out.dtype == torch.float16
    ref = torch.nn.functional.layer_norm(h.float(), (4,), eps=1e-5).half()  # statistics in fp32
    assert torch.equal(out, ref)


def test_causal_mask():
    mask = CLIP.build_attention_mask(3)
    inf = float("-inf")
    assert torch.equal(mask, torch.tensor([[0.0, inf, inf], [0.0, 0.0, inf], [0.0, 0.0, 0.0]]))


# --- architecture inference -------------------------------------------------------------------------------------


@pytest.mark.parametrize("patch, grid", [(32, 7), (16, 14)])
def test_config_and_keys_for_real_vit_b_shapes(patch, grid):
    """Shapes only (meta device): open_clip's ViT-B layout → our inferred config; our keys and shapes equal open_clip's."""
    with torch.device("meta"):
        reference = open_clip_model.CLIP(
            512,
            vision_cfg=open_clip_model.CLIPVisionCfg(layers=12, width=768, patch_size=patch, image_size=224),
            text_cfg=open_clip_model.CLIPTextCfg(context_length=77, vocab_size=49408, width=512, heads=8, layers=12),
            quick_gelu=True,
        )
    shapes = reference.state_dict()
    assert shapes["visual.positional_embedding"].shape[0] == grid * grid + 1
    config = clip_config_from_state_dict(shapes)
    assert config == dict(
        embed_dim=512,
        image_resolution=224,
        vision_layers=12,
        vision_width=768,
        vision_patch_size=patch,
        context_length=77,
        vocab_size=49408,
        transformer_width=512,
        transformer_heads=8,
        transformer_layers=12,
    )
    with torch.device("meta"):
        ours = CLIP(**config)
    assert ours.visual.transformer.resblocks[0].attn.num_heads == 12
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in shapes.items()}
    assert len(shapes) == 302
    extras = dict(
        shapes, input_resolution=torch.tensor(224), context_length=torch.tensor(77), vocab_size=torch.tensor(49408)
    )
    assert clip_config_from_state_dict(extras) == config


def test_config_of_tiny_dict(tiny_clip_state_dict):
    assert clip_config_from_state_dict(tiny_clip_state_dict) == TINY_CONFIG
    sd = make_clip_state_dict(
        vision_width=128,
        vision_layers=3,
        image_resolution=48,
        transformer_layers=1,
        embed_dim=256,
        context_length=20,
        vocab_size=1000,
    )
    assert clip_config_from_state_dict(sd) == dict(
        embed_dim=256,
        image_resolution=48,
        vision_layers=3,
        vision_width=128,
        vision_patch_size=16,
        context_length=20,
        vocab_size=1000,
        transformer_width=512,
        transformer_heads=8,
        transformer_layers=1,
    )


def test_wrong_architecture_is_a_clear_value_error(tiny_clip_state_dict):
    sd = dict(tiny_clip_state_dict)
    del sd["visual.ln_post.bias"]
    with pytest.raises(ValueError, match=r"missing key 'visual.ln_post.bias' \(expected shape \(64,\)\)"):
        build_model(sd)

    sd = dict(tiny_clip_state_dict, **{"transformer.resblocks.1.ln_2.weight": torch.ones(7)})
    with pytest.raises(ValueError, match=r"'transformer.resblocks.1.ln_2.weight': expected shape \(512,\), got \(7,\)"):
        build_model(sd)

    sd = dict(tiny_clip_state_dict, **{"visual.extra.weight": torch.ones(2)})
    with pytest.raises(ValueError, match="unexpected key 'visual.extra.weight'"):
        build_model(sd)

    sd = {"clip." + k: v for k, v in tiny_clip_state_dict.items()}
    with pytest.raises(ValueError, match="missing key 'visual.conv1.weight'.*'clip.'"):
        build_model(sd)

    sd = dict(tiny_clip_state_dict, **{"visual.layer1.0.conv1.weight": torch.ones(1)})
    with pytest.raises(ValueError, match="ResNet CLIP .*needs a ViT"):
        clip_config_from_state_dict(sd)
    with pytest.raises(ValueError, match="ResNet CLIP; CLIP4Clip needs a ViT"):
        CLIP(**dict(TINY_CONFIG, vision_layers=(3, 4, 6, 3)))


# --- numbers ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["conftest-tiny", "tiny-random-ViT/16"])
def test_encoders_match_open_clip(which, tiny_clip_state_dict, tiny_fp32):
    if which == "conftest-tiny":
        sd, ours = tiny_clip_state_dict, tiny_fp32
    else:
        sd = CLIP.get_config(which)
        ours = fp32_clip(sd)
    reference = open_clip_reference(sd)
    size = ours.visual.input_resolution
    image = images(3, size)
    lengths = [2, 7, 30, 77]
    ids = make_texts(lengths)
    with torch.no_grad():
        image_features, image_hidden = ours.encode_image(image, return_hidden=True)
        text_features, text_hidden = ours.encode_text(ids, return_hidden=True)
        assert (image_features - reference.encode_image(image)).abs().max() < 1e-4
        assert (text_features - reference.encode_text(ids)).abs().max() < 1e-4

        assert image_hidden.shape == (3, (size // 16) ** 2 + 1, 512) and torch.equal(image_hidden[:, 0], image_features)
        assert text_hidden.shape == (4, 77, 512)
        assert torch.equal(text_hidden[torch.arange(4), torch.tensor(lengths) - 1], text_features)

        # The causal mask makes tokens ignore the padding behind them: a length-L input gives the same end token.
        for row, n in enumerate(lengths[:3]):
            for cut in (n, n + 5):
                short = ours.encode_text(ids[row : row + 1, :cut])
                assert (short - text_features[row]).abs().max() < 1e-5

        logits_per_image, logits_per_text = ours(image, ids)
        a = nn.functional.normalize(image_features, dim=-1)
        b = nn.functional.normalize(text_features, dim=-1)
        torch.testing.assert_close(logits_per_image, ours.logit_scale.exp() * a @ b.t())
        torch.testing.assert_close(logits_per_text, logits_per_image.t())


def test_full_size_vit_b32_matches_open_clip():
    """Random ViT-B/32 weights at full size (OpenAI's initialisation, 12+12 layers): encoders agree to 1e-4."""
    torch.manual_seed(32)
    ours = CLIP(
        embed_dim=512,
        image_resolution=224,
        vision_layers=12,
        vision_width=768,
        vision_patch_size=32,
        context_length=77,
        vocab_size=49408,
        transformer_width=512,
        transformer_heads=8,
        transformer_layers=12,
    ).eval()
    state_dict = ours.state_dict()
    assert len(state_dict) == 302
    reference = open_clip_reference(state_dict)
    image, ids = images(2, 224), make_texts([5, 77])
    with torch.no_grad():
        assert (ours.encode_image(image) - reference.encode_image(image)).abs().max() < 1e-4
        assert (ours.encode_text(ids) - reference.encode_text(ids)).abs().max() < 1e-4


def test_3d_patch_with_centre_init_equals_2d(tiny_clip_state_dict, tiny_fp32):
    model_3d = fp32_clip(tiny_clip_state_dict, linear_patch="3d")
    conv1 = tiny_clip_state_dict["visual.conv1.weight"]
    zeros = torch.zeros_like(conv1)
    model_3d.visual.conv2.weight.data = torch.stack([zeros, conv1, zeros], dim=2)
    assert model_3d.visual.conv2.weight.shape == (64, 3, 3, 16, 16)
    frames = 4
    video = images(2 * frames, 32, seed=5)  # 2 videos of 4 distinct frames
    with torch.no_grad():
        out_3d = model_3d.encode_image(video, video_frame=frames)
        out_2d = tiny_fp32.encode_image(video)
    assert out_3d.shape == (8, 512)
    assert (out_3d - out_2d).abs().max() < 1e-5
    # A non-centre temporal slice mixes neighbouring frames, so the result must change.
    model_3d.visual.conv2.weight.data = torch.stack([conv1, conv1, zeros], dim=2)
    with torch.no_grad():
        assert (model_3d.encode_image(video, video_frame=frames) - out_2d).abs().max() > 1e-3
    with pytest.raises(ValueError, match="video_frame"):
        model_3d.encode_image(video)
    with pytest.raises(ValueError, match="video_frame"):
        model_3d.encode_image(video, video_frame=3)
    # build_model recognises a 3d state dict by its conv2 weight.
    rebuilt = build_model(model_3d.state_dict())
    assert rebuilt.visual.linear_patch == "3d" and rebuilt.visual.conv2.weight.dtype == torch.float16


def test_convert_weights_casts_exactly_openai_set(tiny_clip_state_dict):
    model = CLIP(**TINY_CONFIG, linear_patch="3d")
    convert_weights(model)
    half_suffixes = (
        "conv1.weight",
        "conv2.weight",
        "attn.in_proj_weight",
        "attn.in_proj_bias",
        "attn.out_proj.weight",
        "attn.out_proj.bias",
        "mlp.c_fc.weight",
        "mlp.c_fc.bias",
        "mlp.c_proj.weight",
        "mlp.c_proj.bias",
    )
    expected_half = {k for k in model.state_dict() if k.endswith(half_suffixes)} | {"text_projection", "visual.proj"}
    assert len(expected_half) == 2 + 2 + 8 * (2 + 2)  # conv1, conv2, proj, text_projection, 8 tensors x 4 blocks
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    assert {k for k, d in dtypes.items() if d == torch.float16} == expected_half
    assert {d for k, d in dtypes.items() if k not in expected_half} == {torch.float32}
    assert (
        dtypes["logit_scale"] == dtypes["token_embedding.weight"] == dtypes["visual.class_embedding"] == torch.float32
    )
    assert model.dtype == torch.float16

    # fp16 model stays close to the fp32 one.
    half = build_model(tiny_clip_state_dict)
    full = fp32_clip(tiny_clip_state_dict)
    ids, image = make_texts([6, 12]), images(2, 32)
    with torch.no_grad():
        assert half.encode_text(ids).dtype == torch.float16
        torch.testing.assert_close(half.encode_text(ids).float(), full.encode_text(ids), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(half.encode_image(image).float(), full.encode_image(image), atol=2e-2, rtol=2e-2)


def test_grad_checkpointing_same_outputs_and_grads(tiny_clip_state_dict):
    model = fp32_clip(tiny_clip_state_dict).train()
    image, ids = images(2, 32), make_texts([5, 11])

    def run():
        model.zero_grad()
        logits, _ = model(image, ids)
        logits.sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_logits, plain_grads = run()
    model.set_grad_checkpointing(True)
    assert model.transformer.grad_checkpointing and model.visual.transformer.grad_checkpointing
    ckpt_logits, ckpt_grads = run()
    assert (ckpt_logits - plain_logits).abs().max() < 1e-6
    assert ckpt_grads.keys() == plain_grads.keys() and len(plain_grads) > 50
    for name, grad in plain_grads.items():
        assert (ckpt_grads[name] - grad).abs().max() < 1e-6, name
    model.set_grad_checkpointing(False)
    assert not model.transformer.grad_checkpointing


@pytest.mark.parametrize("masked", [False, True])
def test_self_attention_equals_multihead_attention(masked):
    """The scaled_dot_product_attention path against nn.MultiheadAttention itself: outputs and input gradients."""
    from modules.module_clip import CLIP, self_attention

    torch.manual_seed(0)
    attn = torch.nn.MultiheadAttention(64, 4)
    x = torch.randn(7, 3, 64, requires_grad=True)  # (L, N, D)
    mask = CLIP.build_attention_mask(7) if masked else None
    ours = self_attention(attn, x, mask)
    (grad_ours,) = torch.autograd.grad(ours.sum(), x)
    ref = attn(x, x, x, need_weights=False, attn_mask=mask)[0]
    (grad_ref,) = torch.autograd.grad(ref.sum(), x)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-5)
    assert torch.allclose(grad_ours, grad_ref, rtol=0, atol=1e-5)


# --- hidden states (UniPT) ----------------------------------------------------------------------------------------


def _block_inputs_and_outputs(transformer) -> tuple:
    """Hooks recording the first block's input and every block's output, as (N, L, D) tensors."""
    seen = []
    first = transformer.resblocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].permute(1, 0, 2)))
    rest = [
        b.register_forward_hook(lambda m, args, out: seen.append(out.permute(1, 0, 2))) for b in transformer.resblocks
    ]
    return seen, [first, *rest]


@pytest.mark.parametrize("tower", ["visual", "text"])
def test_hidden_states_are_block_inputs_and_outputs(tower, tiny_fp32):
    model = tiny_fp32
    transformer = model.visual.transformer if tower == "visual" else model.transformer
    encode = (
        (lambda **kw: model.encode_image(images(2, 32), **kw))
        if tower == "visual"
        else (lambda **kw: model.encode_text(make_texts([3, 9]), **kw))
    )
    with torch.no_grad():
        plain = encode()
        seen, hooks = _block_inputs_and_outputs(transformer)
        try:
            pooled, states = encode(hidden_states=True)
        finally:
            for h in hooks:
                h.remove()
        # Both extras together come in the documented order: pooled, all tokens, hidden states.
        pooled2, tokens, states2 = encode(return_hidden=True, hidden_states=True)
    assert torch.equal(pooled, plain) and torch.equal(pooled2, plain)  # the pooled output is unchanged
    assert len(states) == transformer.layers + 1 == len(seen)
    for got, expected in zip(states, seen):
        assert torch.equal(got, expected)
    width = 64 if tower == "visual" else 512
    assert states[0].shape == (2, 5 if tower == "visual" else 77, width)
    assert all(torch.equal(a, b) for a, b in zip(states, states2)) and tokens.shape[-1] == 512


def test_original_names_stay_importable():
    from modules import clip_names, module_clip

    assert module_clip._MODELS is clip_names.OPENAI_MODEL_URLS and module_clip._PT_NAME is clip_names.OPENAI_FILE_NAMES
    assert module_clip.available_models() == ["ViT-B/32", "ViT-B/16", "tiny-random-ViT/16"]
