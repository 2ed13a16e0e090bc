"""MSVD on the real split lists and captions (raw-captions.pkl rebuilt from captions_msvd.json), tiny videos."""

from __future__ import annotations

import json
import logging
import os
import pickle

import numpy as np
import pytest
from conftest import write_video
from open_clip.tokenizer import SimpleTokenizer as OpenClipTokenizer

from dataloaders.dataloader_msvd_retrieval import MSVD_DataLoader

SOT, EOT = 49406, 49407
SMALL = dict(max_words=20, max_frames=2, image_resolution=32)


@pytest.fixture(scope="module")
def msvd(real_annotations, tmp_path_factory):
    """The real lists, raw-captions.pkl in the original's {id: [[word, ...], ...]} form, and one tiny clip linked
    under every id."""
    root = tmp_path_factory.mktemp("msvd")
    with open(real_annotations / "msvd" / "captions_msvd.json") as f:
        captions = json.load(f)
    (root / "raw-captions.pkl").write_bytes(pickle.dumps({k: [c.split() for c in v] for k, v in captions.items()}))
    clip = write_video(root / "clip.avi", n_frames=30, fps=10, size=(40, 32))
    (root / "videos").mkdir()
    for subset in ("train", "val", "test"):
        src = real_annotations / "msvd" / f"{subset}_list.txt"
        (root / src.name).write_bytes(src.read_bytes())
        for video_id in src.read_text().split():
            os.symlink(clip, root / "videos" / f"{video_id}.avi")
    return root, captions


def test_real_test_split(msvd, tokenizer, caplog):
    root, captions = msvd
    with caplog.at_level(logging.INFO, logger="dataloaders"):
        ds = MSVD_DataLoader("test", str(root), str(root / "videos"), tokenizer, **SMALL)
    out = "\n".join(r.getMessage() for r in caplog.records)
    assert len(ds) == ds.sentence_num == 27763 and ds.video_num == 670
    assert len(ds.cut_off_points) == 670 and ds.cut_off_points[-1] == 27763
    assert ds.multi_sentence_per_video is True
    assert max(np.diff([0] + ds.cut_off_points)) == 81
    assert out.splitlines() == [
        "For test, sentence number: 27763",
        "For test, video number: 670",
        "Video number: 670",
        "Total Paire: 27763",
    ]
    reference = OpenClipTokenizer()
    ids = (root / "test_list.txt").read_text().split()
    for idx, (video_id, k) in {0: (ids[0], 0), 27762: (ids[-1], len(captions[ids[-1]]) - 1)}.items():
        text, mask, segment, video, video_mask = ds[idx]
        body = reference.encode(" ".join(captions[video_id][k].split()))[:18]
        expected = [SOT] + body + [EOT]
        assert text[0].tolist() == expected + [0] * (20 - len(expected))
        assert mask[0].tolist() == [1] * len(expected) + [0] * (20 - len(expected))
        assert text.dtype == mask.dtype == segment.dtype == video_mask.dtype == np.int64 and not segment.any()
        assert video.shape == (1, 2, 1, 3, 32, 32) and video.dtype == np.float64
        assert video_mask.tolist() == [[1, 1]]
    direct = ds.rawVideoExtractor.get_video_sample(ds.video_dict[ids[-1]], 2)
    assert np.array_equal(video, direct[0])


@pytest.mark.parametrize("subset, videos, sentences", [("train", 1200, 48774), ("val", 100, 4290)])
def test_real_train_and_val_counts(msvd, tokenizer, caplog, subset, videos, sentences):
    root, _captions = msvd
    with caplog.at_level(logging.INFO, logger="dataloaders"):
        ds = MSVD_DataLoader(subset, str(root), str(root / "videos"), tokenizer, **SMALL)
    assert len(ds) == sentences and len(ds.cut_off_points) == videos and ds.cut_off_points[-1] == sentences
    assert ds.multi_sentence_per_video is True  # set for train too, as the original
    assert hasattr(ds, "sentence_num") == (subset == "val")
    assert f"Total Paire: {sentences}" in caplog.text


def test_listed_video_without_captions_names_the_files(tmp_path, tokenizer):
    (tmp_path / "videos").mkdir()
    (tmp_path / "raw-captions.pkl").write_bytes(pickle.dumps({"a": [["x"]]}))
    (tmp_path / "val_list.txt").write_text("a\n\nb\n")
    with pytest.raises(
        ValueError,
        match=r"raw-captions\.pkl, key 'b': expected captions for every video of "
        r".*val_list\.txt \(line 3 lists it\)",
    ):
        MSVD_DataLoader("val", str(tmp_path), str(tmp_path / "videos"), tokenizer)
    with pytest.raises(ValueError, match="subset must be one of"):
        MSVD_DataLoader("dev", str(tmp_path), str(tmp_path / "videos"), tokenizer)


def test_a_video_listed_twice_is_named(tmp_path, tokenizer, caplog):
    (tmp_path / "videos").mkdir()
    (tmp_path / "raw-captions.pkl").write_bytes(pickle.dumps({"a": [["x"]], "b": [["y"]]}))
    (tmp_path / "val_list.txt").write_text("a\nb\na\n")
    with caplog.at_level(logging.WARNING, logger="dataloaders"):
        with pytest.raises(ValueError, match="have no file under"):  # the warning comes first, with the list read
            MSVD_DataLoader("val", str(tmp_path), str(tmp_path / "videos"), tokenizer)
    assert "val_list.txt lists 1 video id(s) more than once: a; each listing adds" in caplog.text
