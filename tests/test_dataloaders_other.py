"""LSMDC, ActivityNet and DiDeMo on tiny annotation files written here, with tiny videos."""

from __future__ import annotations

import json
import logging
import os
import random

import numpy as np
import pytest
from conftest import write_video

from dataloaders.dataloader_activitynet_retrieval import ActivityNet_DataLoader
from dataloaders.dataloader_didemo_retrieval import DiDeMo_DataLoader
from dataloaders.dataloader_lsmdc_retrieval import LSMDC_DataLoader
from dataloaders.sampling import VideoSampling
from util import UsageError

SOT, EOT = 49406, 49407
SMALL = dict(max_words=24, max_frames=2, image_resolution=32)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("clip") / "clip.avi", n_frames=40, fps=10, size=(40, 32))


def expected_ids(reference, caption, max_words=24):
    ids = [SOT] + reference.encode(caption)[: max_words - 2] + [EOT]
    return ids + [0] * (max_words - len(ids))


def link(folder, names, source):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        os.symlink(source, folder / name)


def check_item(item, reference, caption):
    text, mask, segment, video, video_mask = item
    assert text[0].tolist() == expected_ids(reference, caption)
    assert mask.sum() == np.count_nonzero(text) and not segment.any()
    assert text.shape == (1, 24) and text.dtype == mask.dtype == segment.dtype == video_mask.dtype == np.int64
    assert video.shape == (1, 2, 1, 3, 32, 32) and video.dtype == np.float64
    return video, video_mask


# -------------------------------------------------------------------------------------------------------------- LSMDC
def test_the_original_loose_sampling_keywords_read_as_the_sampling_does(tmp_path, clip, tokenizer):
    (tmp_path / "LSMDC16_annos_val.csv").write_text(lsmdc_line("0001_A", "He smiles.") + "\n")
    link(tmp_path / "videos", ["0001_A.avi"], clip)
    loose = dict(max_frames=3, feature_framerate=2.0, image_resolution=32, frame_order=1, slice_framepos=2)
    old = LSMDC_DataLoader("val", str(tmp_path), str(tmp_path / "videos"), tokenizer, 24, **loose)
    sampling = VideoSampling(max_frames=3, feature_framerate=2, slice_framepos=2, image_resolution=32, frame_order=1)
    new = LSMDC_DataLoader("val", str(tmp_path), str(tmp_path / "videos"), tokenizer, 24, sampling=sampling)
    assert old.sampling == new.sampling == sampling
    assert (old.max_frames, old.feature_framerate, old.frame_order, old.slice_framepos) == (3, 2, 1, 2)
    for a, b in zip(old[0], new[0]):
        np.testing.assert_array_equal(a, b)
    assert old[0][3].shape == (1, 3, 1, 3, 32, 32) and old[0][4].tolist() == [[1, 1, 1]]
    with pytest.raises(TypeError, match="LSMDC_DataLoader"):
        LSMDC_DataLoader("val", str(tmp_path), str(tmp_path / "videos"), tokenizer, sampling=sampling, max_frames=3)


def lsmdc_line(clip_id, sentence):
    return "\t".join([clip_id, "00.00.01.000", "00.00.03.000", "00.00.01.000", "00.00.03.000", sentence])


def test_lsmdc_one_sample_per_line_in_file_order(tmp_path, clip, tokenizer, reference):
    lines = [
        lsmdc_line("0001_A_00.01-00.03", "SOMEONE opens the door."),
        lsmdc_line("0002_B_00.05-00.09", "He smiles."),
        lsmdc_line("0001_A_00.01-00.03", "She walks in."),
        lsmdc_line("0003_C_01.00-01.02", "They sit."),
    ]
    (tmp_path / "LSMDC16_annos_val.csv").write_text("\n".join(lines) + "\n")
    link(tmp_path / "videos" / "0001_A", ["0001_A_00.01-00.03.avi"], clip)
    link(tmp_path / "videos" / "0002_B", ["0002_B_00.05-00.09.avi"], clip)
    link(tmp_path / "videos", ["0003_C_01.00-01.02.avi"], clip)
    ds = LSMDC_DataLoader("val", str(tmp_path), str(tmp_path / "videos"), tokenizer, **SMALL)
    assert len(ds) == 4
    assert [(v, c) for v, c, *_ in ds.all_pairs()] == [
        ("0001_A_00.01-00.03", "SOMEONE opens the door."),
        ("0002_B_00.05-00.09", "He smiles."),
        ("0001_A_00.01-00.03", "She walks in."),
        ("0003_C_01.00-01.02", "They sit."),
    ]
    assert all(s is None and e is None for *_, s, e in ds.all_pairs())  # whole clips
    video, video_mask = check_item(ds[2], reference, "She walks in.")
    direct = ds.rawVideoExtractor.get_video_sample(str(tmp_path / "videos/0001_A/0001_A_00.01-00.03.avi"), 2)
    assert np.array_equal(video, direct[0]) and np.array_equal(video_mask, direct[1])


