"""preprocess/make_synthetic_dataset.py: layout, determinism, captions that match the pixels, twin pairs."""

from __future__ import annotations

import csv
import io
import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest

from preprocess import make_synthetic_dataset as msd

SMALL = dict(num_train=12, num_val=4, num_test=8, size=64, fps=2, seconds=4)


class NoGlobalsUnpickler(pickle.Unpickler):
    """Loads plain containers and strings only: the captions pickle must need nothing else."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"unexpected global {module}.{name}")


def load_captions_pickle(path: Path):
    return NoGlobalsUnpickler(io.BytesIO(path.read_bytes())).load()


def read_rows(path: Path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def decode(path: Path) -> np.ndarray:
    """All frames of a video, RGB, as one array [T, H, W, 3]."""
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    cap.release()
    assert frames, f"no frame decoded from {path}"
    return np.stack(frames)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return msd.make_dataset(tmp_path_factory.mktemp("synthetic") / "data", seed=0, **SMALL)


@pytest.fixture(scope="module")
def meta(dataset):
    return json.loads(dataset["meta"].read_text())["videos"]


def annotation_files(root: Path):
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix != ".mp4")


def test_msrvtt_layout(dataset, meta):
    d = dataset["root"] / "msrvtt"
    assert dataset["msrvtt_train_csv"] == d / "MSRVTT_train.9k.csv"
    train = read_rows(dataset["msrvtt_train_csv"])
    assert train[0] == ["video_id"] and [r[0] for r in train[1:]] == [f"video{i}" for i in range(12)]

    data = json.loads(dataset["msrvtt_data_path"].read_text())
    # Test ids follow train and val: video12..15 are MSVD's val videos, absent from the MSR-VTT files.
    test_ids = [f"video{i}" for i in range(16, 24)]
    assert [v["video_id"] for v in data["videos"]] == [f"video{i}" for i in range(12)] + test_ids
    sentences = data["sentences"]
    assert [s["sen_id"] for s in sentences] == list(range(len(sentences)))
    assert len(sentences) == 20 * len(msd.MOTION_TEMPLATES)
    for vid in [f"video{i}" for i in range(12)] + test_ids:
        assert [s["caption"] for s in sentences if s["video_id"] == vid] == meta[vid]["captions"]

    test = read_rows(dataset["msrvtt_val_csv"])
    assert test[0] == ["key", "vid_key", "video_id", "sentence"]
    assert test[1:] == [[f"ret{i}", f"msr{vid[5:]}", vid, meta[vid]["captions"][0]] for i, vid in enumerate(test_ids)]
    order = read_rows(dataset["msrvtt_val_order_csv"])
    assert order[0] == test[0] and order[1:] == [row for row in test[1:] if meta[row[2]]["twin"]]
    assert len(order) - 1 == 4  # TWIN_FRACTION of 8

    videos = sorted(p.name for p in dataset["msrvtt_features_path"].iterdir())
    assert videos == sorted(f"{v}.mp4" for v in [f"video{i}" for i in range(12)] + test_ids)


def test_msvd_layout(dataset, meta):
    d = dataset["msvd_data_path"]
    lists = {split: (d / f"{split}_list.txt").read_text() for split in ("train", "val", "test")}
    assert lists["train"] == "".join(f"video{i}\n" for i in range(12))
    assert lists["val"] == "".join(f"video{i}\n" for i in range(12, 16))
    assert lists["test"] == "".join(f"video{i}\n" for i in range(16, 24))
    raw = load_captions_pickle(d / "raw-captions.pkl")
    assert type(raw) is dict and list(raw) == [f"video{i}" for i in range(24)]
    for vid, word_lists in raw.items():
        assert all(type(words) is list and all(type(w) is str for w in words) for words in word_lists)
        assert [" ".join(words) for words in word_lists] == meta[vid]["captions"]
    assert sorted(p.stem for p in dataset["msvd_features_path"].iterdir()) == sorted(raw)
    # The same videos in both layouts.
    assert (d / "videos" / "video3.mp4").read_bytes() == (dataset["msrvtt_features_path"] / "video3.mp4").read_bytes()


def test_videos_have_the_requested_shape(dataset):
    frames = decode(dataset["msvd_features_path"] / "video0.mp4")
    assert frames.shape == (SMALL["fps"] * SMALL["seconds"], 64, 64, 3)
    cap = cv2.VideoCapture(str(dataset["msvd_features_path"] / "video0.mp4"))
    assert cap.get(cv2.CAP_PROP_FPS) == SMALL["fps"]
    cap.release()


def test_same_seed_same_files_other_seed_differs(dataset, tmp_path):
    again = msd.make_dataset(tmp_path / "again", seed=0, **SMALL)
    first, second = annotation_files(dataset["root"]), annotation_files(again["root"])
    assert [p.relative_to(dataset["root"]) for p in first] == [p.relative_to(again["root"]) for p in second]
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), a.name
    for vid in ("video0", "video7", "video20"):
        np.testing.assert_array_equal(
            decode(dataset["msrvtt_features_path"] / f"{vid}.mp4"), decode(again["msrvtt_features_path"] / f"{vid}.mp4")
        )
    other = msd.make_dataset(tmp_path / "other", seed=1, **SMALL)
    assert other["msrvtt_data_path"].read_bytes() != dataset["msrvtt_data_path"].read_bytes()
    assert not np.array_equal(
        decode(dataset["msrvtt_features_path"] / "video0.mp4"), decode(other["msrvtt_features_path"] / "video0.mp4")
    )


def test_test_split_does_not_depend_on_train_size(dataset, tmp_path):
    bigger = msd.make_dataset(tmp_path / "bigger", seed=0, datasets=("msvd",), **{**SMALL, "num_train": 14})
    old = load_captions_pickle(dataset["msvd_data_path"] / "raw-captions.pkl")
    new = load_captions_pickle(bigger["msvd_data_path"] / "raw-captions.pkl")
    assert list(new.values())[-8:] == list(old.values())[-8:]
    assert not (bigger["root"] / "msrvtt").exists()


def shape_mask(frame: np.ndarray, background: str) -> np.ndarray:
    """Pixels far from both background tones."""
    tones = np.array(msd.BACKGROUNDS[background], dtype=np.int32)
    dist = np.abs(frame[:, :, None, :].astype(np.int32) - tones[None, None]).sum(-1).min(-1)
    return dist > 90


def colour_name(frame: np.ndarray, mask: np.ndarray) -> str:
    mean = frame[mask].reshape(-1, 3).mean(0)
    return min(msd.COLOURS, key=lambda c: np.abs(np.array(msd.COLOURS[c]) - mean).sum())


def test_captions_match_the_pixels(dataset, meta):
    """Read each test video's canonical caption and check it against decoded frames (one per second)."""
    fps = SMALL["fps"]
    checked_kinds = set()
    for vid, info in meta.items():
        if info["split"] != "test":
            continue
        caption = info["captions"][0].split()
        background = caption[caption.index("background") - 1]
        frames = decode(dataset["msrvtt_features_path"] / f"{vid}.mp4")[::fps]  # first frame of each second
        masks = [shape_mask(f, background) for f in frames]
        assert all(m.sum() >= 20 for m in masks), vid
        if caption[0] == "first":  # first <a> <colour> <shape> then <a> <colour> <shape> ...
            first, second = caption[2], caption[6]
            assert colour_name(frames[0], masks[0]) == first, vid
            assert colour_name(frames[-1], masks[-1]) == second, vid
        elif caption[:3] == ["it", "ends", "with"]:  # a sequence twin: it ends with <a> <colour> <shape> ...
            assert info["kind"] == "sequence" and info["twin"] is not None, vid
            assert colour_name(frames[-1], masks[-1]) == caption[4], vid
            assert colour_name(frames[0], masks[0]) != caption[4], vid
        else:  # <a> <colour> <shape> <verb> <direction?> ...
            assert all(colour_name(f, m) == caption[1] for f, m in zip(frames, masks)), vid
            ys, xs = zip(*(np.argwhere(m).mean(0) for m in masks))
            areas = [m.sum() for m in masks]
            step = {"left": -np.diff(xs), "right": np.diff(xs), "up": -np.diff(ys), "down": np.diff(ys)}
            word = caption[4] if caption[3] == "moves" else caption[3]
            deltas = step[word] if word in step else np.diff(areas) * (1 if word == "grows" else -1)
            assert word in step or word in ("grows", "shrinks")
            assert (deltas > 0).all(), (vid, word, deltas)
        checked_kinds.add(caption[0])
    assert {"first", "it"} < checked_kinds


