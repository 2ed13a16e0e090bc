"""MSR-VTT datasets on the real split files (videos: one tiny clip linked under every id) and synthetic captions."""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import time

import numpy as np
import pandas as pd
import pytest
from conftest import write_video
from open_clip.tokenizer import SimpleTokenizer as OpenClipTokenizer

from dataloaders.dataloader_msrvtt_retrieval import MSRVTT_DataLoader, MSRVTT_TrainDataLoader
from util import UsageError

SOT, EOT = 49406, 49407
SMALL = dict(max_words=16, max_frames=2, image_resolution=32)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("clip") / "clip.avi", n_frames=30, fps=10, size=(40, 32))


def link_videos(folder, video_ids, source, ext=".mp4"):
    folder.mkdir(parents=True, exist_ok=True)
    for video_id in video_ids:
        os.symlink(source, folder / f"{video_id}{ext}")
    return folder


@functools.cache
def reference_tokenizer():
    return OpenClipTokenizer()


def expected_ids(caption, max_words):
    """The original's encoding, built from an independent tokenizer (open_clip's)."""
    body = reference_tokenizer().encode(caption)[: max_words - 2]
    ids = [SOT] + body + [EOT]
    return ids + [0] * (max_words - len(ids))


def test_jsfusion_test_set(real_annotations, tmp_path, clip, tokenizer):
    csv = real_annotations / "msrvtt" / "MSRVTT_JSFUSION_test.csv"
    rows = pd.read_csv(csv)
    videos = link_videos(tmp_path / "videos", rows["video_id"], clip)
    ds = MSRVTT_DataLoader(str(csv), str(videos), tokenizer, **SMALL)
    assert len(ds) == 1000 and len(set(rows["video_id"])) == 1000
    for idx in (0, 999):
        text, mask, segment, video, video_mask = ds[idx]
        assert text[0].tolist() == expected_ids(rows["sentence"][idx], 16)
        assert text.shape == mask.shape == segment.shape == (1, 16)
        assert text.dtype == mask.dtype == segment.dtype == video_mask.dtype == np.int64
        assert mask.sum() == np.count_nonzero(text) and not segment.any()
        assert video.shape == (1, 2, 1, 3, 32, 32) and video.dtype == np.float64
        assert video_mask.tolist() == [[1, 1]]
    assert text[0, 1:3].tolist() != [0, 0]
    # the video is the extractor's sample of <id>.mp4
    direct = ds.rawVideoExtractor.get_video_sample(str(videos / f"{rows['video_id'][999]}.mp4"), 2)
    assert np.array_equal(video, direct[0]) and np.array_equal(video_mask, direct[1])


@pytest.mark.parametrize("name, count", [("MSRVTT_train.9k.csv", 9000), ("MSRVTT_train.7k.csv", 7010)])
def test_train_splits_list_their_ids(real_annotations, tmp_path, name, count, tokenizer):
    csv = real_annotations / "msrvtt" / name
    ids = pd.read_csv(csv)["video_id"].tolist()
    assert len(ids) == len(set(ids)) == count
    data = tmp_path / "MSRVTT_data.json"
    data.write_text(
        json.dumps({"sentences": [{"video_id": v, "caption": f"clip {v}", "sen_id": i} for i, v in enumerate(ids)]})
    )
    (tmp_path / "videos").mkdir()
    # every id is reported missing, in one error that counts them all
    with pytest.raises(UsageError, match=rf"^{count} of {count} videos listed in .*{name}"):
        MSRVTT_TrainDataLoader(str(csv), str(data), str(tmp_path / "videos"), tokenizer)


def test_expanded_sentences_follow_json_order_in_linear_time(real_annotations, tmp_path, clip, tokenizer):
    csv = real_annotations / "msrvtt" / "MSRVTT_train.9k.csv"
    ids = pd.read_csv(csv)["video_id"].tolist()
    listed = set(ids)
    videos = link_videos(tmp_path / "videos", ids, clip)
    # 20 captions per video for all 10k MSR-VTT videos, interleaved as in MSRVTT_data.json (200k sentences)
    sentences = [
        {"video_id": f"video{v}", "caption": f"caption {k} of {v}", "sen_id": k * 10000 + v}
        for k in range(20)
        for v in range(10000)
    ]
    data = tmp_path / "MSRVTT_data.json"
    data.write_text(json.dumps({"videos": [], "sentences": sentences}))
    small_csv = tmp_path / "small.csv"
    small_csv.write_text("video_id\n" + "\n".join(ids[:10]) + "\n")

    def build(path):
        start = time.perf_counter()
        built = MSRVTT_TrainDataLoader(str(path), str(data), str(videos), tokenizer, unfold_sentences=True, **SMALL)
        return built, time.perf_counter() - start

    small, t_small = build(small_csv)
    ds, t_big = build(csv)
    assert len(small) == 200 and len(ds) == 180000
    expected = [(s["video_id"], s["caption"]) for s in sentences if s["video_id"] in listed]
    assert [(v, c) for v, c, _s, _e in ds.all_pairs()] == expected
    # Linear: 900 times the listed ids cost about as much as 10 (reading the JSON dominates). The original's list
    # membership test makes the 9k build ~10x slower than the 10-id one here (200k × 9000 comparisons).
    assert t_big < 3 * t_small + 1.0, (t_big, t_small)
    text, *_ = ds[12345]
    assert text[0].tolist() == expected_ids(expected[12345][1], 16)