def test_lsmdc_bad_line_and_missing_clip(tmp_path, clip, tokenizer):
    path = tmp_path / "LSMDC16_annos_training.csv"
    path.write_text(lsmdc_line("c1", "ok") + "\n" + lsmdc_line("c2", "ok") + "\n" + "c3\t1\t2\t3\tno sentence\n")
    link(tmp_path / "videos", ["c1.avi", "c2.avi", "c3.avi"], clip)
    with pytest.raises(
        ValueError,
        match=r"LSMDC16_annos_training\.csv, line 3: expected 6 tab-separated fields "
        r"\(clip_id, .*sentence\), got '5 field\(s\)'",
    ):
        LSMDC_DataLoader("train", str(tmp_path), str(tmp_path / "videos"), tokenizer)
    path.write_text(lsmdc_line("c1", "a") + "\n" + lsmdc_line("c9", "b") + "\n" + lsmdc_line("c2", "c") + "\n")
    with pytest.raises(UsageError, match=r"1 of 3 videos listed in .*training\.csv .*: c9"):
        LSMDC_DataLoader("train", str(tmp_path), str(tmp_path / "videos"), tokenizer)
    ds = LSMDC_DataLoader("train", str(tmp_path), str(tmp_path / "videos"), tokenizer, skip_missing=True)
    assert [c for _v, c, *_ in ds.all_pairs()] == ["a", "c"]


def test_lsmdc_read_errors_are_raised(tmp_path, clip, tokenizer, monkeypatch):
    (tmp_path / "LSMDC16_challenge_1000_publictect.csv").write_text(lsmdc_line("c1", "a") + "\n")
    link(tmp_path / "videos", ["c1.avi"], clip)
    ds = LSMDC_DataLoader("test", str(tmp_path), str(tmp_path / "videos"), tokenizer, **SMALL)

    def broken(*args, **kwargs):
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(ds.rawVideoExtractor, "get_video_sample", broken)
    with pytest.raises(RuntimeError, match="decoder exploded"):
        ds[0]


# -------------------------------------------------------------------------------------------------------- ActivityNet
def write_activitynet(root, clip):
    ids = ["v_aaa", "v_bbb", "v_aaa", "v_ccc", "v_ddd"]  # v_aaa twice; v_ccc has no captions
    captions = {
        "v_ddd": {"duration": 0.0, "timestamps": [[0, 0]], "sentences": ["Nothing happens."]},
        "v_aaa": {"duration": 12.3, "timestamps": [[0, 3], [3, 12]], "sentences": [" A man runs.", " He stops."]},
        "v_bbb": {"duration": 7.0, "timestamps": [[1, 2]], "sentences": ["A dog barks."]},
    }
    (root / "val_ids.json").write_text(json.dumps(ids))
    (root / "val_1.json").write_text(json.dumps(captions))
    link(root / "videos", ["aaa.mp4", "bbb.mkv", "ccc.mp4", "ddd.webm"], clip)


def test_activitynet_paragraphs_windows_and_order(tmp_path, clip, tokenizer, reference, caplog):
    write_activitynet(tmp_path, clip)
    with caplog.at_level(logging.INFO, logger="dataloaders"):
        ds = ActivityNet_DataLoader("val", str(tmp_path), str(tmp_path / "videos"), tokenizer, **SMALL)
    out = caplog.text
    assert "reduplicate." in out and "video id list: 4" in out and "pseudo caption dict: 3" in out
    assert list(ds.all_pairs()) == [
        ("aaa", " A man runs.  He stops.", 0, 13),  # ceil(12.3)
        ("bbb", "A dog barks.", 0, 7),
        ("ddd", "Nothing happens.", 0, 1),
    ]  # end == start → end + 1
    seen = []
    original = ds.rawVideoExtractor.get_video_sample

    def spy(path, max_frames, slice_framepos=0, frame_order=0, start_time=None, end_time=None, **kwargs):
        seen.append((os.path.basename(path), start_time, end_time))
        return original(path, max_frames, slice_framepos, frame_order, start_time, end_time, **kwargs)

    ds.rawVideoExtractor.get_video_sample = spy
    video, video_mask = check_item(ds[0], reference, " A man runs.  He stops.")
    assert seen == [("aaa.mp4", 0, 13)] and video_mask.sum() == 2
    with pytest.raises(ValueError, match="subset must be one of"):
        ActivityNet_DataLoader("test", str(tmp_path), str(tmp_path / "videos"), tokenizer)


