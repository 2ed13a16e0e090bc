"""Write a small, seeded video-text retrieval data set in the files of the MSR-VTT and the MSVD layouts.

    python preprocess/make_synthetic_dataset.py --output_dir data/synthetic

Every video is a few seconds of coloured shapes drawn with cv2 on a plain or checkered background, and every caption
names what is drawn, so retrieval can be learned in minutes on a CPU with a tiny CLIP and no download.

Design
------
A video is a sequence of *states*, one per second; each state is held for ``fps`` frames. Two kinds of video:

- **motion**: one shape (circle, square, triangle) in one colour moves left, right, up or down, grows or shrinks
  ("a red circle moves left on a black background");
- **sequence**: one shape is shown for the first half, then another replaces it; with an odd number of seconds the
  middle second is empty ("first a blue square then a red circle on a gray background").

Each caption names every attribute that varies (colours, shapes, motion or order, background), in several
paraphrases; the first one is the canonical test caption. Within a split no two videos share all attributes (as long
as the split is small enough for that to be possible). The exception is the sequence twins below: their captions
name only the shape shown last ("it ends with a red circle on a gray background").

Order matters for half of each split: those videos come in **twin pairs** whose state sequences are exact
reverses of each other (left/right, up/down, growing/shrinking, A-then-B/B-then-A). Because whole seconds are held,
the two twins contain the same frames as a set under any per-second frame sampling (1 fps, or every frame), so
mean pooling over frames cannot tell them apart while a temporal head can. The ids of the order-dependent test
videos are written to a separate test csv (``MSRVTT_JSFUSION_test_order.csv``) and to the metadata file.

Files (``<out>`` = ``--output_dir``)::

    <out>/msrvtt/MSRVTT_train.9k.csv           video_id column (named like the real file so the same flags work)
    <out>/msrvtt/MSRVTT_data.json              {"videos": [...], "sentences": [{video_id, caption, sen_id}]}
    <out>/msrvtt/MSRVTT_JSFUSION_test.csv      key,vid_key,video_id,sentence: the canonical caption per test video
    <out>/msrvtt/MSRVTT_JSFUSION_test_order.csv   the same rows for the twin-pair test videos only
    <out>/msrvtt/videos/<id>.mp4
    <out>/msvd/{train,val,test}_list.txt       one id per line
    <out>/msvd/raw-captions.pkl                {id: [caption.split(), ...]}, pickle protocol 4
    <out>/msvd/videos/<id>.mp4
    <out>/synthetic_meta.json                  per video: split, kind, attributes, twin, captions

Both layouts hold the same videos under the same ids (video0, video1, ...: train, then val, then test); MSR-VTT has
no val split (its test split doubles as val, as in the original). Each split is drawn from its own seeded stream,
so changing ``--num_train`` leaves the test set unchanged. The same seed gives byte-identical annotation files and
identical video frames.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import pickle
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

SHAPES = ("circle", "square", "triangle")
SHAPE_WORDS = {"circle": ("circle", "ball"), "square": ("square", "box"), "triangle": ("triangle",)}
COLOURS: dict[str, tuple[int, int, int]] = {  # RGB, far apart in hue
    "red": (220, 30, 30),
    "green": (30, 190, 40),
    "blue": (30, 70, 235),
    "yellow": (240, 220, 30),
    "purple": (150, 40, 200),
    "orange": (250, 140, 20),
}
BACKGROUNDS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {  # two tones (equal = plain)
    "black": ((15, 15, 15), (15, 15, 15)),
    "white": ((240, 240, 240), (240, 240, 240)),
    "gray": ((128, 128, 128), (128, 128, 128)),
    "checkered": ((70, 70, 70), (175, 175, 175)),
}
MOTIONS = ("left", "right", "up", "down", "growing", "shrinking")
REVERSE_MOTION = {
    "left": "right",
    "right": "left",
    "up": "down",
    "down": "up",
    "growing": "shrinking",
    "shrinking": "growing",
}
MOTION_PHRASES = {
    "left": ("moves left", "moves to the left", "slides to the left", "goes left"),
    "right": ("moves right", "moves to the right", "slides to the right", "goes right"),
    "up": ("moves up", "rises", "moves upward", "goes up"),
    "down": ("moves down", "falls", "moves downward", "goes down"),
    "growing": ("grows", "gets bigger", "grows larger", "expands"),
    "shrinking": ("shrinks", "gets smaller", "becomes smaller", "contracts"),
}
MOTION_TEMPLATES = (  # the first is the canonical (test) caption
    "{a_c} {c} {s} {v} on a {b} background",
    "the {c} {s} {v} over a {b} background",
    "on a {b} background {a_c} {c} {s} {v}",
    "{a_c} {c} {s} {v} in front of a {b} background",
    "a {b} background where {a_c} {c} {s} {v}",
)
SEQUENCE_TEMPLATES = (
    "first {a_c1} {c1} {s1} then {a_c2} {c2} {s2} on a {b} background",
    "{a_c1} {c1} {s1} appears and then {a_c2} {c2} {s2} appears on a {b} background",
    "{a_c1} {c1} {s1} is replaced by {a_c2} {c2} {s2} on a {b} background",
    "on a {b} background {a_c1} {c1} {s1} turns into {a_c2} {c2} {s2}",
    "{a_c2} {c2} {s2} appears after {a_c1} {c1} {s1} on a {b} background",
)
# Sequence twins ("first A then B" / "first B then A") would have captions with the same words in another order.
# A text tower trained from scratch for minutes learns words, not word order (measured: such twin captions end up
# with cosine 0.998-1.000), so their captions name only the shape shown last: the words differ, the order lives in
# the video alone.
LAST_SHAPE_TEMPLATES = (
    "it ends with {a_c2} {c2} {s2} on a {b} background",
    "the last shape is {a_c2} {c2} {s2} on a {b} background",
    "in the end {a_c2} {c2} {s2} is shown on a {b} background",
    "finally {a_c2} {c2} {s2} on a {b} background",
    "on a {b} background the video ends with {a_c2} {c2} {s2}",
)
TWIN_FRACTION = 0.5  # share of each split's videos that come in order-reversed twin pairs
SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}  # each split gets its own seeded random stream

# One drawn object: shape, colour, centre x, centre y, radius (pixels).
Obj = tuple[str, str, int, int, int]


@dataclass
class VideoSpec:
    """Everything about one video: what it shows, second by second, and its captions."""

    kind: str  # "motion" or "sequence"
    background: str
    objects: list[tuple[str, str]]  # (shape, colour); sequence: in order of appearance
    motion: str  # a key of MOTIONS for kind "motion", "" for kind "sequence"
    states: list[list[Obj]]  # one list of drawn objects per second
    captions: list[str] = field(default_factory=list)
    twin: int | None = None  # index of the order-reversed twin within the split, if it has one


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def draw_frame(objects: Sequence[Obj], background: str, size: int) -> np.ndarray:
    """One RGB frame (size x size x 3, uint8)."""
    tone_a, tone_b = BACKGROUNDS[background]
    frame = np.empty((size, size, 3), np.uint8)
    tile = max(1, size // 8)
    yy, xx = np.mgrid[:size, :size]
    checker = ((yy // tile + xx // tile) % 2).astype(bool)
    frame[~checker], frame[checker] = tone_a, tone_b
    for shape, colour, cx, cy, r in objects:
        rgb = COLOURS[colour]
        if shape == "circle":
            cv2.circle(frame, (cx, cy), r, rgb, thickness=-1, lineType=cv2.LINE_AA)
        elif shape == "square":
            h = max(1, round(r * 0.9))  # about the circle's area
            cv2.rectangle(frame, (cx - h, cy - h), (cx + h, cy + h), rgb, thickness=-1)
        else:  # triangle, pointing up, a little larger than its inscribed circle
            t = r * 1.25
            pts = np.array([[cx, cy - t], [cx - 0.866 * t, cy + t / 2], [cx + 0.866 * t, cy + t / 2]])
            cv2.fillPoly(frame, [np.round(pts).astype(np.int32)], rgb, lineType=cv2.LINE_AA)
    return frame


def _motion_states(rng: np.random.Generator, shape: str, colour: str, motion: str, size: int, seconds: int):
    """Object per second for a motion video, drawn in the canonical direction then reversed if needed."""
    canonical = {"right": "left", "down": "up", "shrinking": "growing"}.get(motion, motion)
    u = size / 64  # geometry is laid out for 64x64 and scaled
    if canonical == "growing":
        cx, cy = (int(size / 2 + rng.integers(-6, 7) * u) for _ in range(2))
        radii = np.linspace(4 * u, 17 * u, seconds)
        states = [[(shape, colour, cx, cy, int(round(r)))] for r in radii]
    else:
        r = int(round(rng.integers(7, 11) * u))
        margin = r + int(round(3 * u))
        across = int(rng.integers(margin, size - margin))  # the fixed coordinate
        path = np.linspace(size - margin, margin, seconds).round().astype(int)  # decreasing: left / up
        states = [
            [(shape, colour, int(p), across, r)] if canonical == "left" else [(shape, colour, across, int(p), r)]
            for p in path
        ]
    return states if motion == canonical else states[::-1]


def _sequence_states(
    rng: np.random.Generator, first: tuple[str, str], second: tuple[str, str], size: int, seconds: int
):
    """Object per second for a sequence video: ``first`` for half the seconds, then ``second``."""
    u = size / 64
    placed = []
    for shape, colour in (first, second):
        r = int(round(rng.integers(8, 12) * u))
        margin = r + int(round(3 * u))
        placed.append(
            [(shape, colour, int(rng.integers(margin, size - margin)), int(rng.integers(margin, size - margin)), r)]
        )
    half = seconds // 2
    return [placed[0]] * half + [[]] * (seconds % 2) + [placed[1]] * half


def _captions(spec: VideoSpec, rng: np.random.Generator, twin: bool) -> list[str]:
    """Paraphrases naming what is seen; a sequence twin's captions name only its last shape (LAST_SHAPE_TEMPLATES)."""
    b = spec.background
    if spec.kind == "motion":
        ((shape, colour),) = spec.objects
        phrases = MOTION_PHRASES[spec.motion]
        out = []
        for i, template in enumerate(MOTION_TEMPLATES):
            s = SHAPE_WORDS[shape][0 if i == 0 else int(rng.integers(len(SHAPE_WORDS[shape])))]
            v = phrases[0 if i == 0 else int(rng.integers(len(phrases)))]
            out.append(template.format(a_c=_article(colour), c=colour, s=s, v=v, b=b))
        return out
    (s1, c1), (s2, c2) = spec.objects
    out = []
    if twin:
        for i, template in enumerate(LAST_SHAPE_TEMPLATES):
            w2 = SHAPE_WORDS[s2][0 if i == 0 else int(rng.integers(len(SHAPE_WORDS[s2])))]
            out.append(template.format(a_c2=_article(c2), c2=c2, s2=w2, b=b))
        return out
    for i, template in enumerate(SEQUENCE_TEMPLATES):
        w1 = SHAPE_WORDS[s1][0 if i == 0 else int(rng.integers(len(SHAPE_WORDS[s1])))]
        w2 = SHAPE_WORDS[s2][0 if i == 0 else int(rng.integers(len(SHAPE_WORDS[s2])))]
        out.append(template.format(a_c1=_article(c1), c1=c1, s1=w1, a_c2=_article(c2), c2=c2, s2=w2, b=b))
    return out