def write_small_split(root, clip):
    """4 listed videos (video3 only as .webm), captions for 5, in an interleaved JSON order."""
    link_videos(root / "videos", ["video0", "video1", "video2"], clip)
    link_videos(root / "videos", ["video3"], clip, ext=".webm")
    (root / "train.csv").write_text("video_id\nvideo2\nvideo0\nvideo3\nvideo1\n")
    sentences = []
    for k in range(3):
        for v in (4, 1, 0, 3, 2):
            sentences.append({"video_id": f"video{v}", "caption": f"caption {k} of video {v}"})
    (root / "MSRVTT_data.json").write_text(json.dumps({"sentences": sentences}))
    return sentences


def test_expanded_sentences_small(tmp_path, clip, tokenizer):
    write_small_split(tmp_path, clip)
    ds = MSRVTT_TrainDataLoader(
        str(tmp_path / "train.csv"),
        str(tmp_path / "MSRVTT_data.json"),
        str(tmp_path / "videos"),
        tokenizer,
        unfold_sentences=True,
        **SMALL,
    )
    assert len(ds) == 12
    assert [c for _v, c, *_ in ds.all_pairs()][:5] == [
        "caption 0 of video 1",
        "caption 0 of video 0",
        "caption 0 of video 3",
        "caption 0 of video 2",
        "caption 1 of video 1",
    ]
    assert ds.video_dict["video3"].endswith("video3.webm") and ds.video_dict["video0"].endswith("video0.mp4")
    *_, video_mask = ds[2]  # the .webm one decodes
    assert video_mask.sum() == 2


def test_one_sample_per_csv_row_with_a_random_caption(tmp_path, clip, tokenizer):
    write_small_split(tmp_path, clip)
    ds = MSRVTT_TrainDataLoader(
        str(tmp_path / "train.csv"), str(tmp_path / "MSRVTT_data.json"), str(tmp_path / "videos"), tokenizer, **SMALL
    )
    assert len(ds) == 4
    random.seed(11)
    got = [ds[i][0][0].tolist() for i in (0, 1, 2, 3, 0)]
    random.seed(11)
    csv_order = ["video2", "video0", "video3", "video1", "video2"]
    # the original draws random.randint(0, n - 1) over the video's captions in JSON order
    want = [expected_ids(f"caption {random.randint(0, 2)} of video {v[-1]}", 16) for v in csv_order]
    assert got == want


def test_train_errors_name_file_and_place(tmp_path, clip, tokenizer):
    write_small_split(tmp_path, clip)
    data = tmp_path / "MSRVTT_data.json"
    bad = json.loads(data.read_text())
    del bad["sentences"][3]["caption"]
    data.write_text(json.dumps(bad))
    with pytest.raises(
        ValueError,
        match=r"MSRVTT_data\.json, sentences\[3\]: expected an object with keys "
        r"\['video_id', 'caption'\]",
    ):
        MSRVTT_TrainDataLoader(str(tmp_path / "train.csv"), str(data), str(tmp_path / "videos"), tokenizer)
    data.write_text(json.dumps({"sentences": [{"video_id": "video2", "caption": "only one"}]}))
    with pytest.raises(ValueError, match=r"at least one caption for video 'video0' \(listed in .*train\.csv, line 3\)"):
        MSRVTT_TrainDataLoader(str(tmp_path / "train.csv"), str(data), str(tmp_path / "videos"), tokenizer)
    (tmp_path / "test.csv").write_text("key,vid_key,video_id\nret0,msr0,video0\n")
    with pytest.raises(ValueError, match=r"test\.csv, line 1 \(header\): expected columns \['video_id', 'sentence'\]"):
        MSRVTT_DataLoader(str(tmp_path / "test.csv"), str(tmp_path / "videos"), tokenizer)


