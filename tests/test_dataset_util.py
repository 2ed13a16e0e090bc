"""dataset_util: caption encoding, annotation readers, restricted unpickler, video discovery, missing and undecodable
videos (through a tiny MSVD layout, the simplest real dataset)."""

from __future__ import annotations

import logging
import os
import pickle
import pickletools
import random

import numpy as np
import pytest
from conftest import write_video

from dataloaders import dataset_util
from dataloaders.dataloader_msvd_retrieval import MSVD_DataLoader
from dataloaders.dataset_util import (
    clip_window,
    encode_caption,
    find_videos,
    find_videos_flat,
    load_raw_captions,
    read_csv,
    read_id_list,
    read_json,
    read_lines,
)
from util import UsageError

SOT, EOT = 49406, 49407


# ---------------------------------------------------------------------------------------------------------- captions
@pytest.mark.parametrize(
    "caption", ["a person is connecting something to system", "A DOG!  runs,   fast", "", "un café très éloigné"]
)
def test_encode_caption_matches_open_clip(tokenizer, reference, caption):
    ids, mask, segment = encode_caption(tokenizer, caption, max_words=20)
    body = reference.encode(caption)
    expected = [SOT] + body + [EOT]
    assert len(expected) <= 20
    assert ids.shape == mask.shape == segment.shape == (1, 20)
    assert ids.dtype == mask.dtype == segment.dtype == np.int64
    assert ids[0].tolist() == expected + [0] * (20 - len(expected))
    assert mask[0].tolist() == [1] * len(expected) + [0] * (20 - len(expected))
    assert not segment.any()


def test_encode_caption_truncates_bpe_tokens_and_keeps_end_token(tokenizer, reference):
    caption = "the quick brown fox jumps over the lazy dog while unbelievably antidisestablishmentarian crowds cheer"
    body = reference.encode(caption)
    assert len(body) > 10
    for max_words in (2, 5, 11):
        ids, mask, _ = encode_caption(tokenizer, caption, max_words)
        assert ids[0].tolist() == [SOT] + body[: max_words - 2] + [EOT]
        assert mask.sum() == max_words


def test_clip_window_follows_the_original_cleanup():
    assert clip_window(0, 31) == (0, 31)
    assert clip_window(0, 0) == (0, 1)  # equal: one more second
    assert clip_window(7, 3) == (3, 7)  # swapped
    assert clip_window(-4, 5) == (0, 5)  # negatives to 0
    assert clip_window(-4, -2) == (0, 1)
    assert clip_window(2.9, 10.7) == (2, 10)  # int() truncation


# ------------------------------------------------------------------------------------------------------- annotations
def test_read_csv_errors_name_file_and_line(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("video_id,sentence\nvideo1,a cat\nvideo2,\n")
    with pytest.raises(ValueError, match=r"a\.csv, line 3, column 'sentence': expected a non-empty value"):
        read_csv(str(path), ("video_id", "sentence"))
    path.write_text("vid,sentence\nvideo1,a cat\n")
    with pytest.raises(ValueError, match=r"a\.csv, line 1 \(header\): expected columns \['video_id', 'sentence'\]"):
        read_csv(str(path), ("video_id", "sentence"))
    path.write_text("video_id,sentence\nvideo1,a cat\nvideo2,a,dog,extra\n")
    with pytest.raises(ValueError, match=r"a\.csv, parsing: .*line 3"):
        read_csv(str(path), ("video_id", "sentence"))
    path.write_text("video_id,sentence\nvideo1,a cat\n")
    frame = read_csv(str(path), ("video_id", "sentence"))
    assert frame["video_id"].tolist() == ["video1"] and frame["sentence"].tolist() == ["a cat"]


def test_read_json_error_names_line_and_column(tmp_path):
    path = tmp_path / "b.json"
    path.write_text('{"a": [1, 2,\n  3,, 4]}')
    with pytest.raises(ValueError, match=r"b\.json, line 2 column 5: expected valid JSON"):
        read_json(str(path))


def test_read_id_list_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("a \n\n b\nc\n\n")
    assert read_id_list(str(path)) == [(1, "a"), (3, "b"), (4, "c")]


def test_raw_captions_roundtrip(tmp_path):
    captions = {"vid_1_2": [["a", "man", "sings"], ["someone", "sings"]], "vid_3_4": [["a", "dog"]]}
    path = tmp_path / "raw-captions.pkl"
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        path.write_bytes(pickle.dumps(captions, protocol=protocol))
        assert load_raw_captions(str(path)) == captions


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_raw_captions_unpickler_refuses_code_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "raw-captions.pkl"
    path.write_bytes(pickle.dumps({"vid": [["a", "b"]], "evil": _Exploit(marker)}))
    with pytest.raises(ValueError, match=r"raw-captions\.pkl, unpickling: .*(posix|os)\.system.*only dicts"):
        load_raw_captions(str(path))
    assert not marker.exists()
    # Sanity, without executing it: the bytes really call os.system on the command (a real exploit).
    opcodes = [(op.name, arg) for op, arg, _pos in pickletools.genops(path.read_bytes())]
    assert any(name == "STACK_GLOBAL" for name, _ in opcodes)
    assert {arg for _name, arg in opcodes} >= {os.system.__module__, "system", f"touch {marker}"}


def test_raw_captions_shape_errors_name_the_key(tmp_path):
    path = tmp_path / "raw-captions.pkl"
    path.write_bytes(pickle.dumps({"ok": [["a"]], "bad": ["a caption as a string"]}))
    with pytest.raises(ValueError, match=r"key 'bad', caption 0: expected a list of words"):
        load_raw_captions(str(path))
    path.write_bytes(pickle.dumps([["a"]]))
    with pytest.raises(ValueError, match=r"top level: expected a dict"):
        load_raw_captions(str(path))
    path.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"raw-captions\.pkl, unpickling"):
        load_raw_captions(str(path))