def test_twins_hold_the_same_frames_in_reverse_order(dataset, meta):
    pairs = {tuple(sorted((vid, info["twin"]))) for vid, info in meta.items() if info["twin"]}
    assert len(pairs) == 3 + 1 + 2  # round(n * 0.5 / 2) per split: train 12, val 4, test 8
    fps = SMALL["fps"]
    for a, b in pairs:
        fa = decode(
            dataset["msrvtt_features_path" if meta[a]["split"] != "val" else "msvd_features_path"] / f"{a}.mp4"
        ).astype(np.int32)
        fb = decode(
            dataset["msrvtt_features_path" if meta[b]["split"] != "val" else "msvd_features_path"] / f"{b}.mp4"
        ).astype(np.int32)
        per_second_a, per_second_b = fa[::fps], fb[::fps]
        # Same drawn frames in reverse order; the codec adds small differences only.
        assert np.abs(per_second_a - per_second_b[::-1]).mean() < 2.0, (a, b)
        assert np.abs(per_second_a - per_second_b).mean() > 2.0, (a, b)  # but the order differs
        assert meta[a]["captions"][0] != meta[b]["captions"][0]


def test_twin_states_are_exact_reverses():
    rng = np.random.default_rng(3)
    specs = msd.make_split(rng, 10, 64, 5)
    twins = [(i, s.twin) for i, s in enumerate(specs) if s.twin is not None]
    assert len(twins) == 2 * 2
    for i, j in twins:
        assert specs[j].twin == i and specs[i].states == specs[j].states[::-1]
        drawn_i = [msd.draw_frame(o, specs[i].background, 64).tobytes() for o in specs[i].states]
        drawn_j = [msd.draw_frame(o, specs[j].background, 64).tobytes() for o in specs[j].states]
        assert sorted(drawn_i) == sorted(drawn_j) and drawn_i != drawn_j
    sequence = next(s for s in specs if s.kind == "sequence")
    assert sequence.states[2] == []  # odd length: the middle second is empty