def test_missing_videos_in_training_and_evaluation(tmp_path, clip, tokenizer, caplog):
    write_small_split(tmp_path, clip)
    os.remove(tmp_path / "videos" / "video0.mp4")
    csv, data, videos = str(tmp_path / "train.csv"), str(tmp_path / "MSRVTT_data.json"), str(tmp_path / "videos")
    with pytest.raises(
        UsageError,
        match=r"1 of 4 videos listed in .*train\.csv have no file under "
        r".*videos: video0\. .*--skip_missing_videos to train without",
    ):
        MSRVTT_TrainDataLoader(csv, data, videos, tokenizer)
    with caplog.at_level(logging.WARNING, logger="dataloaders"):
        ds = MSRVTT_TrainDataLoader(csv, data, videos, tokenizer, unfold_sentences=True, skip_missing=True)
    assert len(ds) == 9 and all(v != "video0" for v, *_ in ds.all_pairs())
    assert any("training without them (3 videos kept)" in r.getMessage() for r in caplog.records)
    ds = MSRVTT_TrainDataLoader(csv, data, videos, tokenizer, skip_missing=True)
    assert len(ds) == 3 and ds.csv["video_id"].tolist() == ["video2", "video3", "video1"]

    (tmp_path / "test.csv").write_text(
        "key,vid_key,video_id,sentence\nret0,msr0,video0,a b\nret1,msr1,video1,c d\nret2,msr2,video2,e f\n"
    )
    with pytest.raises(UsageError, match="evaluate on the videos present"):
        MSRVTT_DataLoader(str(tmp_path / "test.csv"), videos, tokenizer)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dataloaders"):
        ds = MSRVTT_DataLoader(str(tmp_path / "test.csv"), videos, tokenizer, skip_missing=True)
    assert len(ds) == 2 and ds.data["video_id"].tolist() == ["video1", "video2"]
    assert "evaluating on 2 of 3 videos" in caplog.text


def test_header_only_csv_fails_when_read(tmp_path, clip, tokenizer):
    write_small_split(tmp_path, clip)
    (tmp_path / "test.csv").write_text("key,vid_key,video_id,sentence\n")
    with pytest.raises(ValueError, match=r"test\.csv, line 2: expected at least one row after the header"):
        MSRVTT_DataLoader(str(tmp_path / "test.csv"), str(tmp_path / "videos"), tokenizer)
    (tmp_path / "train.csv").write_text("video_id\n")
    with pytest.raises(ValueError, match=r"train\.csv, line 2: expected at least one row after the header"):
        MSRVTT_TrainDataLoader(
            str(tmp_path / "train.csv"), str(tmp_path / "MSRVTT_data.json"), str(tmp_path / "videos"), tokenizer
        )


@pytest.mark.parametrize("uint8", [True, False], ids=["uint8", "float"])
@pytest.mark.parametrize("frame_order", [0, 1, 2])
@pytest.mark.parametrize("max_frames", [2, 4], ids=["full", "padded"])
def test_cached_items_equal_uncached_ones_and_the_pandas_lookup(
    tmp_path, clip, tokenizer, uint8, frame_order, max_frames
):
    """Every item read through a filling and then a warm frame cache is the uncached item bit for bit, drawing the
    same numbers; the caption is the one the original's per-item pandas lookup picks (a listed id without a video
    is dropped first)."""
    write_small_split(tmp_path, clip)
    csv = tmp_path / "train.csv"
    csv.write_text(csv.read_text() + "video9\n")
    args = (str(csv), str(tmp_path / "MSRVTT_data.json"), str(tmp_path / "videos"), tokenizer)
    sampling = dict(max_words=16, max_frames=max_frames, image_resolution=32, frame_order=frame_order)
    plain = MSRVTT_TrainDataLoader(*args, skip_missing=True, uint8_frames=uint8, **sampling)
    cached = MSRVTT_TrainDataLoader(
        *args, skip_missing=True, uint8_frames=uint8, frame_cache=str(tmp_path / "cache"), **sampling
    )
    listed = pd.read_csv(csv, dtype=str)
    listed = listed[listed["video_id"] != "video9"].reset_index(drop=True)
    captions = {v: [f"caption {k} of video {v[-1]}" for k in range(3)] for v in listed["video_id"]}
    assert len(plain) == len(cached) == 4
    for seed, idx in enumerate([0, 1, 2, 3] * 2):  # the first pass fills the cache, the second reads it
        items, draws = [], []
        for ds in (plain, cached):
            random.seed(seed)
            np.random.seed(seed)
            items.append(ds[idx])
            draws.append((random.random(), np.random.random()))
        random.seed(seed)
        video_id = listed["video_id"].values[idx]
        expected = captions[video_id][random.randint(0, len(captions[video_id]) - 1)]
        assert items[0][0][0].tolist() == expected_ids(expected, 16)
        assert draws[0] == draws[1]
        for a, b in zip(*items):
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
        assert items[1][4].sum() == min(3, max_frames)
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 4


def test_test_rows_sharing_a_video_are_kept_and_named(tmp_path, clip, tokenizer, caplog):
    write_small_split(tmp_path, clip)
    (tmp_path / "test.csv").write_text(
        "key,vid_key,video_id,sentence\nret0,msr0,video1,a b\nret1,msr1,video2,c d\nret2,msr2,video1,e f\n"
    )
    with caplog.at_level(logging.WARNING, logger="dataloaders"):
        ds = MSRVTT_DataLoader(str(tmp_path / "test.csv"), str(tmp_path / "videos"), tokenizer)
    # The original's benchmark: every row a (video, caption) pair, the repeat included.
    assert [(v, s) for v, s, *_ in ds.all_pairs()] == [("video1", "a b"), ("video2", "c d"), ("video1", "e f")]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "test.csv lists 1 video id(s) more than once: video1; each row" in warnings[0]
