"""CrossConfig reading, the per-head attention mask, and CrossModel's key layout and masking."""

from __future__ import annotations

import json
import math

import pytest
import torch

from modules.module_cross import CrossConfig, CrossModel, ResidualAttentionBlock, Transformer
from modules.until_module import LayerNorm

CROSS_BASE = {
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 512,
    "initializer_range": 0.02,
    "intermediate_size": 2048,
    "max_position_embeddings": 128,
    "num_attention_heads": 8,
    "num_hidden_layers": 4,
    "vocab_size": 512,
    "type_vocab_size": 2,
}
BLOCK_SUFFIXES = [
    "attn.in_proj_weight",
    "attn.in_proj_bias",
    "attn.out_proj.weight",
    "attn.out_proj.bias",
    "ln_1.weight",
    "ln_1.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
]


def test_cross_base_config_has_spec_values():
    assert CrossConfig.get_config("cross-base").to_dict() == CROSS_BASE
    assert CrossConfig.get_config("cross-base", type_vocab_size=5).type_vocab_size == 5


def test_class_defaults_then_json_overrides(tmp_path):
    (tmp_path / "cross_config.json").write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 1}))
    config = CrossConfig.get_config(str(tmp_path))
    assert (config.hidden_size, config.num_hidden_layers) == (64, 1)
    assert (config.num_attention_heads, config.max_position_embeddings, config.vocab_size) == (12, 512, -1)


def test_config_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"hidden_size": 64,\n "typo_key": 1}')
    with pytest.raises(ValueError, match=r"bad\.json.*typo_key"):
        CrossConfig.from_json_file(bad)
    broken = tmp_path / "broken.json"
    broken.write_text('{"hidden_size": 64,\n oops}')
    with pytest.raises(ValueError, match=r"broken\.json: line 2"):
        CrossConfig.from_json_file(broken)
    with pytest.raises(FileNotFoundError, match="no-such-cross"):
        CrossConfig.get_config("no-such-cross")


def _small_config(**overrides) -> CrossConfig:
    values = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=10)
    values.update(overrides)
    return CrossConfig(**values)


def test_cross_model_keys_are_the_originals():
    model = CrossModel(_small_config())
    expected = ["embeddings.position_embeddings.weight"]
    expected += [f"transformer.resblocks.{i}.{s}" for i in range(2) for s in BLOCK_SUFFIXES]
    expected += ["pooler.ln_pool.weight", "pooler.ln_pool.bias", "pooler.dense.weight", "pooler.dense.bias"]
    assert list(model.state_dict()) == expected
    assert isinstance(model.transformer.resblocks[0].ln_1, LayerNorm)
    assert isinstance(model.pooler.ln_pool, LayerNorm)


def _hand_attention(block: ResidualAttentionBlock, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Multi-head attention written out per sample and per head; x (L, B, D), mask (B, L, L) additive."""
    L, B, D = x.shape
    H = block.n_head
    hd = D // H
    w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
    out = torch.zeros_like(x)
    for n in range(B):
        q = x[:, n] @ w[:D].T + b[:D]
        k = x[:, n] @ w[D : 2 * D].T + b[D : 2 * D]
        v = x[:, n] @ w[2 * D :].T + b[2 * D :]
        heads = []
        for h in range(H):
            cols = slice(h * hd, (h + 1) * hd)
            scores = q[:, cols] @ k[:, cols].T / math.sqrt(hd) + mask[n]
            heads.append(torch.softmax(scores, dim=-1) @ v[:, cols])
        out[:, n] = torch.cat(heads, dim=-1) @ block.attn.out_proj.weight.T + block.attn.out_proj.bias
    return out


def test_attention_mask_is_applied_per_sample_for_every_head():
    torch.manual_seed(0)
    block = ResidualAttentionBlock(16, 4).double()
    x = torch.randn(5, 3, 16, dtype=torch.float64)
    keep = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 1, 0, 1]], dtype=torch.float64)
    mask = ((1.0 - keep.unsqueeze(1)) * -1e6).expand(-1, 5, -1)
    got = block.attention(x, mask)
    assert torch.allclose(got, _hand_attention(block, x, mask), atol=1e-12)


def test_transformer_stacks_blocks_with_tf_layernorm():
    torch.manual_seed(0)
    transformer = Transformer(width=16, layers=2, heads=2).double()
    x = torch.randn(4, 2, 16, dtype=torch.float64)
    mask = torch.zeros(2, 4, 4, dtype=torch.float64)
    expected = x
    for block in transformer.resblocks:
        expected = expected + _hand_attention(block, block.ln_1(expected), mask)
        h = block.ln_2(expected) @ block.mlp.c_fc.weight.T + block.mlp.c_fc.bias
        h = h * torch.sigmoid(1.702 * h)
        expected = expected + h @ block.mlp.c_proj.weight.T + block.mlp.c_proj.bias
    assert torch.allclose(transformer(x, mask), expected, atol=1e-10)


def test_cross_model_pooled_output_ignores_masked_tokens_and_matches_hand_pooler():
    torch.manual_seed(0)
    model = CrossModel(_small_config()).eval()
    x = torch.randn(2, 6, 64)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    seq, pooled = model(x, None, mask)
    assert seq.shape == (2, 6, 64) and pooled.shape == (2, 64)

    changed = x.clone()
    changed[0, 3:] = 100 * torch.randn(3, 64)
    _, pooled_changed = model(changed, torch.zeros_like(mask), mask)
    assert torch.equal(pooled_changed[0], pooled[0])

    # Same as running sample 0 with only its kept tokens (exp(-1e6) is exactly 0 in fp32).
    _, pooled_short = model(x[:1, :3], None, torch.ones(1, 3))
    assert torch.allclose(pooled_short[0], pooled[0], atol=1e-5)

    hidden = model.pooler.ln_pool(seq)[:, 0] @ model.pooler.dense.weight.T + model.pooler.dense.bias
    assert torch.allclose(pooled, hidden * torch.sigmoid(1.702 * hidden), atol=1e-6)


def test_build_attention_mask_is_additive_on_keys():
    model = CrossModel(_small_config())
    ext = model.build_attention_mask(torch.tensor([[1, 0, 1]]))
    assert ext.dtype == torch.float32 and ext.shape == (1, 3, 3)
    assert torch.equal(ext[0], torch.tensor([[0.0, -1e6, 0.0]] * 3))


def test_embedding_dropout_only_in_training():
    torch.manual_seed(0)
    model = CrossModel(_small_config(hidden_dropout_prob=0.5))
    x = torch.randn(2, 4, 64)
    model.eval()
    a, _ = model(x)
    b, _ = model(x)
    assert torch.equal(a, b)
    model.train()
    c, _ = model(x)
    assert not torch.allclose(a, c)


def test_block_attention_equals_multihead_attention_with_per_head_masks():
    """The per-sample mask broadcast over heads equals MHA given the mask repeated once per head (batch-major)."""
    from modules.module_cross import ResidualAttentionBlock

    torch.manual_seed(0)
    block = ResidualAttentionBlock(32, 4)
    x = torch.randn(5, 3, 32)  # (L, B, D)
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float32)
    mask = ((1.0 - keep.unsqueeze(1)) * -1000000.0).expand(-1, 5, -1)
    ours = block.attention(x, mask)
    ref = block.attn(x, x, x, need_weights=False, attn_mask=mask.repeat_interleave(4, dim=0))[0]
    assert torch.allclose(ours, ref, rtol=0, atol=1e-5)
