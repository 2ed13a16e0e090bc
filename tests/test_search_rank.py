"""search/rank.py: the best rows of an index by score, ties in index order."""

from __future__ import annotations

import numpy as np

from search.rank import top_k


def test_top_k_matches_a_full_sort_and_orders_ties_by_index():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((50, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    emb[7] = emb[3]  # a tie, and the best match of the first query
    queries = np.stack([emb[3], rng.standard_normal(8).astype(np.float32)])
    idx, scores = top_k(emb, queries, 5, 2.0)
    full = 2.0 * (queries @ emb.T)
    np.testing.assert_array_equal(idx, np.argsort(-full, axis=1, kind="stable")[:, :5])
    np.testing.assert_allclose(scores, np.take_along_axis(full, idx, 1), rtol=1e-6)
    assert list(idx[0, :2]) == [3, 7]
    idx_all, _ = top_k(emb[:3], queries, 10, 1.0)
    assert idx_all.shape == (2, 3)
