"""Retrieval metrics against hand-computed values and independent straightforward loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metrics import (
    QueryBank,
    build_querybank,
    compute_metrics,
    dual_softmax_rerank,
    dynamic_inverted_softmax,
    multi_sentence_tensor,
    print_computed_metrics,
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


# QB-Norm. The hand example uses beta = 1 and similarities that are logs of integers, so every exp is an integer.
# Gallery items A, B, C; four bank queries (rows), with their exp and top-1 item:
#   b1 = ln(6, 1, 2) -> A    b2 = ln(3, 1, 1) -> A    b3 = ln(1, 3, 2) -> B    b4 = ln(2, 4, 1) -> B
# Activation set (k = 1): {A, B}; C is no bank query's top-1 (with k = 2, b1's second item C joins).
# Normalisers, sum of exp per column: A = 6+3+1+2 = 12, B = 1+1+3+4 = 9, C = 2+1+2+1 = 6.
HAND_BANK = np.log([[6.0, 1, 2], [3, 1, 1], [1, 3, 2], [2, 4, 1]])


def test_querybank_by_hand():
    bank = build_querybank(HAND_BANK, beta=1.0)
    assert isinstance(bank, QueryBank) and bank.size == 4 and bank.k == 1 and bank.beta == 1.0
    assert bank.active.tolist() == [True, True, False]
    np.testing.assert_allclose(bank.log_norm, np.log([12.0, 9, 6]), rtol=1e-15)
    assert build_querybank(HAND_BANK, beta=1.0, k=2).active.tolist() == [True, True, True]
    # the running log-sum-exp over row chunks gives what one pass gives
    chunked = build_querybank(HAND_BANK, beta=1.0, chunk=3)
    np.testing.assert_allclose(chunked.log_norm, bank.log_norm, rtol=1e-15)


def test_dynamic_inverted_softmax_by_hand():
    bank = build_querybank(HAND_BANK, beta=1.0)
    sim = np.log([[5.0, 4, 1], [1, 2, 3], [2, 6, 1]])
    out = dynamic_inverted_softmax(sim, bank)
    # q1: top-1 A (active) -> (5/12, 4/9, 1/6) = (0.417, 0.444, 0.167): the hub A drops below B
    np.testing.assert_allclose(np.exp(out[0]), [5 / 12, 4 / 9, 1 / 6], rtol=1e-14)
    assert np.argmax(sim[0]) == 0 and np.argmax(out[0]) == 1
    # q2: top-1 C, outside the activation set -> the whole row keeps its raw scores
    assert np.array_equal(out[1], sim[1])
    # q3: top-1 B (active) -> (2/12, 6/9, 1/6)
    np.testing.assert_allclose(np.exp(out[2]), [1 / 6, 2 / 3, 1 / 6], rtol=1e-14)
    assert out.dtype == np.float64


def bank_and_queries(seed: int, n_bank: int, n_queries: int, gallery: int) -> tuple[np.ndarray, np.ndarray]:
    """Random similarities where the last two gallery items are no bank query's favourite but some queries' top-1."""
    rng = np.random.default_rng(seed)
    bank_sim, sim = rng.normal(size=(n_bank, gallery)), rng.normal(size=(n_queries, gallery))
    bank_sim[:, -2:] -= 10.0
    sim[: n_queries // 2, -1] += 10.0
    return bank_sim, sim


def test_dynamic_inverted_softmax_one_query_equals_matrix():
    bank_sim, sim = bank_and_queries(0, n_bank=40, n_queries=9, gallery=7)
    sim = sim.astype(np.float32)
    bank = build_querybank(bank_sim, beta=3.0)
    assert bank.active.tolist() == [True] * 5 + [False] * 2  # so both branches are exercised below
    whole = dynamic_inverted_softmax(sim, bank)
    assert 0 < bank.active[sim.argmax(axis=1)].sum() < len(sim)
    for q in range(len(sim)):
        assert np.array_equal(dynamic_inverted_softmax(sim[q], bank), whole[q])
        assert np.array_equal(dynamic_inverted_softmax(torch.from_numpy(sim[q]), bank), whole[q])
        # and each row by the definition, a plain loop over the bank
        if bank.active[np.argmax(sim[q])]:
            for j in range(7):
                z = sum(math.exp(3.0 * float(bank_sim[b, j])) for b in range(40))
                assert math.exp(whole[q, j]) == pytest.approx(math.exp(3.0 * float(sim[q, j])) / z, rel=1e-9)
        else:
            assert np.array_equal(whole[q], sim[q].astype(np.float64))


def test_dynamic_inverted_softmax_invariances():
    bank_sim, sim = bank_and_queries(1, n_bank=30, n_queries=8, gallery=6)
    bank = build_querybank(bank_sim, beta=2.0)
    out = dynamic_inverted_softmax(sim, bank)
    normalised = np.broadcast_to(bank.active[sim.argmax(axis=1)][:, None], sim.shape)
    assert 0 < normalised[:, 0].sum() < len(sim)
    # only beta x similarity counts: halve beta, double every similarity (raw rows are doubled too)
    np.testing.assert_allclose(
        dynamic_inverted_softmax(2 * sim, build_querybank(2 * bank_sim, beta=1.0)), np.where(normalised, out, 2 * sim)
    )
    # a shift of every similarity cancels in the normalised rows (beta*(s+c) - (log_norm + beta*c))
    shifted = dynamic_inverted_softmax(sim + 5.0, build_querybank(bank_sim + 5.0, beta=2.0))
    np.testing.assert_allclose(shifted[normalised], out[normalised], atol=1e-12)
    # a bank repeated twice adds log 2 to every normaliser: the activation set and every ranking stay
    doubled = build_querybank(np.concatenate([bank_sim, bank_sim]), beta=2.0)
    again = dynamic_inverted_softmax(sim, doubled)
    np.testing.assert_allclose(again[normalised], out[normalised] - math.log(2), atol=1e-12)


def test_dynamic_inverted_softmax_one_bank_query_and_huge_beta():
    sim = np.array([[0.9, 0.8, 0.1], [0.2, 0.3, 0.5]])
    # one bank query: log_norm = beta * b, so a normalised row ranks by s - b whatever beta is
    one = np.array([[0.5, 0.1, 0.0]])
    for beta in (1.0, 50.0, 1e6):
        out = dynamic_inverted_softmax(sim, build_querybank(one, beta=beta))
        np.testing.assert_allclose(out[0], beta * (sim[0] - one[0]), rtol=1e-12)  # top-1 A is the bank's
        assert np.array_equal(out[1], sim[1])  # top-1 C is not
    # a huge beta (exp(beta * s) overflows float64): the log-sum-exp tends to beta * column max, all finite
    bank_sim = np.array([[0.5, 0.1, 0.0], [0.4, 0.6, 0.2]])
    out = dynamic_inverted_softmax(sim, build_querybank(bank_sim, beta=1e4))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[0], 1e4 * (sim[0] - bank_sim.max(axis=0)), rtol=1e-12)


def test_querybank_bad_input():
    with pytest.raises(ValueError, match="beta"):
        build_querybank(HAND_BANK, beta=0.0)
    with pytest.raises(ValueError, match="k must be"):
        build_querybank(HAND_BANK, k=4)
    with pytest.raises(ValueError, match="2-D"):
        build_querybank(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="finite"):
        build_querybank(np.array([[0.0, np.inf]]))
    with pytest.raises(ValueError, match="gallery = 3"):
        dynamic_inverted_softmax(np.zeros((2, 4)), build_querybank(HAND_BANK))


def test_print_computed_metrics(capsys):
    # Identity matrix: every query ranks its item first, so R@1 = R@5 = R@10 = 100 and the median rank is 1.
    print_computed_metrics(compute_metrics(np.eye(3)))
    assert capsys.readouterr().out == "R@1: 100.0000 - R@5: 100.0000 - R@10: 100.0000 - Median R: 1.0\n"