def _draw_content(rng: np.random.Generator, kind: str, canonical: bool) -> tuple:
    """Random caption attributes; ``canonical`` restricts to one order of each twin pair."""
    background = str(rng.choice(list(BACKGROUNDS)))
    if kind == "motion":
        motions = ("left", "up", "growing") if canonical else MOTIONS
        return background, [(str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))))], str(rng.choice(motions))
    while True:
        a = (str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))))
        b = (str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))))
        if a[1] != b[1]:  # different colours, so the order is visible at a glance
            return background, [a, b], ""


def _reversed(spec: VideoSpec) -> VideoSpec:
    return VideoSpec(
        spec.kind, spec.background, spec.objects[::-1], REVERSE_MOTION.get(spec.motion, ""), spec.states[::-1]
    )


def make_split(rng: np.random.Generator, n: int, size: int, seconds: int) -> list[VideoSpec]:
    """``n`` video specs, shuffled: about TWIN_FRACTION of them in twin pairs, single videos for the rest."""
    n_pairs = int(round(n * TWIN_FRACTION / 2))
    groups: list[list[VideoSpec]] = []
    used = set()
    for g in range(n - n_pairs):
        twin = g < n_pairs
        kind = ("motion", "sequence")[g % 2]
        for _attempt in range(100):  # redraw a few times to keep the split's captions unique
            background, objects, motion = _draw_content(rng, kind, canonical=twin)
            keys = {(kind, background, tuple(objects), motion)}
            if twin:
                keys.add((kind, background, tuple(objects[::-1]), REVERSE_MOTION.get(motion, "")))
                if kind == "sequence":  # their captions name the last shape only
                    keys |= {("last shape", background, objects[0]), ("last shape", background, objects[1])}
            if not keys & used:
                break
        if kind == "motion":
            states = _motion_states(rng, *objects[0], motion, size, seconds)
        else:
            states = _sequence_states(rng, objects[0], objects[1], size, seconds)
        group = [VideoSpec(kind, background, objects, motion, states)]
        if twin:
            group.append(_reversed(group[0]))
        used |= keys
        for spec in group:
            spec.captions = _captions(spec, rng, twin)
        groups.append(group)
    flat = [(g, spec) for g, group in enumerate(groups) for spec in group]
    order = rng.permutation(len(flat))
    specs = [flat[i][1] for i in order]
    position = {id(spec): i for i, spec in enumerate(specs)}
    for group in groups:
        if len(group) == 2:
            group[0].twin, group[1].twin = position[id(group[1])], position[id(group[0])]
    return specs