def test_sequence_twins_name_only_their_last_shape_and_test_captions_are_unique():
    """The demo's test split (seed 0, 100 videos): every canonical caption names one video only."""
    specs = msd.make_split(np.random.default_rng([0, msd.SPLIT_STREAMS["test"]]), 100, 64, 4)
    canonical = [spec.captions[0] for spec in specs]
    assert len(set(canonical)) == len(canonical)
    sequences = [spec for spec in specs if spec.kind == "sequence"]
    assert sum(spec.twin is not None for spec in sequences) >= 20
    for spec in sequences:
        (_, first_colour), (_, last_colour) = spec.objects
        for caption in spec.captions:
            words = caption.split()
            assert last_colour in words and (first_colour in words) == (spec.twin is None), caption


def test_cli(tmp_path, capsys):
    assert (
        msd.main(
            [
                "--output_dir",
                str(tmp_path / "x"),
                "--num_train",
                "2",
                "--num_test",
                "2",
                "--seconds",
                "2",
                "--datasets",
                "msrvtt",
            ]
        )
        == 0
    )
    assert "msrvtt_val_csv:" in capsys.readouterr().out
    assert not (tmp_path / "x" / "msvd").exists()
    assert len(list((tmp_path / "x" / "msrvtt" / "videos").iterdir())) == 4
    assert msd.main(["--output_dir", str(tmp_path / "y"), "--datasets", "lsmdc"]) == 2
    assert "lsmdc" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_the_real_loaders_read_it(dataset, meta):
    from dataloaders.dataloader_msrvtt_retrieval import MSRVTT_DataLoader, MSRVTT_TrainDataLoader
    from dataloaders.dataloader_msvd_retrieval import MSVD_DataLoader
    from dataloaders.dataset_util import load_raw_captions
    from modules.tokenization_clip import SimpleTokenizer

    tokenizer = SimpleTokenizer()
    # feature_framerate as main_task_retrieval passes it (an int flag)
    frames = dict(max_words=32, max_frames=6, image_resolution=32, feature_framerate=1)
    test = MSRVTT_DataLoader(str(dataset["msrvtt_val_csv"]), str(dataset["msrvtt_features_path"]), tokenizer, **frames)
    assert len(test) == SMALL["num_test"]
    text, text_mask, _, video, video_mask = test[0]
    words = tokenizer.tokenize(meta["video16"]["captions"][0])
    assert text_mask.sum() == len(words) + 2
    assert list(text[0, 1 : len(words) + 1]) == tokenizer.convert_tokens_to_ids(words)
    # One frame per second at feature_framerate 1: as many frames as seconds, all non-blank.
    assert video.shape == (1, 6, 1, 3, 32, 32) and video_mask.tolist() == [[1, 1, 1, 1, 0, 0]]
    assert (video[0, :4].std(axis=(1, 2, 3, 4)) > 0.1).all()

    train_args = (
        str(dataset["msrvtt_train_csv"]),
        str(dataset["msrvtt_data_path"]),
        str(dataset["msrvtt_features_path"]),
        tokenizer,
    )
    unfolded = MSRVTT_TrainDataLoader(*train_args, unfold_sentences=True, **frames)
    assert len(unfolded) == SMALL["num_train"] * len(msd.MOTION_TEMPLATES)
    assert len(MSRVTT_TrainDataLoader(*train_args, **frames)) == SMALL["num_train"]

    assert load_raw_captions(str(dataset["msvd_data_path"] / "raw-captions.pkl"))["video3"] == [
        c.split() for c in meta["video3"]["captions"]
    ]
    for subset, n in (("train", SMALL["num_train"]), ("val", SMALL["num_val"]), ("test", SMALL["num_test"])):
        msvd = MSVD_DataLoader(
            subset, str(dataset["msvd_data_path"]), str(dataset["msvd_features_path"]), tokenizer, **frames
        )
        per_video = len(msd.MOTION_TEMPLATES)
        assert msvd.cut_off_points == [per_video * (i + 1) for i in range(n)]
    *_, video_mask = msvd[len(msvd) - 1]
    assert video_mask.sum() == SMALL["seconds"]