# ------------------------------------------------------------------------------------------------------------ videos
def test_find_videos_by_stem_and_by_name(tmp_path):
    for rel in ("a/x1.mp4", "a/b/x2.avi", "x3.v2.webm", "noext", "x4.mp4"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    found = find_videos(str(tmp_path), ["x1", "x2", "x3.v2", "noext", "zz"])
    assert found == {
        "x1": str(tmp_path / "a/x1.mp4"),
        "x2": str(tmp_path / "a/b/x2.avi"),
        "x3.v2": str(tmp_path / "x3.v2.webm"),
    }
    assert find_videos(str(tmp_path), ["x1.mp4", "x1"], by_stem=False) == {"x1.mp4": str(tmp_path / "a/x1.mp4")}
    with pytest.raises(UsageError, match="not a directory"):
        find_videos(str(tmp_path / "nope"), ["x1"])


def test_find_videos_flat_prefers_mp4_then_webm(tmp_path):
    for name in ("v1.mp4", "v1.webm", "v2.webm", "v3.avi"):
        (tmp_path / name).write_bytes(b"")
    found = find_videos_flat(str(tmp_path), ["v1", "v2", "v3"], (".mp4", ".webm"))
    assert found == {"v1": str(tmp_path / "v1.mp4"), "v2": str(tmp_path / "v2.webm")}


# ------------------------------------------------------------------------------------------- missing / undecodable
@pytest.fixture(scope="module")
def msvd_layout(tmp_path_factory):
    """Four MSVD-style videos (v0 and v2 unreadable bytes), three captions each, train and test lists."""
    root = tmp_path_factory.mktemp("msvd")
    videos = root / "videos"
    write_video(videos / "v1.avi", n_frames=30, fps=10, size=(40, 32))
    write_video(videos / "v3.avi", n_frames=20, fps=10, size=(40, 32), seed=3)
    for name in ("v0.avi", "v2.avi"):
        (videos / name).write_bytes(b"this is not a video file at all" * 4)
    ids = ["v0", "v1", "v2", "v3"]
    captions = {v: [f"caption {k} of {v}".split() for k in range(3)] for v in ids}
    (root / "raw-captions.pkl").write_bytes(pickle.dumps(captions))
    (root / "train_list.txt").write_text("\n".join(ids) + "\n")
    (root / "test_list.txt").write_text("\n".join(ids) + "\n")
    return root


def _msvd(root, subset, tokenizer, **kw):
    return MSVD_DataLoader(
        subset, str(root), str(root / "videos"), tokenizer, max_words=12, max_frames=2, image_resolution=32, **kw
    )


def test_training_replaces_undecodable_samples_deterministically(msvd_layout, tokenizer, caplog):
    ds = _msvd(msvd_layout, "train", tokenizer)
    assert len(ds) == 12
    random.seed(5)
    with caplog.at_level(logging.WARNING, logger="dataloaders"):
        items = [ds[i] for i in (0, 4, 6)]  # v0 (bad), v1 (good), v2 (bad)
    assert ds.n_replaced >= 2 and ds.n_undecodable == ds.n_replaced
    assert set(ds.undecodable_videos) <= {str(msvd_layout / "videos" / n) for n in ("v0.avi", "v2.avi")}
    assert sum("replaced by sample" in r.getMessage() for r in caplog.records) == ds.n_replaced
    for _text, _mask_t, _seg, video, video_mask in items:
        assert video_mask.sum() == 2 and np.abs(video[0, :2]).sum() > 0  # never an all-zero video
    # the replacement's caption comes with it: the text is one of a decodable video's captions
    decodable = {tuple(ds._get_text(c)[0][0]) for v, c, *_ in ds.all_pairs() if v in ("v1", "v3")}
    assert all(tuple(t[0]) in decodable for t, *_ in items)
    # same RNG state → same replacements
    again = _msvd(msvd_layout, "train", tokenizer)
    random.seed(5)
    for (a, *_), (b, *_) in zip(items, [again[i] for i in (0, 4, 6)]):
        assert np.array_equal(a, b)
    assert again.n_replaced == ds.n_replaced


def test_evaluation_keeps_zero_frames_but_counts_them(msvd_layout, tokenizer, caplog):
    ds = _msvd(msvd_layout, "test", tokenizer)
    with caplog.at_level(logging.WARNING, logger="dataloaders"):
        text, _m, _s, video, video_mask = ds[0]  # v0: undecodable
    assert video_mask.sum() == 0 and not video.any()
    assert ds.n_undecodable == 1 and ds.n_replaced == 0
    assert any("no frame decoded" in r.getMessage() and "v0.avi" in r.getMessage() for r in caplog.records)
    assert text[0, 1:4].tolist() == encode_caption(tokenizer, "caption 0 of v0", 12)[0][0, 1:4].tolist()
    *_, video_mask = ds[3]  # v1: decodable
    assert video_mask.sum() == 2 and ds.n_undecodable == 1


def test_training_gives_up_when_nothing_decodes(tmp_path, tokenizer, monkeypatch):
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "v0.avi").write_bytes(b"junk")
    (tmp_path / "raw-captions.pkl").write_bytes(pickle.dumps({"v0": [["a"]]}))
    (tmp_path / "train_list.txt").write_text("v0\n")
    monkeypatch.setattr(dataset_util, "MAX_REPLACEMENTS", 3)
    ds = _msvd(tmp_path, "train", tokenizer)
    with pytest.raises(RuntimeError, match=r"3 samples in a row had no decodable frame .*check_dataset"):
        ds[0]
    assert ds.n_replaced == 3


