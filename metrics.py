"""Retrieval metrics of a similarity matrix: R@k, median and mean rank, and opt-in dual-softmax re-ranking.

Rows are queries and the diagonal holds the ground truth. The definitions, quirks included, are the original
CLIP4Clip's, so numbers compare with published ones:
- ``compute_metrics`` counts every score tied with the ground truth as another rank entry, and its median
  averages the two middle values (numpy);
- ``tensor_text_to_video_metrics`` (multi-sentence data) takes torch's *lower* median and computes R@k in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def _as_numpy(x: ArrayLike) -> np.ndarray:
    if torch.is_tensor(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _as_tensor(x: ArrayLike) -> torch.Tensor:
    if torch.is_tensor(x):
        return x.detach().cpu()
    return torch.as_tensor(np.asarray(x))


def compute_metrics(x: ArrayLike) -> dict[str, object]:
    """R1/R5/R10 (percent), MR = MedianR, MeanR (1-based) and ``cols`` (0-based ranks) of a [queries, items] matrix.

    Query i's ground truth is item i. Its rank is the position, in the row sorted by descending score, of a score
    equal to x[i, i]; each tied score gives another entry, and the percentages divide by the number of entries.
    A NaN or infinite ground-truth score matches nowhere and its query drops out.
    """
    x = _as_numpy(x)
    if x.ndim != 2 or x.shape[0] > x.shape[1]:
        raise ValueError(
            f"compute_metrics: expected a 2-D [queries, items] matrix with queries <= items, got shape {tuple(x.shape)}"
        )
    sorted_neg = np.sort(-x, axis=1)
    gt_neg = -np.diag(x)[:, None]
    with np.errstate(invalid="ignore"):  # inf - inf on infinite ground truths: NaN, i.e. no match, as intended
        _, ranks = np.nonzero(sorted_neg - gt_neg == 0)
    n = len(ranks)
    if n == 0:
        raise ValueError("compute_metrics: no query's ground-truth score is finite; nothing to rank")
    return {
        "R1": float(np.sum(ranks == 0)) * 100 / n,
        "R5": float(np.sum(ranks < 5)) * 100 / n,
        "R10": float(np.sum(ranks < 10)) * 100 / n,
        "MR": float(np.median(ranks)) + 1,
        "MedianR": float(np.median(ranks)) + 1,
        "MeanR": float(np.mean(ranks)) + 1,
        "cols": [int(r) for r in ranks],
    }


def tensor_text_to_video_metrics(sim_tensor: ArrayLike, top_k: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Text-to-video metrics of a [videos, max_captions, videos] tensor whose missing captions are inf/NaN rows.

    Entry [i, l, j] scores video i's l-th caption against video j. Returns R{k} for k in ``top_k``, MedianR
    (torch's lower median), MeanR, Std_Rank (population std) and MR = MedianR, all on 1-based ranks.
    """
    sim = _as_tensor(sim_tensor)
    if sim.ndim != 3 or sim.shape[0] != sim.shape[2]:
        raise ValueError(
            f"tensor_text_to_video_metrics: expected a [videos, max_captions, videos] tensor, "
            f"got shape {tuple(sim.shape)}"
        )
    per_slot = sim.permute(1, 0, 2)  # [max_captions, videos, videos]: slot l of every video against all videos
    order = torch.argsort(per_slot, dim=-1, descending=True)
    rank_of = torch.argsort(order, dim=-1, descending=False)
    ranks = torch.diagonal(rank_of, dim1=1, dim2=2).flatten()  # ordered (slot, video)
    gt = torch.diagonal(sim, dim1=0, dim2=2).flatten()  # same (slot, video) order
    ranks = ranks[torch.isfinite(gt)]
    n = len(ranks)
    if n == 0:
        raise ValueError("tensor_text_to_video_metrics: every ground-truth score is inf or NaN; nothing to rank")
    # int64 count * 100 / n is a float32 tensor: the original's R@k carry float32 rounding, kept on purpose.
    results = {f"R{k}": float(torch.sum(ranks < k) * 100 / n) for k in top_k}
    results["MedianR"] = float(torch.median(ranks + 1))
    results["MeanR"] = float(np.mean(ranks.numpy() + 1))
    results["Std_Rank"] = float(np.std(ranks.numpy() + 1))
    results["MR"] = results["MedianR"]
    return results


def tensor_video_to_text_sim(sim_tensor: ArrayLike) -> torch.Tensor:
    """[videos, max_captions, videos] -> [videos, videos] video-to-text matrix for ``compute_metrics``.

    NaN counts as -inf; each video's caption group scores its best caption. Entry [j, i] is the best score of
    video i's captions against video j, so row j ranks the caption groups for video query j.
    """
    sim = _as_tensor(sim_tensor)
    if sim.ndim != 3:
        raise ValueError(
            f"tensor_video_to_text_sim: expected a [videos, max_captions, videos] tensor, got shape {tuple(sim.shape)}"
        )
    sim = torch.where(torch.isnan(sim), torch.full_like(sim, float("-inf")), sim)
    return sim.amax(dim=1).T


def multi_sentence_tensor(sim: np.ndarray, cut_off_points: Sequence[int]) -> np.ndarray:
    """[captions, videos] → [videos, max captions, videos], each video's caption rows padded with −inf (float64)."""
    ends = list(cut_off_points)
    starts = [0] + ends[:-1]
    max_length = max(e - s for s, e in zip(starts, ends))
    blocks = [
        np.concatenate((sim[s:e], np.full((max_length - e + s, sim.shape[1]), -np.inf)), axis=0)
        for s, e in zip(starts, ends)
    ]
    return np.stack(blocks, axis=0)


def retrieval_metrics(sim: np.ndarray, cut_off_points: Sequence[int] | None) -> tuple[dict, dict]:
    """(text-to-video, video-to-text) metrics of a [captions, videos] matrix (single or multi-sentence data)."""
    if cut_off_points is None:
        return compute_metrics(sim), compute_metrics(sim.T)
    tensor = multi_sentence_tensor(sim, cut_off_points)
    return tensor_text_to_video_metrics(tensor), compute_metrics(tensor_video_to_text_sim(tensor))


def dual_softmax_rerank(sim: ArrayLike, temperature: float = 1.0) -> ArrayLike:
    """Dual-softmax (DSL) re-ranking of a [queries, items] similarity matrix; opt-in, never used by the metrics above.

    CAMoE (Cheng et al. 2021, arXiv 2109.04290) multiplies the similarity by a prior, the softmax of the scores
    over the *query* axis, i.e. how strongly this query, among all queries, claims each item:

        sim_dsl[q, i] = sim[q, i] * softmax_q(sim[:, i] / temperature)[q] * n_queries

    (the form of the official DSL code; the n_queries factor makes the prior average 1 and does not change any
    ranking). For CLIP4Clip's logits, already multiplied by logit_scale (100), temperature 1 is the usual
    choice. Apply it to the unpadded 2-D matrix (-inf padding would give NaN); for video-to-text re-rank the
    transpose. Returns the same kind (numpy or torch) as given.
    """
    if temperature <= 0:
        raise ValueError(f"dual_softmax_rerank: temperature must be positive, got {temperature}")
    t = torch.as_tensor(sim)
    if t.ndim != 2:
        raise ValueError(f"dual_softmax_rerank: expected a 2-D [queries, items] matrix, got shape {tuple(t.shape)}")
    prior = torch.softmax(t / temperature, dim=0) * t.shape[0]
    out = t * prior
    return out if torch.is_tensor(sim) else out.numpy()
