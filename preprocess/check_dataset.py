"""Check a data set layout before training: every annotation parsed, every referenced video decoded once.

    python preprocess/check_dataset.py --datatype msvd --data_path data/msvd --features_path data/msvd/videos

Takes the training flags (``--datatype``, ``--data_path``, ``--features_path``, ``--train_csv``, ``--val_csv``,
``--max_frames``, ``--feature_framerate``, ``--slice_framepos``, ...) and builds every split with the training code's
own dataset classes, so an annotation that passes here is read the same way in training. Then it decodes each
distinct (video, window) the items read, in parallel, exactly as a training item would, and prints: captions and
videos per split, videos found / missing / undecodable, and duration and fps statistics.

Exit status: 0 when training would run on the full data; 1 when an annotation is malformed or a video is missing or
yields no frame; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script from anywhere: the package root is this file's parent folder
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dataloaders.data_dataloaders import DATALOADER_DICT, DataConfig  # noqa: E402
from dataloaders.rawvideo_util import RawVideoExtractor, open_capture  # noqa: E402
from dataloaders.sampling import VideoSampling  # noqa: E402
from dataloaders.video_reading import read_header  # noqa: E402
from errors import UsageError  # noqa: E402
from modules.tokenization_clip import SimpleTokenizer  # noqa: E402

DATATYPES = tuple(DATALOADER_DICT)
LISTED = 10

Request = tuple[str, int | None, int | None]  # video file, start second, end second


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datatype", default="msrvtt", choices=DATATYPES)
    parser.add_argument(
        "--data_path",
        default="data/caption.pickle",
        help="MSR-VTT: MSRVTT_data.json; other data sets: the annotation folder",
    )
    parser.add_argument("--features_path", default="data/videos_feature.pickle", help="the video folder")
    parser.add_argument("--train_csv", default="data/.train.csv", help="MSR-VTT training id csv")
    parser.add_argument("--val_csv", default="data/.val.csv", help="MSR-VTT test csv (JSFusion)")
    parser.add_argument("--expand_msrvtt_sentences", action="store_true")
    parser.add_argument("--max_words", type=int, default=20)
    parser.add_argument("--max_frames", type=int, default=100)
    parser.add_argument("--feature_framerate", type=int, default=1)
    parser.add_argument("--slice_framepos", type=int, default=0, choices=[0, 1, 2])
    parser.add_argument("--image_resolution", type=int, default=224)
    parser.add_argument(
        "--num_workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="decoding processes (0 or 1: decode in this process)",
    )
    args = parser.parse_args(argv)
    # Out of range, every video would read as undecodable: one argument error instead.
    for flag, value, least in (
        ("--max_words", args.max_words, 3),
        ("--max_frames", args.max_frames, 1),
        ("--feature_framerate", args.feature_framerate, 0),
        ("--image_resolution", args.image_resolution, 1),
        ("--num_workers", args.num_workers, 0),
    ):
        if value < least:
            parser.error(f"argument {flag}: must be at least {least}, got {value}")
    return args


@dataclass
class Split:
    name: str
    dataset: object | None = None
    error: str | None = None


def _loader_settings(args: argparse.Namespace) -> tuple[DataConfig, VideoSampling]:
    """What ``DATALOADER_DICT``'s builders read: this tool's flags, plus loader settings that do not change which
    items a data set holds. ``skip_missing`` so that all missing files are collected, not only the first."""
    data = DataConfig(
        datatype=args.datatype,
        train_csv=args.train_csv,
        val_csv=args.val_csv,
        data_path=args.data_path,
        features_path=args.features_path,
        num_workers=0,
        max_words=args.max_words,
        expand_msrvtt_sentences=args.expand_msrvtt_sentences,
        frame_cache=None,
        skip_missing=True,
    )
    sampling = VideoSampling(
        max_frames=args.max_frames,
        feature_framerate=args.feature_framerate,
        slice_framepos=args.slice_framepos,
        image_resolution=args.image_resolution,
    )
    return data, sampling


def build_splits(args: argparse.Namespace) -> list[Split]:
    """Every split of ``--datatype``, built by the training code's own ``DATALOADER_DICT`` builders."""
    tokenizer = SimpleTokenizer()
    data, sampling = _loader_settings(args)
    builders = DATALOADER_DICT[args.datatype]
    splits = []
    dataset_logger = logging.getLogger("dataloaders")
    for name in ("train", "val", "test"):
        if builders[name] is None:  # the val builder serves as the test set
            continue
        split = Split(name)
        # The datasets log what this report states anyway; keep the report readable.
        level = dataset_logger.level
        dataset_logger.setLevel(logging.ERROR)
        try:
            if name == "train":
                loader = builders[name](data, sampling, tokenizer, 1)
            else:
                loader = builders[name](data, sampling, tokenizer, 1, subset=name)
            split.dataset = loader[0].dataset
        except (ValueError, FileNotFoundError, OSError) as exc:
            # A UsageError already says what is wrong with which file; other errors need their kind.
            split.error = str(exc) if isinstance(exc, UsageError) else f"{type(exc).__name__}: {exc}"
        finally:
            dataset_logger.setLevel(level)
        splits.append(split)
    return splits


_extractor: RawVideoExtractor | None = None
_sample_args: tuple[int, int] = (0, 0)


