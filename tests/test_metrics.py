"""Retrieval metrics against hand-computed values and independent straightforward loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metrics import (
    compute_metrics,
    dual_softmax_rerank,
    multi_sentence_tensor,
    retrieval_metrics,
    tensor_text_to_video_metrics,
    tensor_video_to_text_sim,
)


def loop_ranks(x: np.ndarray) -> list:
    """The definition, spelled out: every position of the descending-sorted row that holds the diagonal score."""
    ranks = []
    for i, row in enumerate(x.tolist()):
        ordered = sorted(row, reverse=True)
        ranks += [pos for pos, v in enumerate(ordered) if v == row[i]]
    return ranks


def matrix_with_ranks(ranks: list) -> np.ndarray:
    """Square matrix whose row i puts the ground truth at descending position ranks[i], no ties."""
    n = len(ranks)
    x = np.zeros((n, n), dtype=np.float32)
    for i, r in enumerate(ranks):
        others = [j for j in range(n) if j != i]
        order = others[:r] + [i] + others[r:]  # descending order of columns
        for pos, j in enumerate(order):
            x[i, j] = n - pos
    return x


def test_identity():
    m = compute_metrics(np.eye(5, dtype=np.float32))
    assert m["R1"] == 100.0 and m["R5"] == 100.0 and m["R10"] == 100.0
    assert m["MR"] == 1.0 and m["MedianR"] == 1.0 and m["MeanR"] == 1.0
    assert m["cols"] == [0, 0, 0, 0, 0]


def test_known_permutation():
    ranks = [0, 1, 4, 5, 9, 10, 11, 0, 2, 3, 6, 7]
    x = matrix_with_ranks(ranks)
    m = compute_metrics(x)
    assert m["cols"] == ranks
    assert m["R1"] == pytest.approx(100 * 2 / 12)  # ranks 0, 0
    assert m["R5"] == pytest.approx(50.0)  # 0, 1, 4, 0, 2, 3
    assert m["R10"] == pytest.approx(100 * 10 / 12)  # all but 10, 11
    assert m["MR"] == 5.5 and m["MedianR"] == 5.5  # sorted 0 0 1 2 3 4 | 5 6 7 9 10 11: (4 + 5) / 2 + 1
    assert m["MeanR"] == pytest.approx(58 / 12 + 1)  # sum of ranks = 58
    # A torch tensor gives the same numbers (the original feeds it tensor_video_to_text_sim's output).
    assert compute_metrics(torch.from_numpy(x)) == m


def test_ties_add_entries():
    x = np.array([[0.5, 0.5, 0.1], [0.2, 0.9, 0.9], [0.3, 0.3, 0.3]], dtype=np.float32)
    m = compute_metrics(x)
    # row 0: 0.5 at positions 0, 1; row 1: 0.9 at 0, 1; row 2: all three tie -> 7 entries
    assert m["cols"] == [0, 1, 0, 1, 0, 1, 2]
    assert m["R1"] == pytest.approx(300 / 7)  # 3 of 7 entries are 0
    assert m["R5"] == 100.0
    assert m["MR"] == 2.0  # median of 0 0 0 1 1 1 2 is 1
    assert m["MeanR"] == pytest.approx(5 / 7 + 1)


def test_non_finite_ground_truth_drops_the_query():
    x = np.array([[1.0, 0.0, 0.0], [0.0, np.nan, 0.0], [0.0, 2.0, -np.inf]], dtype=np.float32)
    m = compute_metrics(x)
    assert m["cols"] == [0]  # rows 1 (NaN) and 2 (-inf) match nowhere
    assert m["R1"] == 100.0


def test_matches_loop_on_random_ties():
    rng = np.random.default_rng(0)
    for n in (1, 7, 40):
        x = rng.integers(0, 4, size=(n, n)).astype(np.float32)  # many ties
        ranks = loop_ranks(x)
        m = compute_metrics(x)
        assert m["cols"] == ranks
        assert m["R5"] == pytest.approx(100 * sum(r < 5 for r in ranks) / len(ranks))
        assert m["MeanR"] == pytest.approx(sum(ranks) / len(ranks) + 1)


def test_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        compute_metrics(np.zeros((3, 2, 2)))
    with pytest.raises(ValueError, match="queries <= items"):
        compute_metrics(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="nothing to rank"):
        compute_metrics(np.full((2, 2), np.nan))


def test_numpy_median_averages_torch_median_takes_lower():
    x = matrix_with_ranks([0, 1, 2, 3])
    assert compute_metrics(x)["MR"] == 2.5  # ranks+1 = 1 2 3 4: (2 + 3) / 2
    assert tensor_text_to_video_metrics(x[:, None, :])["MedianR"] == 2.0  # torch.median: lower middle


def test_text_to_video_r_at_k_is_float32():
    m = tensor_text_to_video_metrics(matrix_with_ranks([0, 1, 2])[:, None, :])
    assert m["R1"] == 33.33333206176758  # float32(100 / 3), not 33.333333333333336
    assert m["R5"] == 100.0 and m["MedianR"] == 2.0 and m["MeanR"] == 2.0


NEG = float("-inf")
# 2 videos; video 0 has 3 captions, video 1 has 2 and one -inf padding row. [video, caption, video]
PADDED = torch.tensor(
    [
        [
            [0.9, 0.1],  # v0 c0: rank 0
            [0.2, 0.8],  # v0 c1: rank 1
            [0.5, 0.4],
        ],  # v0 c2: rank 0
        [
            [0.3, 0.7],  # v1 c0: rank 0
            [0.6, 0.2],  # v1 c1: rank 1
            [NEG, NEG],
        ],  # v1 c2: padding
    ],
    dtype=torch.float64,
)


@pytest.mark.parametrize("pad", [NEG, float("nan")])
def test_text_to_video_padded(pad):
    sim = PADDED.clone()
    sim[1, 2] = pad
    m = tensor_text_to_video_metrics(sim)
    # valid ranks 0 0 1 1 0 (5 captions); ranks+1 = 1 1 2 2 1
    assert m["R1"] == 60.0 and m["R5"] == 100.0 and m["R10"] == 100.0
    assert m["MedianR"] == 1.0 and m["MR"] == 1.0
    assert m["MeanR"] == pytest.approx(1.4)  # 7 / 5
    assert m["Std_Rank"] == pytest.approx(math.sqrt(0.24))  # (3 * 0.4**2 + 2 * 0.6**2) / 5 = 0.24
    assert list(m) == ["R1", "R5", "R10", "MedianR", "MeanR", "Std_Rank", "MR"]
    assert tensor_text_to_video_metrics(sim.numpy(), top_k=[1, 2])["R2"] == 100.0


def test_text_to_video_matches_loop():
    gen = torch.Generator().manual_seed(0)
    counts = [3, 1, 4, 2, 4, 2]
    v, max_len = len(counts), max(counts)
    sim = torch.full((v, max_len, v), NEG, dtype=torch.float64)
    for i, c in enumerate(counts):
        sim[i, :c] = torch.rand(c, v, generator=gen, dtype=torch.float64)
    ranks = []  # (caption slot, video) order, as the original flattens
    for slot in range(max_len):
        for i in range(v):
            if slot < counts[i]:
                row = sim[i, slot].tolist()
                ranks.append(sum(s > row[i] for s in row))
    m = tensor_text_to_video_metrics(sim)
    assert m["R1"] == pytest.approx(100 * ranks.count(0) / len(ranks), rel=1e-6)
    assert m["MeanR"] == pytest.approx(np.mean(ranks) + 1)
    assert m["MedianR"] == sorted(ranks)[(len(ranks) - 1) // 2] + 1


def test_video_to_text_sim_max_over_captions():
    sim = PADDED.clone()
    sim[1, 2] = float("nan")
    before = sim.clone()
    vt = tensor_video_to_text_sim(sim)
    # best of video 0's captions vs videos 0, 1: 0.9, 0.8; of video 1's: 0.6, 0.7 -> transposed
    assert torch.equal(vt, torch.tensor([[0.9, 0.6], [0.8, 0.7]], dtype=torch.float64))
    assert torch.equal(torch.isnan(sim), torch.isnan(before))  # the caller's tensor is left alone
    m = compute_metrics(vt)
    assert m["cols"] == [0, 1] and m["R1"] == 50.0  # row 0: 0.9 > 0.6; row 1: 0.7 < 0.8, rank 1
    with pytest.raises(ValueError, match="max_captions"):
        tensor_video_to_text_sim(torch.zeros(2, 2))


def test_dual_softmax_hand_example():
    ln2, ln3 = math.log(2), math.log(3)
    sim = np.array([[ln3, ln2], [0.0, ln2]])
    # column 0: softmax(ln3, 0) = (3/4, 1/4) -> prior x2 = (1.5, 0.5); column 1: (1/2, 1/2) -> (1, 1)
    expected = np.array([[1.5 * ln3, ln2], [0.0, ln2]])
    out = dual_softmax_rerank(sim)
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    # temperature divides: doubling scores and temperature keeps the prior
    np.testing.assert_allclose(dual_softmax_rerank(2 * sim, temperature=2.0), 2 * expected, rtol=1e-12)


def test_dual_softmax_matches_loop_and_reranks():
    # Both texts prefer video 0; text 0 prefers it more, so DSL hands video 1 to text 1.
    sim = torch.tensor([[5.0, 1.0], [4.0, 3.0]])
    out = dual_softmax_rerank(sim)
    for q in range(2):
        for i in range(2):
            z = sum(math.exp(sim[k, i].item()) for k in range(2))
            prior = math.exp(sim[q, i].item()) / z * 2
            assert out[q, i].item() == pytest.approx(sim[q, i].item() * prior, rel=1e-6)
    assert torch.argmax(sim[1]).item() == 0 and torch.argmax(out[1]).item() == 1
    assert compute_metrics(sim)["R1"] == 50.0 and compute_metrics(out)["R1"] == 100.0
    with pytest.raises(ValueError, match="temperature"):
        dual_softmax_rerank(sim, temperature=0)


def test_multi_sentence_tensor_and_metrics_by_hand():
    # 2 videos; video 0 has captions 0, 1 and video 1 has caption 2 (cut_off_points = cumulative counts).
    sim = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7]], dtype=np.float32)
    tensor = multi_sentence_tensor(sim, [2, 3])
    assert tensor.shape == (2, 2, 2) and tensor.dtype == np.float64
    assert np.array_equal(tensor[0], sim[:2]) and np.array_equal(tensor[1, 0], sim[2])
    assert np.all(np.isneginf(tensor[1, 1]))
    tv, vt = retrieval_metrics(sim, [2, 3])
    # captions: 0 → video 0 rank 1, 1 → video 0 rank 2, 2 → video 1 rank 1
    assert tv["R1"] == pytest.approx(200 / 3) and tv["MR"] == 1.0 and tv["MeanR"] == pytest.approx(4 / 3)
    # video→text scores the caption groups by their best caption: video 0 sees (group 0: 0.9, group 1: 0.3),
    # rank 1; video 1 sees (group 0: max(0.1, 0.8), group 1: 0.7), rank 2
    assert vt["R1"] == 50.0 and vt["MeanR"] == 1.5
    single_tv, single_vt = retrieval_metrics(sim[:2], None)
    assert single_tv == compute_metrics(sim[:2]) and single_vt == compute_metrics(sim[:2].T)
