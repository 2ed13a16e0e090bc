"""UniPT's side network against a per-sample re-computation of its formula, and the fork's state-dict layout."""

from __future__ import annotations

import pytest
import torch

from modules.module_adapter import Our_tuning_for_transformer, l1norm


def lin(seq: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """ReLU then the Linear at index 1, written out."""
    return torch.relu(x) @ seq[1].weight.T + seq[1].bias


@torch.no_grad()
def reference(adapter: Our_tuning_for_transformer, states, anchors, mask=None, position=None) -> torch.Tensor:
    """The formula one sample at a time, with plain loops and sums (float64)."""
    adapter = adapter.double()
    outs = []
    for n in range(anchors.shape[0]):
        a = anchors[n].double()  # (E,)
        a_ = lin(adapter.downsample_layer, a)  # (M,)
        length = states[0].shape[1]
        valid = [mask is None or bool(mask[n, j]) for j in range(length)]
        merged, gates = [], []
        for i in range(adapter.num_layer):
            t = lin(adapter.downsample_layers[i], states[i][n].double())  # (L, M)
            scores = torch.stack(
                [torch.relu(a_ @ t[j]) if valid[j] else torch.zeros((), dtype=t.dtype) for j in range(length)]
            )
            total = max(float(scores.abs().sum()), 1e-6)
            w = scores / total
            own = 0 if position is None else int(position[n])
            merged.append(sum(w[j] * t[j] for j in range(length)) + t[own])
            count = sum(valid)
            mean = sum(t[j] for j in range(length) if valid[j]) / max(count, 1)
            gates.append(adapter.gate_layer.weight[0] @ (a_ * mean) + adapter.gate_layer.bias[0])
        g = torch.softmax(torch.stack(gates), dim=0)
        mixture = sum(g[i] * merged[i] for i in range(adapter.num_layer))
        outs.append(a + lin(adapter.upsample_layer, mixture))
    adapter.float()
    return torch.stack(outs).float()


def make_inputs(n=3, length=6, widths=(8, 12, 8), embed=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    states = [torch.randn(n, length, w, generator=gen) for w in widths]
    anchors = torch.randn(n, embed, generator=gen)
    return states, anchors


@pytest.mark.parametrize("masked", [False, True])
def test_adapter_matches_the_formula(masked):
    torch.manual_seed(0)
    adapter = Our_tuning_for_transformer(num_layer=3, hidden_size=[8, 12, 8], embed_size=10, downsample_D_factor=2)
    states, anchors = make_inputs()
    mask = position = None
    if masked:
        lengths = torch.tensor([2, 6, 4])
        mask = (torch.arange(6)[None] < lengths[:, None]).float()
        position = lengths - 1  # the end token of each text
    out = adapter(states, anchors.unsqueeze(1), mask=mask, position=position)
    assert out.shape == (3, 10)
    torch.testing.assert_close(out, reference(adapter, states, anchors, mask, position), rtol=1e-5, atol=1e-5)


def test_masked_positions_do_not_matter():
    """Padding changes nothing when masked and the own position is a valid one."""
    torch.manual_seed(0)
    adapter = Our_tuning_for_transformer(num_layer=3, hidden_size=[8, 12, 8], embed_size=10, downsample_D_factor=1)
    states, anchors = make_inputs()
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]] * 3).float()
    position = torch.tensor([2, 1, 0])
    changed = [s.clone() for s in states]
    for s in changed:
        s[:, 3:] = 100.0
    a = adapter(states, anchors.unsqueeze(1), mask=mask, position=position)
    b = adapter(changed, anchors.unsqueeze(1), mask=mask, position=position)
    torch.testing.assert_close(a, b)


def test_all_scores_cut_gives_zero_weights_not_nan():
    assert torch.equal(l1norm(torch.zeros(2, 1, 4), dim=-1), torch.zeros(2, 1, 4))
    torch.testing.assert_close(l1norm(torch.tensor([[1.0, -3.0]]), dim=-1), torch.tensor([[0.25, -0.75]]))
    adapter = Our_tuning_for_transformer(num_layer=1, hidden_size=[4], embed_size=4, downsample_D_factor=1)
    states, anchors = [torch.randn(2, 3, 4)], torch.randn(2, 4)
    out = adapter(states, anchors.unsqueeze(1), mask=torch.zeros(2, 3))
    assert torch.isfinite(out).all()


def test_fork_vit_b32_state_dict_loads_strictly():
    """The key names and shapes of the fork's ViT-B/32 adapters (13 layers, 768 vision / 512 text wide, embed 512)."""
    for prefix, width in (("image_adapter.", 768), ("text_adapter.", 512)):
        fork = {}
        for i in range(13):
            fork[f"downsample_layers.{i}.1.weight"] = torch.randn(512, width)
            fork[f"downsample_layers.{i}.1.bias"] = torch.randn(512)
        for name in ("downsample_layer", "upsample_layer"):
            fork[f"{name}.1.weight"] = torch.randn(512, 512)
            fork[f"{name}.1.bias"] = torch.randn(512)
        fork["gate_layer.weight"] = torch.randn(1, 512)
        fork["gate_layer.bias"] = torch.randn(1)
        with torch.device("meta"):
            adapter = Our_tuning_for_transformer(13, [width] * 13, 512, 1)
        adapter.load_state_dict(fork, strict=True, assign=True)
        assert set(adapter.state_dict()) == set(fork), prefix


def test_hidden_size_must_match_the_layer_count():
    with pytest.raises(ValueError, match="one width per layer"):
        Our_tuning_for_transformer(num_layer=3, hidden_size=[8, 8], embed_size=8)