def write_video(path: Path, spec: VideoSpec, size: int, fps: int) -> None:
    """Write ``spec`` as an mp4v video: each state held for ``fps`` frames."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (size, size))
    if not writer.isOpened():
        raise RuntimeError(f"cv2 cannot write an mp4v video to {path}")
    for objects in spec.states:
        frame = cv2.cvtColor(draw_frame(objects, spec.background, size), cv2.COLOR_RGB2BGR)
        for _ in range(fps):
            writer.write(frame)
    writer.release()


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


Split = list[tuple[str, VideoSpec]]  # (video id, spec) in file order
# Which splits each layout lists; MSR-VTT has no val split (its test split doubles as val).
LAYOUTS = {"msrvtt": ("train", "test"), "msvd": ("train", "val", "test")}


def _check_options(
    datasets: Sequence[str], num_train: int, num_val: int, num_test: int, size: int, fps: int, seconds: int
) -> None:
    unknown = set(datasets) - {"msrvtt", "msvd"}
    if unknown or not datasets:
        raise ValueError(f"datasets must be a non-empty subset of msrvtt, msvd; got {list(datasets)}")
    if seconds < 2 or fps < 1 or size < 32:
        raise ValueError(f"need seconds >= 2, fps >= 1 and size >= 32; got {seconds}, {fps}, {size}")
    if min(num_train, num_test) < 1 or num_val < 0 or ("msvd" in datasets and num_val < 1):
        raise ValueError(
            f"need num_train, num_test (and num_val for msvd) >= 1; got {num_train}, {num_val}, {num_test}"
        )


def _make_splits(seed: int, counts: dict[str, int], size: int, seconds: int) -> dict[str, Split]:
    """Specs per split, each from its own seeded stream; ids run on across splits (train, val, test)."""
    splits: dict[str, Split] = {}
    next_id = 0
    for split, n in counts.items():
        rng = np.random.default_rng([seed, SPLIT_STREAMS[split]])
        specs = make_split(rng, n, size, seconds)
        ids = [f"video{next_id + i}" for i in range(n)]
        next_id += n
        splits[split] = list(zip(ids, specs))
    return splits


def _write_videos(
    out: Path, splits: dict[str, Split], datasets: Sequence[str], size: int, fps: int
) -> list[tuple[str, str, VideoSpec, list[Path]]]:
    """Draw every listed video once and copy it into the other layout; returns (split, id, spec, folders)."""
    wanted = [
        (split, vid, spec, [out / name / "videos" for name in datasets if split in LAYOUTS[name]])
        for split in ("train", "val", "test")
        for vid, spec in splits[split]
    ]
    wanted = [w for w in wanted if w[3]]
    for folder in {folder for *_, folders in wanted for folder in folders}:
        folder.mkdir(parents=True, exist_ok=True)
    for _, vid, spec, (first, *others) in tqdm(wanted, desc="draw videos", unit="video", leave=False):
        write_video(first / f"{vid}.mp4", spec, size, fps)
        for folder in others:
            shutil.copyfile(first / f"{vid}.mp4", folder / f"{vid}.mp4")
    return wanted


def _meta(splits: dict[str, Split], written: Sequence[tuple[str, str, VideoSpec, list[Path]]], **options: int) -> dict:
    """The metadata file's content: the generation options, then per written video what it shows."""
    videos = {
        vid: {
            "split": split,
            "kind": spec.kind,
            "background": spec.background,
            "objects": [list(o) for o in spec.objects],
            "motion": spec.motion,
            "twin": None if spec.twin is None else splits[split][spec.twin][0],
            "captions": spec.captions,
        }
        for split, vid, spec, _ in written
    }
    return {**options, "videos": videos}


