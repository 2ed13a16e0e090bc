"""search/querybank.py through retrieve.py: a caption bank stored at index time, QB-Norm ranking per query."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_video

import retrieve
from metrics import build_querybank, dynamic_inverted_softmax
from search.encode import index_model, text_embeddings
from search.index import load_index
from search.settings import AS_STORED

BANK = ["a red circle", "a red circle moves", "a blue square", "a green triangle", "a red circle again"]
QUERIES = ["a red circle moves left", "a blue square", "a yellow star"]


@pytest.fixture(scope="module")
def banked(tmp_path_factory, tiny_clip_file):
    root = tmp_path_factory.mktemp("videos")
    for i in range(4):
        write_video(root / f"v{i}.mp4", n_frames=8, fps=4, seed=i + 1)
    index_dir = tmp_path_factory.mktemp("index")
    captions = root.parent / "bank.txt"
    captions.write_text("\n".join(BANK) + "\n")
    argv = ["index", "--videos", str(root), "--index", str(index_dir), "--pretrained_clip_name", str(tiny_clip_file)]
    assert retrieve.main([*argv, "--max_frames", "2", "--num_workers", "0", "--qb_bank", str(captions)]) == 0
    return index_dir


def _search(index_dir, capsys, *queries):
    queries_file = index_dir.parent / "q.txt"
    queries_file.write_text("\n".join(queries) + "\n")
    argv = ["search", "--index", str(index_dir), "--queries", str(queries_file), "--top_k", "4", "--json", "--qb_norm"]
    capsys.readouterr()
    assert retrieve.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_qb_norm_search_equals_the_pure_functions_and_is_per_query(banked, capsys):
    index = load_index(banked)
    model = index_model(index, banked, AS_STORED, 32)
    bank = text_embeddings(model, BANK).float().numpy()
    np.testing.assert_allclose(np.load(banked / "qb_bank.npy"), bank, atol=1e-6)
    assert json.loads((banked / "qb_bank.json").read_text())["size"] == len(BANK)

    videos = np.asarray(index.embeddings)
    querybank = build_querybank(bank @ videos.T, beta=20.0)
    expected = dynamic_inverted_softmax(text_embeddings(model, QUERIES).float().numpy() @ videos.T, querybank)
    found = _search(banked, capsys, *QUERIES)
    for q, entry in enumerate(found):
        order = np.argsort(-expected[q], kind="stable")
        assert [r["id"] for r in entry["results"]] == order.tolist()
        np.testing.assert_allclose([r["score"] for r in entry["results"]], expected[q, order], rtol=1e-5, atol=1e-4)
    # One query alone gets the same list (to float32 matmul rounding): QB-Norm needs no other test query.
    alone = _search(banked, capsys, QUERIES[1])[0]["results"]
    assert [r["id"] for r in alone] == [r["id"] for r in found[1]["results"]]
    np.testing.assert_allclose([r["score"] for r in alone], [r["score"] for r in found[1]["results"]], atol=1e-5)


def test_qb_norm_without_a_bank_or_with_a_video_is_refused(banked, tmp_path, tiny_clip_file, capsys):
    (tmp_path / "v").mkdir()
    write_video(tmp_path / "v" / "a.mp4", n_frames=8, fps=4, seed=1)
    plain = tmp_path / "plain"
    argv = ["index", "--videos", str(tmp_path / "v"), "--index", str(plain), "--pretrained_clip_name"]
    assert retrieve.main([*argv, str(tiny_clip_file), "--max_frames", "2", "--num_workers", "0"]) == 0
    capsys.readouterr()
    assert retrieve.main(["search", "--index", str(plain), "--query", "a red circle", "--qb_norm"]) == 2
    assert "holds no querybank; add one with `retrieve.py index --qb_bank FILE`" in capsys.readouterr().err
    assert retrieve.main(["search", "--index", str(banked), "--video", "0", "--qb_norm"]) == 2
    assert "--qb_norm re-scores text queries" in capsys.readouterr().err
