"""Retrieval metrics of a similarity matrix: R@k, median and mean rank, and opt-in dual-softmax re-ranking.

Rows are queries and the diagonal holds the ground truth. The definitions, quirks included, are the original
CLIP4Clip's, so numbers compare with published ones:
- ``compute_metrics`` counts every score tied with the ground truth as another rank entry, and its median
  averages the two middle values (numpy);
- ``tensor_text_to_video_metrics`` (multi-sentence data) takes torch's *lower* median and computes R@k in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


def print_computed_metrics(metrics: dict[str, object]) -> None:
    """The original's one-line summary of ``compute_metrics`` output (kept for scripts written against it)."""
    print(
        "R@1: {:.4f} - R@5: {:.4f} - R@10: {:.4f} - Median R: {}".format(
            metrics["R1"], metrics["R5"], metrics["R10"], metrics["MR"]
        )
    )


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


# Querybank normalisation (QB-Norm, Bogolin et al., CVPR 2022, arXiv 2112.12777) with the dynamic inverted softmax.
# Unlike DSL it needs no other test query: a fixed bank of queries (the training captions for text-to-video; the
# training videos for video-to-text) is scored once against the gallery, and each query is then re-scored alone.


@dataclass(frozen=True)
class QueryBank:
    """What QB-Norm keeps of a querybank's [bank queries, gallery] similarities, one entry per gallery item."""

    active: np.ndarray  # bool: the item is among some bank query's top k (the "activation set")
    log_norm: np.ndarray  # float64: log sum over bank queries b of exp(beta * bank_sim[b, item])
    beta: float
    k: int
    size: int  # number of bank queries


def build_querybank(bank_sim: ArrayLike, beta: float = 20.0, k: int = 1, chunk: int = 4096) -> QueryBank:
    """Summarise a [bank queries, gallery] similarity matrix for ``dynamic_inverted_softmax``.

    ``beta`` is the inverse temperature (the paper's default, 20) and multiplies the similarities as given, so only
    beta x similarity counts: beta 20 on cosine similarities is beta 0.2 on CLIP4Clip's logits (100 x cosine).
    ``k`` = 1 is the paper's activation set. Rows are read ``chunk`` at a time in float64 with a
    running log-sum-exp, so a bank of a few hundred thousand captions needs no float64 copy of the whole matrix.
    """
    bank = _as_numpy(bank_sim)
    if bank.ndim != 2 or bank.shape[0] == 0 or bank.shape[1] == 0:
        raise ValueError(f"build_querybank: expected a non-empty 2-D [bank, gallery] matrix, got {tuple(bank.shape)}")
    if not beta > 0:
        raise ValueError(f"build_querybank: beta must be positive, got {beta}")
    if not 1 <= k <= bank.shape[1]:
        raise ValueError(f"build_querybank: k must be in [1, {bank.shape[1]}] (the gallery size), got {k}")
    active = np.zeros(bank.shape[1], dtype=bool)
    log_norm = np.full(bank.shape[1], -np.inf)
    for start in range(0, bank.shape[0], chunk):
        part = beta * bank[start : start + chunk].astype(np.float64)
        if not np.all(np.isfinite(part)):
            raise ValueError("build_querybank: bank similarities (times beta) must be finite")
        # ties go to the lower gallery index, as argmax does for the queries in dynamic_inverted_softmax
        active[np.argsort(-part, axis=1, kind="stable")[:, :k]] = True
        peak = part.max(axis=0)
        log_norm = np.logaddexp(log_norm, peak + np.log(np.exp(part - peak).sum(axis=0)))
    return QueryBank(active=active, log_norm=log_norm, beta=float(beta), k=k, size=bank.shape[0])


def dynamic_inverted_softmax(sim: ArrayLike, bank: QueryBank) -> np.ndarray:
    """QB-Norm's dynamic inverted softmax of one query's [gallery] scores or of a [queries, gallery] matrix (float64).

    A query whose best-scoring gallery item is in the bank's activation set gets the inverted softmax over the
    bank for every item, exp(beta * s) / sum_b exp(beta * bank_sim[b, item]), which lowers hubs (items that many
    bank queries score highly); any other query keeps its scores unchanged. The decision is per query, not per
    item, because a normalised score and a raw one are on different scales and cannot be ranked together.
    Normalised rows are returned as the log of the inverted softmax, beta * s - log_norm: the same order, and
    finite where exp(beta * s) would overflow. Each row is independent of the others, so scoring one query at a
    time gives the same numbers as scoring the matrix. For video-to-text, pass video queries against caption
    gallery with a bank built from training videos against the same captions; -inf padding rows stay -inf.
    """
    scores = _as_numpy(sim).astype(np.float64)
    rows = scores[None] if scores.ndim == 1 else scores
    if rows.ndim != 2 or rows.shape[1] != bank.active.shape[0]:
        raise ValueError(
            f"dynamic_inverted_softmax: expected [gallery] or [queries, gallery] scores with gallery = "
            f"{bank.active.shape[0]} (the bank's), got shape {tuple(scores.shape)}"
        )
    normalise = bank.active[rows.argmax(axis=1)]
    out = np.where(normalise[:, None], bank.beta * rows - bank.log_norm, rows)
    return out[0] if scores.ndim == 1 else out