def test_activitynet_errors(tmp_path, clip, tokenizer):
    write_activitynet(tmp_path, clip)
    os.remove(tmp_path / "videos" / "bbb.mkv")
    with pytest.raises(UsageError, match=r"1 of 3 videos listed in .*val_ids\.json .*: bbb"):
        ActivityNet_DataLoader("val", str(tmp_path), str(tmp_path / "videos"), tokenizer)
    data = json.loads((tmp_path / "val_1.json").read_text())
    data["v_bbb"]["duration"] = "long"
    (tmp_path / "val_1.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"val_1\.json, key 'v_bbb'\.duration: expected a number of seconds"):
        ActivityNet_DataLoader("val", str(tmp_path), str(tmp_path / "videos"), tokenizer)
    del data["v_bbb"]["sentences"]
    (tmp_path / "val_1.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"key 'v_bbb': expected an object with keys \['duration', 'sentences'\]"):
        ActivityNet_DataLoader("val", str(tmp_path), str(tmp_path / "videos"), tokenizer)
    (tmp_path / "val_ids.json").write_text(json.dumps(["v_aaa", 3]))
    with pytest.raises(ValueError, match=r"val_ids\.json, item 1: expected a string, got 3"):
        ActivityNet_DataLoader("val", str(tmp_path), str(tmp_path / "videos"), tokenizer)


# ------------------------------------------------------------------------------------------------------------- DiDeMo
def write_didemo(root, clip, subset="test"):
    names = ["111@N00_1.mp4", "222@N00_2.avi", "333@N00_3.mov"]
    (root / f"{subset}_list.txt").write_text("\n".join(names[:2] + ["444@N00_4.mp4"]) + "\n")
    data = [
        {"description": "a red car", "times": [[0, 0], [1, 1]], "video": "222@N00_2.avi"},
        {"description": "a dog jumps", "times": [[2, 3]], "video": "111@N00_1.mp4"},
        {"description": "not listed", "times": [[0, 1]], "video": "333@N00_3.mov"},
        {"description": "the car stops", "times": [[4, 5]], "video": "222@N00_2.avi"},
    ]
    (root / f"{subset}_data.json").write_text(json.dumps(data))
    link(root / "videos", names, clip)


def test_didemo_paragraphs_window_and_ids(tmp_path, clip, tokenizer, reference):
    write_didemo(tmp_path, clip)
    ds = DiDeMo_DataLoader("test", str(tmp_path), str(tmp_path / "videos"), tokenizer, **SMALL)
    # first appearance in the JSON; listed 444 has no annotation and is dropped as in the original
    assert list(ds.all_pairs()) == [
        ("222@N00_2.avi", "a red car the car stops", 0, 31),
        ("111@N00_1.mp4", "a dog jumps", 0, 31),
    ]
    assert ds.video_dict["111@N00_1.mp4"] == str(tmp_path / "videos" / "111@N00_1.mp4")
    video, video_mask = check_item(ds[0], reference, "a red car the car stops")
    direct = ds.rawVideoExtractor.get_video_sample(ds.video_dict["222@N00_2.avi"], 2, 0, 0, 0, 31)
    assert np.array_equal(video, direct[0]) and video_mask.sum() == 2


def _fail_on(ds, bad_name):
    original = ds.rawVideoExtractor.get_video_sample

    def flaky(path, *args, **kwargs):
        if os.path.basename(path) == bad_name:
            raise OSError("cannot read frame")
        return original(path, *args, **kwargs)

    ds.rawVideoExtractor.get_video_sample = flaky


def test_didemo_swallows_read_errors_in_evaluation_and_counts_them(tmp_path, clip, tokenizer, caplog):
    write_didemo(tmp_path, clip)
    ds = DiDeMo_DataLoader("test", str(tmp_path), str(tmp_path / "videos"), tokenizer, **SMALL)
    _fail_on(ds, "222@N00_2.avi")
    with caplog.at_level(logging.WARNING, logger="dataloaders"):
        *_, video, video_mask = ds[0]
    assert video.shape == (1, 2, 1, 3, 32, 32) and not video.any() and video_mask.tolist() == [[0, 0]]
    assert ds.n_undecodable == 1 and ds.undecodable_videos == {ds.video_dict["222@N00_2.avi"]: 1}
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert "cannot read frame" in messages and "no frame decoded" in messages


def test_didemo_training_replaces_unreadable_videos(tmp_path, clip, tokenizer, reference):
    write_didemo(tmp_path, clip, subset="train")
    ds = DiDeMo_DataLoader("train", str(tmp_path), str(tmp_path / "videos"), tokenizer, **SMALL)
    _fail_on(ds, "222@N00_2.avi")
    random.seed(0)
    item = ds[0]
    check_item(item, reference, "a dog jumps")
    assert item[4].sum() == 2 and ds.n_replaced >= 1 and ds.n_undecodable == ds.n_replaced