def _init_worker(framerate: int, size: int, max_frames: int, slice_framepos: int) -> None:
    global _extractor, _sample_args
    # One thread per process (the pool is the parallelism); also, a forked child that uses the OpenMP pool its
    # parent already started can deadlock, as with DataLoader workers, which do the same.
    torch.set_num_threads(1)
    _extractor = RawVideoExtractor(framerate=framerate, size=size)
    _sample_args = (max_frames, slice_framepos)


def probe(request: Request) -> dict[str, object]:
    """Container fps and duration, and the number of frames a training item would read (0: undecodable)."""
    path, start, end = request
    result: dict[str, object] = {"fps": 0.0, "duration": None, "error": None}
    max_frames, slice_framepos = _sample_args
    try:
        # The sample first: it refuses what is not a video file (a pipe would block cv2) or has an impossible header.
        result["n_frames"] = _extractor.get_video_sample(path, max_frames, slice_framepos, 0, start, end)[2]
        capture = open_capture(path)
        if capture.isOpened():
            frame_count, fps = read_header(capture, path)
            if fps > 0 and frame_count >= 0:
                result["fps"], result["duration"] = fps, frame_count / fps
        capture.release()
    except Exception as exc:  # the report lists every failure; one bad file must not stop the check
        result["n_frames"] = 0
        result["error"] = f"{type(exc).__name__}: {exc}"
    return result


def decode_all(requests: list[Request], args: argparse.Namespace) -> list[dict[str, object]]:
    init = (args.feature_framerate, args.image_resolution, args.max_frames, args.slice_framepos)
    bar = dict(total=len(requests), desc="decoding videos", unit="video")
    if args.num_workers <= 1:
        _init_worker(*init)
        return [probe(r) for r in tqdm(requests, **bar)]
    with ProcessPoolExecutor(args.num_workers, initializer=_init_worker, initargs=init) as pool:
        return list(tqdm(pool.map(probe, requests, chunksize=4), **bar))


def _stats(values: list[float]) -> str:
    if not values:
        return "n/a"
    a = np.asarray(values, dtype=np.float64)
    return f"min {a.min():.2f}  median {np.median(a):.2f}  mean {a.mean():.2f}  max {a.max():.2f}"


def _listing(names: list[str]) -> str:
    return ", ".join(names[:LISTED]) + (f", ... ({len(names) - LISTED} more)" if len(names) > LISTED else "")


def report_splits(splits: list[Split]) -> tuple[list[Request], list[str]]:
    """Print each split's sample and video counts; returns the videos to decode and the missing ids, deduplicated."""
    requests: dict[Request, None] = {}
    missing: dict[str, None] = {}
    for split in splits:
        if split.error:
            print(f"  {split.name:5s}: annotation error: {split.error}")
            continue
        ds = split.dataset
        videos = {video_id for video_id, *_rest in ds.all_pairs()}
        line = f"  {split.name:5s}: {len(ds)} samples (captions), {len(videos)} videos"
        if ds.missing_videos:
            line += f" present, {len(ds.missing_videos)} missing"
        print(line)
        missing.update(dict.fromkeys(ds.missing_videos))
        requests.update(dict.fromkeys(ds.video_requests()))
    return list(requests), list(missing)


def _undecodable_line(bad: list[tuple[Request, dict[str, object]]]) -> str:
    names = [
        f"{path}" + (f" [{s}, {e}]" if s is not None else "") + (f" ({res['error']})" if res["error"] else "")
        for (path, s, e), res in bad
    ]
    return "  undecodable (no frame read): " + _listing(names)


def report_videos(requests: list[Request], missing: list[str], args: argparse.Namespace) -> int:
    """Decode every requested video and print the counts, failures and duration/fps statistics; returns #bad."""
    results = decode_all(requests, args) if requests else []
    files = {path for path, _start, _end in requests}
    bad = [(r, res) for r, res in zip(requests, results) if res["n_frames"] == 0]
    durations = {}
    fps = {}
    for (path, _s, _e), res in zip(requests, results):
        if res["duration"] is not None:
            durations[path] = res["duration"]
        if res["fps"]:
            fps[path] = res["fps"]

    print(f"Videos: {len(files)} found, {len(missing)} missing, {len(bad)} undecodable")
    if missing:
        print(f"  missing (no file under {args.features_path}): {_listing(missing)}")
    if bad:
        print(_undecodable_line(bad))
    print(f"Duration (s): {_stats(list(durations.values()))}")
    print(f"FPS:          {_stats(list(fps.values()))}")
    return len(bad)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(errors="backslashreplace")  # a file name that is not UTF-8 is shown, not a crash
    splits = build_splits(args)

    print(f"Data set {args.datatype}: annotations {args.data_path}, videos {args.features_path}")
    requests, missing = report_splits(splits)
    n_bad = report_videos(requests, missing, args)

    broken = any(s.error for s in splits) or bool(missing) or bool(n_bad)
    print(
        "Result: "
        + (
            "problems found (see above). Training refuses missing videos unless --skip_missing_videos "
            "is given, and replaces undecodable ones; evaluation would score them as blank videos"
            if broken
            else "OK, every annotation parsed and every video decoded"
        )
    )
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
