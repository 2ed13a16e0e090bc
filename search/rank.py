"""Scores to ranked results: the best rows of an index for text or video queries, and captions for a video."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from search.encode import logit_scale, text_embeddings
from search.index import Index
from search.querybank import qb_normalised


def top_k(embeddings: np.ndarray, queries: np.ndarray, k: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` rows of ``embeddings`` for each query row: (indices, scores), each (Q, k), best first.

    score = scale * (query @ row): the matrix product first and then the scale, as in ``_loose_similarity``.
    Among the rows returned, equal scores are listed in index order.
    """
    return best_of(scale * (queries.astype(np.float32) @ np.asarray(embeddings, dtype=np.float32).T), k)


def best_of(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` columns of each row of a [queries, rows] score matrix: (indices, scores), ties in index order."""
    k = min(k, scores.shape[1])
    if k < scores.shape[1]:
        cand = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        cand = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    idx = np.empty((scores.shape[0], k), dtype=np.int64)
    for q in range(scores.shape[0]):
        c = cand[q]
        idx[q] = c[np.lexsort((c, -scores[q, c]))]
    return idx, np.take_along_axis(scores, idx, axis=1)


def ranked(index: Index, rows: np.ndarray, scores: np.ndarray) -> list[dict]:
    """One query's ``top_k`` output as ``[{"rank", "id", "path", "score"}, ...]``; ``id`` is the index row."""
    return [
        {"rank": r + 1, "id": int(i), "path": str(index.root / index.videos[i]["path"]), "score": float(s)}
        for r, (i, s) in enumerate(zip(rows, scores))
    ]


def rank_texts(
    index: Index, model, queries: Sequence[str], top: int, max_words: int = 32, bank: np.ndarray | None = None
) -> list[dict]:
    """Text → videos with a loaded model: for each query ``{"query", "results"}``, best first. With a QB-Norm
    ``bank`` (caption embeddings) each query is re-scored against it alone, and the scores are QB-Norm's."""
    text = text_embeddings(model, queries, max_words).float().cpu().numpy()
    if bank is not None:
        rows, scores = best_of(qb_normalised(index, bank, text), top)
    else:
        rows, scores = top_k(index.embeddings, text, top, logit_scale(model))
    return [{"query": q, "results": ranked(index, row, score)} for q, row, score in zip(queries, rows, scores)]


def rank_similar(index: Index, embedding: np.ndarray, top: int, scale: float, exclude: int | None = None) -> list[dict]:
    """Video → videos: the rows nearest ``embedding`` by the score text search uses, best first, without the
    row ``exclude`` (the query video itself, which would always come first)."""
    rows, scores = top_k(index.embeddings, embedding[None, :], top + (exclude is not None), scale)
    keep = rows[0] != (-1 if exclude is None else exclude)
    return ranked(index, rows[0][keep][:top], scores[0][keep][:top])


def rank_caption_texts(
    model, embedding: np.ndarray, captions: Sequence[str], top: int | None, max_words: int
) -> list[dict]:
    """Video → text: ``[{"rank", "caption", "score"}, ...]`` for the video ``embedding``, best first."""
    text = text_embeddings(model, captions, max_words).cpu().numpy()
    # One video against many captions: rank the captions, i.e. the columns of the (captions, 1) score matrix.
    order, col = top_k(text, embedding[None, :], top or len(captions), logit_scale(model))
    return [
        {"rank": r + 1, "caption": captions[i], "score": float(s)} for r, (i, s) in enumerate(zip(order[0], col[0]))
    ]