def test_missing_videos_raise_one_error_listing_them(tmp_path, tokenizer):
    (tmp_path / "videos").mkdir()
    ids = [f"m{i:02d}" for i in range(13)] + ["here"]
    (tmp_path / "videos" / "here.mp4").write_bytes(b"")
    (tmp_path / "raw-captions.pkl").write_bytes(pickle.dumps({v: [["a", "b"]] for v in ids}))
    (tmp_path / "train_list.txt").write_text("\n".join(ids))
    (tmp_path / "test_list.txt").write_text("\n".join(ids))
    with pytest.raises(UsageError) as err:
        _msvd(tmp_path, "train", tokenizer)
    message = str(err.value)
    assert "13 of 14 videos listed in" in message and "train_list.txt" in message
    assert str(tmp_path / "videos") in message and "m00, m01" in message and "m09 and 3 more" in message
    assert "m10" not in message and "--skip_missing_videos" in message


def test_skip_missing_drops_in_training_and_announces_in_evaluation(tmp_path, tokenizer, caplog):
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "b.mp4").write_bytes(b"")
    (tmp_path / "raw-captions.pkl").write_bytes(pickle.dumps({v: [["x"], ["y"]] for v in "abc"}))
    (tmp_path / "train_list.txt").write_text("a\nb\nc\n")
    (tmp_path / "test_list.txt").write_text("a\nb\nc\n")
    with caplog.at_level(logging.WARNING, logger="dataloaders"):
        train = _msvd(tmp_path, "train", tokenizer, skip_missing=True)
    assert len(train) == 2 and train.cut_off_points == [2] and train.missing_videos == ["a", "c"]
    assert any("2 of 3 videos" in r.getMessage() and "training without them" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dataloaders"):
        test = _msvd(tmp_path, "test", tokenizer, skip_missing=True)
    assert (test.sentence_num, test.video_num) == (2, 1)
    # Logged, not printed: nothing needs stdout redirection.
    assert any("evaluating on 1 of 3 videos" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert "Total Paire: 2" in caplog.text


def test_read_lines_splits_only_where_the_original_does(tmp_path):
    # U+2028, U+0085, form feed, vertical tab and \x1c-\x1e are text inside a caption, not line ends.
    caption = "a\u2028b\u0085c\x0cd\x0be\x1cf\x1dg\x1eh"
    path = tmp_path / "captions.csv"
    path.write_bytes(f"{caption}\tx\r\nsecond\rthird\nlast".encode())
    assert read_lines(str(path)) == [caption + "\tx", "second", "third", "last"]
    path.write_bytes(b"one\n\ntwo\n")
    assert read_lines(str(path)) == ["one", "", "two"]


def test_what_is_not_a_regular_file_is_no_video(tmp_path):
    from dataloaders.dataset_util import find_videos, find_videos_flat

    (tmp_path / "good.mp4").write_bytes(b"x")
    (tmp_path / "folder.mp4").mkdir()
    (tmp_path / "dangling.mp4").symlink_to(tmp_path / "gone.mp4")
    os.mkfifo(tmp_path / "pipe.mp4")
    (tmp_path / "linked.mp4").symlink_to(tmp_path / "good.mp4")
    wanted = ["good", "folder", "dangling", "pipe", "linked"]
    expected = {"good": str(tmp_path / "good.mp4"), "linked": str(tmp_path / "linked.mp4")}
    assert find_videos(str(tmp_path), wanted) == expected
    assert find_videos_flat(str(tmp_path), wanted, [".mp4"]) == expected