def make_dataset(
    output_dir: Path,
    seed: int = 0,
    num_train: int = 200,
    num_val: int = 20,
    num_test: int = 100,
    size: int = 64,
    fps: int = 4,
    seconds: int = 4,
    datasets: Sequence[str] = ("msrvtt", "msvd"),
) -> dict[str, Path]:
    """Write the data set; returns its paths, keyed like the training flags (e.g. ``msrvtt_val_csv``)."""
    _check_options(datasets, num_train, num_val, num_test, size, fps, seconds)
    splits = _make_splits(seed, {"train": num_train, "val": num_val, "test": num_test}, size, seconds)
    out = Path(output_dir)
    paths: dict[str, Path] = {"root": out, "meta": out / "synthetic_meta.json"}
    written = _write_videos(out, splits, datasets, size, fps)
    if "msrvtt" in datasets:
        paths.update(_write_msrvtt(out / "msrvtt", splits))
    if "msvd" in datasets:
        paths.update(_write_msvd(out / "msvd", splits))
    meta = _meta(splits, written, seed=seed, size=size, fps=fps, seconds=seconds)
    _write_text(paths["meta"], json.dumps(meta, indent=1) + "\n")
    return paths


def _write_msrvtt(d: Path, splits: dict[str, Split]) -> dict[str, Path]:
    paths = {
        "msrvtt_train_csv": d / "MSRVTT_train.9k.csv",
        "msrvtt_data_path": d / "MSRVTT_data.json",
        "msrvtt_val_csv": d / "MSRVTT_JSFUSION_test.csv",
        "msrvtt_val_order_csv": d / "MSRVTT_JSFUSION_test_order.csv",
        "msrvtt_features_path": d / "videos",
    }
    _write_text(paths["msrvtt_train_csv"], _csv_text(["video_id"], [[vid] for vid, _ in splits["train"]]))
    members = [(split, vid, spec) for split in ("train", "test") for vid, spec in splits[split]]
    videos = [{"video_id": vid, "id": int(vid[len("video") :]), "split": split} for split, vid, _ in members]
    sentences = [{"caption": caption, "video_id": vid} for _, vid, spec in members for caption in spec.captions]
    for sen_id, sentence in enumerate(sentences):
        sentence["sen_id"] = sen_id
    _write_text(paths["msrvtt_data_path"], json.dumps({"videos": videos, "sentences": sentences}, indent=1) + "\n")
    header = ["key", "vid_key", "video_id", "sentence"]
    rows = [
        [f"ret{i}", f"msr{vid[len('video') :]}", vid, spec.captions[0]] for i, (vid, spec) in enumerate(splits["test"])
    ]
    _write_text(paths["msrvtt_val_csv"], _csv_text(header, rows))
    twins = [row for row, (_, spec) in zip(rows, splits["test"]) if spec.twin is not None]
    _write_text(paths["msrvtt_val_order_csv"], _csv_text(header, twins))
    return paths


