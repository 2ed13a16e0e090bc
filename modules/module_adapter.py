"""UniPT's parallel tuning network (Paranioar/UniPT, CVPR 2024): a small side network on a frozen CLIP tower.

For each sample it refines the tower's pooled, projected output (the anchor) with the tower's hidden states
h_0..h_L (the input to the first block and every block's output). Module and state-dict names are the fork's
(``downsample_layers.{i}.1.*``, ``downsample_layer.1.*``, ``upsample_layer.1.*``, ``gate_layer.*``), so its
checkpoints load here and ours load there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# As the fork: the L1 norm of the attention weights is clamped here, so a row whose scores are all cut by ReLU (or
# fully masked) gives zero weights instead of NaN.
NORM_EPS = 1e-6


def l1norm(x: torch.Tensor, dim: int, eps: float = NORM_EPS) -> torch.Tensor:
    """``x`` divided by its L1 norm along ``dim``, the norm clamped at ``eps``."""
    return x / x.abs().sum(dim=dim, keepdim=True).clamp(min=eps)


def _relu_linear(in_features: int, out_features: int) -> nn.Sequential:
    # ReLU at index 0 and Linear at index 1: the fork's layout, which fixes the ".1." in the state-dict keys.
    return nn.Sequential(nn.ReLU(), nn.Linear(in_features, out_features))


class Our_tuning_for_transformer(nn.Module):
    """UniPT for one transformer tower: ``num_layer`` hidden states of widths ``hidden_size`` → refined anchors.

    ``embed_size`` is the anchor's width (CLIP's embed_dim); the side network works at
    ``embed_size // downsample_D_factor``. All Linears keep PyTorch's default initialisation, as the fork's do.
    """

    def __init__(
        self,
        num_layer: int = 13,
        hidden_size: Sequence[int] | None = None,
        embed_size: int = 512,
        downsample_D_factor: int = 1,
    ):
        super().__init__()
        if hidden_size is None or len(hidden_size) != num_layer:
            raise ValueError(f"hidden_size must list one width per layer ({num_layer}), got {hidden_size!r}")
        self.num_layer = num_layer
        mapping_size = embed_size // downsample_D_factor
        self.downsample_layers = nn.ModuleList(_relu_linear(width, mapping_size) for width in hidden_size)
        self.downsample_layer = _relu_linear(embed_size, mapping_size)
        self.upsample_layer = _relu_linear(mapping_size, embed_size)
        self.gate_layer = nn.Linear(mapping_size, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.gate_layer.weight.dtype

    @staticmethod
    def _masked_mean(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(N, L, M) → (N, M): the mean over the positions where ``mask`` (N, L) is 1 (all positions without one)."""
        if mask is None:
            return t.mean(dim=1)
        m = mask.unsqueeze(-1).to(t.dtype)
        # As the fork: the count is clamped at 1, so a row without any valid position gives zeros.
        return (t * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)

    def forward(
        self,
        all_hidden_features: Sequence[torch.Tensor],
        raw_anchor_features: torch.Tensor,
        mask: torch.Tensor | None = None,
        position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states (num_layer of (N, L, D_i)) and anchors (N, 1, E) → refined anchors (N, E) in ``self.dtype``.

        ``mask`` (N, L) zeroes the attention scores of padding (text: ids ≠ 0); ``position`` (N,) names each
        sample's own token, added to the attended mixture (text: the end token); without it token 0 is used.
        """
        raw_anchor = raw_anchor_features.to(self.dtype)
        anchor_tokens = self.downsample_layer(raw_anchor)  # (N, 1, M)
        anchor = anchor_tokens[:, 0]  # (N, M)
        rows = torch.arange(anchor.shape[0], device=anchor.device)
        own = position if position is not None else torch.zeros_like(rows)
        mask_f = mask.to(self.dtype) if mask is not None else None

        merged, gates = [], []
        for index, layer in enumerate(self.downsample_layers):
            t = layer(all_hidden_features[index].to(self.dtype))  # (N, L, M)
            scores = anchor_tokens @ t.transpose(1, 2)  # (N, 1, L)
            if mask_f is not None:
                # Multiplied, not -inf filled, as the fork: masked scores become 0 and ReLU keeps them there.
                scores = scores * mask_f.unsqueeze(1)
            weights = l1norm(torch.relu(scores), dim=-1)
            merged.append(weights @ t + t[rows, own].unsqueeze(1))  # (N, 1, M)
            gates.append(self.gate_layer(anchor * self._masked_mean(t, mask_f)))  # (N, 1)

        gate = torch.softmax(torch.cat(gates, dim=1), dim=1)  # (N, num_layer)
        mixture = (torch.stack(merged, dim=1) * gate[:, :, None, None]).sum(dim=1)  # (N, 1, M)
        return (raw_anchor + self.upsample_layer(mixture)).squeeze(1)