def _write_msvd(d: Path, splits: dict[str, Split]) -> dict[str, Path]:
    for split in ("train", "val", "test"):
        _write_text(d / f"{split}_list.txt", "".join(f"{vid}\n" for vid, _ in splits[split]))
    raw = {vid: [c.split() for c in spec.captions] for split in ("train", "val", "test") for vid, spec in splits[split]}
    with open(d / "raw-captions.pkl", "wb") as f:
        pickle.dump(raw, f, protocol=4)
    return {"msvd_data_path": d, "msvd_features_path": d / "videos"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a small synthetic video-text data set (MSR-VTT and MSVD layouts)."
    )
    parser.add_argument("--output_dir", required=True, help="folder to write msrvtt/ and msvd/ into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_train", type=int, default=200, help="training videos")
    parser.add_argument("--num_val", type=int, default=20, help="MSVD validation videos")
    parser.add_argument("--num_test", type=int, default=100, help="test videos (MSR-VTT's test csv doubles as val)")
    parser.add_argument("--size", type=int, default=64, help="frame width and height in pixels")
    parser.add_argument("--fps", type=int, default=4, help="frames per second of the written videos")
    parser.add_argument("--seconds", type=int, default=4, help="video length; one state per second")
    parser.add_argument("--datasets", default="msrvtt,msvd", help="comma-separated layouts to write")
    args = parser.parse_args(argv)
    try:
        datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
        paths = make_dataset(
            Path(args.output_dir),
            args.seed,
            args.num_train,
            args.num_val,
            args.num_test,
            args.size,
            args.fps,
            args.seconds,
            datasets,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
