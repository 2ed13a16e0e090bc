"""Time per training sample (12 frames, slice_framepos 2, framerate 1): ours, the original, the limit, the cache.

Builds MSR-VTT-like videos with the imageio-ffmpeg binary (15 s, 30 fps, 320x240 h264 with x264's default keyframe
interval and with one keyframe a second, and a 720p one) in ``--video_dir`` (default: a temporary folder), then
prints per file, side by side:

* baseline: the original algorithm (re-implemented here): a cv2 seek and read for every sampled frame, the PIL
  transform on each, then slicing;
* ours: ``RawVideoExtractor.get_video_sample`` without cache;
* limit: the cheaper of (a) a bare sequential ``grab()`` up to the last needed frame, converting only the needed
  ones, and (b) a cv2 seek + read per needed frame; plus the cheapest transform of the needed frames (PIL or
  torchvision v2 antialiased bicubic on the uint8 tensor, whichever is faster here);
* cache: ``get_video_sample`` with a warm ``cache_dir``.

Then one cached training sample, per call: ours (an MSR-VTT training item read through a warm frame cache, uint8
frames) against its limit (``np.load`` of the cached ``.npy`` + tokenising the caption), and the frame reads alone
(ours, ``np.load``, ``np.load(mmap_mode="r")`` copied out).

Usage: ``python bench/bench_video_loading.py [--quick] [--video_dir DIR]`` (``--toy``: one small 2 s video, one
run per method, for the suite).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataloaders.dataloader_msrvtt_retrieval import MSRVTT_TrainDataLoader  # noqa: E402
from dataloaders.dataset_util import encode_caption  # noqa: E402
from dataloaders.frame_cache import read_cached  # noqa: E402
from dataloaders.rawvideo_util import RawVideoExtractor, normalize_uint8, sample_frame_indices, select_kept  # noqa: E402
from dataloaders.sampling import VideoSampling  # noqa: E402
from modules.tokenization_clip import SimpleTokenizer  # noqa: E402
from util import atomic_path  # noqa: E402

MAX_FRAMES, SLICE_FRAMEPOS, FRAMERATE, SIZE = 12, 2, 1, 224

VIDEOS = {  # name: (width, height, extra x264 arguments)
    "320x240 default GOP": (320, 240, []),
    "320x240 GOP 30": (320, 240, ["-g", "30", "-keyint_min", "30", "-sc_threshold", "0"]),
    "1280x720 default GOP": (1280, 720, []),
}
TOY_VIDEOS = {"64x48 toy": (64, 48, [])}
CAPTION = "a man in a red shirt is talking to a woman about cooking pasta in a small kitchen"


def make_video(path: Path, width: int, height: int, extra: list[str], seconds: int = 15) -> Path:
    """A moving test pattern with temporal noise, so the encoder and decoder do real work (like camera footage)."""
    if path.exists():
        return path
    import imageio_ffmpeg

    with atomic_path(path, sync=False) as tmp:
        subprocess.run(
            [
                imageio_ffmpeg.get_ffmpeg_exe(),
                "-hide_banner",
                "-loglevel",
                "error",
                "-y",
                "-f",
                "lavfi",
                "-i",
                f"testsrc2=size={width}x{height}:rate=30,noise=alls=6:allf=t",
                "-t",
                str(seconds),
                "-c:v",
                "libx264",
                "-preset",
                "veryfast",
                "-pix_fmt",
                "yuv420p",
                *extra,
                str(tmp),
            ],
            check=True,
        )
    return path


# ---- the original algorithm, written out as the baseline -----------------------------------------------------------


def baseline_sample(path: str, transform: Callable[[Image.Image], torch.Tensor]) -> np.ndarray:
    cap = cv2.VideoCapture(path)
    frame_count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    fps = int(cap.get(cv2.CAP_PROP_FPS))
    total = (frame_count + fps - 1) // fps
    inds = list(np.arange(0, fps, max(fps // FRAMERATE, 1)))[:FRAMERATE]
    images, ret = [], True
    for sec in np.arange(0, total + 1):
        if not ret:
            break
        for ind in inds:
            cap.set(cv2.CAP_PROP_POS_FRAMES, int(sec * fps) + ind)
            ret, frame = cap.read()
            if not ret:
                break
            images.append(transform(Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)).convert("RGB")))
    cap.release()
    raw = torch.tensor(np.stack(images)).view(-1, 1, 3, SIZE, SIZE)
    if MAX_FRAMES < raw.shape[0]:
        raw = raw[np.linspace(0, raw.shape[0] - 1, num=MAX_FRAMES, dtype=int)]
    video = np.zeros((1, MAX_FRAMES, 1, 3, SIZE, SIZE), dtype=np.float64)
    video[0][: raw.shape[0]] = raw.numpy()
    return video


# ---- the limit ------------------------------------------------------------------------------------------------------


def needed_frames(path: str) -> list[int]:
    cap = cv2.VideoCapture(path)
    frame_count, fps = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), int(cap.get(cv2.CAP_PROP_FPS))
    indices = [i for i in sample_frame_indices(frame_count, fps, FRAMERATE) if i < frame_count]
    return [indices[j] for j in select_kept(len(indices), MAX_FRAMES, SLICE_FRAMEPOS)]


def decode_sequential(path: str, needed: list[int]) -> list[np.ndarray]:
    cap, out, wanted = cv2.VideoCapture(path), [], set(needed)
    for i in range(needed[-1] + 1):
        cap.grab()
        if i in wanted:
            out.append(cap.retrieve()[1])
    return out


def decode_seek_each(path: str, needed: list[int]) -> list[np.ndarray]:
    cap, out = cv2.VideoCapture(path), []
    for i in needed:
        cap.set(cv2.CAP_PROP_POS_FRAMES, i)
        out.append(cap.read()[1])
    return out


def transform_pil(frames: list[np.ndarray], extractor: RawVideoExtractor) -> torch.Tensor:
    return torch.stack([extractor.transform(Image.fromarray(cv2.cvtColor(f, cv2.COLOR_BGR2RGB))) for f in frames])


def transform_tensor(frames: list[np.ndarray]) -> torch.Tensor:
    x = torch.from_numpy(np.stack([cv2.cvtColor(f, cv2.COLOR_BGR2RGB) for f in frames])).permute(0, 3, 1, 2)
    x = v2.functional.resize(x, SIZE, interpolation=InterpolationMode.BICUBIC, antialias=True)
    return normalize_uint8(v2.functional.center_crop(x, SIZE).numpy())


def best_times(methods: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Fastest of ``repeats`` runs of each method, in ms, taken in turns so that load changes hit all alike."""
    best = {name: float("inf") for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], 1e3 * (time.perf_counter() - t))
    return best


def bench_file(path: str, repeats: int, cache_dir: str) -> dict[str, object]:
    ours = RawVideoExtractor(framerate=FRAMERATE, size=SIZE)
    ours_pil = RawVideoExtractor(framerate=FRAMERATE, size=SIZE, pil_resize=True)
    cached = RawVideoExtractor(framerate=FRAMERATE, size=SIZE, cache_dir=cache_dir)
    needed = needed_frames(path)
    frames = decode_sequential(path, needed)
    sample = ours.get_video_sample(path, MAX_FRAMES, SLICE_FRAMEPOS)[0]
    original = baseline_sample(path, ours_pil.transform)
    r: dict[str, object] = {}
    # bit for bit equal to the original algorithm run with the same transform, and the cache to the uncached
    r["identical"] = (
        np.array_equal(sample, baseline_sample(path, ours.transform))
        and np.array_equal(ours_pil.get_video_sample(path, MAX_FRAMES, SLICE_FRAMEPOS)[0], original)
        and np.array_equal(cached.get_video_sample(path, MAX_FRAMES, SLICE_FRAMEPOS)[0], sample)
        and np.array_equal(cached.get_video_sample(path, MAX_FRAMES, SLICE_FRAMEPOS)[0], sample)
    )
    std = np.array([0.26862954, 0.26130258, 0.27577711]).reshape(1, 1, 1, 3, 1, 1)
    r["max_diff_255"] = float(np.abs(sample - original).__mul__(std).max() * 255)
    t = best_times(
        {
            "baseline": lambda: baseline_sample(path, ours_pil.transform),
            "ours": lambda: ours.get_video_sample(path, MAX_FRAMES, SLICE_FRAMEPOS),
            "ours_pil": lambda: ours_pil.get_video_sample(path, MAX_FRAMES, SLICE_FRAMEPOS),
            "sequential": lambda: decode_sequential(path, needed),
            "seek": lambda: decode_seek_each(path, needed),
            "pil": lambda: transform_pil(frames, ours_pil),
            "tensor": lambda: transform_tensor(frames),
            "cache": lambda: cached.get_video_sample(path, MAX_FRAMES, SLICE_FRAMEPOS),
        },
        repeats,
    )
    r.update({k: t[k] for k in ("baseline", "ours", "ours_pil", "cache")})
    r["limit"] = min(t["sequential"], t["seek"]) + min(t["pil"], t["tensor"])
    r["limit_how"] = (
        ("sequential" if t["sequential"] <= t["seek"] else "seek each")
        + " + "
        + ("PIL" if t["pil"] <= t["tensor"] else "tensor")
    )
    r["pil_ms_frame"], r["tensor_ms_frame"] = t["pil"] / len(frames), t["tensor"] / len(frames)
    return r


def best_per_call(methods: dict[str, Callable[[], object]], repeats: int, calls: int) -> dict[str, float]:
    """Fastest mean over ``calls`` calls of each method, in ms, ``repeats`` rounds taken in turns."""
    return {
        name: ms / calls for name, ms in best_times({k: _times(f, calls) for k, f in methods.items()}, repeats).items()
    }


def _times(fn: Callable[[], object], calls: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(calls):
            fn()

    return run


def bench_cached_sample(video: str, work: Path, repeats: int, calls: int) -> dict[str, float]:
    """One MSR-VTT training item through a warm frame cache against np.load of its entry + tokenising its caption."""
    folder = work / "features"
    folder.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.abspath(video), folder / "video0.mp4")
    (work / "train.csv").write_text("video_id\nvideo0\n")
    (work / "data.json").write_text(json.dumps({"sentences": [{"video_id": "video0", "caption": CAPTION}]}))
    tokenizer = SimpleTokenizer()
    sampling = VideoSampling(MAX_FRAMES, FRAMERATE, SLICE_FRAMEPOS, SIZE, 0)
    paths = (str(work / "train.csv"), str(work / "data.json"), str(folder), tokenizer, 32, sampling)
    ds = MSRVTT_TrainDataLoader(*paths, frame_cache=str(work / "cache"), uint8_frames=True)
    first = ds[0]  # fills the cache
    (entry,) = (work / "cache").rglob("*.npy")
    out = np.empty((MAX_FRAMES, 3, SIZE, SIZE), dtype=np.uint8)
    t = best_per_call(
        {
            "ours": lambda: ds[0],
            "limit": lambda: (np.load(entry), encode_caption(tokenizer, CAPTION, 32)),
            "read_cached": lambda: read_cached(str(entry), out),
            "np.load": lambda: np.load(entry),
            "np.load mmap": lambda: np.array(np.load(entry, mmap_mode="r")),
        },
        repeats,
        calls,
    )
    t["identical"] = all(np.array_equal(a, b) for a, b in zip(first, ds[0]))
    t["frames"] = int(first[4].sum())
    return t


def print_cached_sample(r: dict[str, float]) -> None:
    print(
        f"\ncached training sample ({r['frames']} frames, {SIZE} px, uint8; MSR-VTT item, mean per call):\n"
        f"{'ours':>10}{'limit':>10}{'ours/limit':>12}   frames alone:{'read_cached':>13}{'np.load':>10}"
        f"{'mmap+copy':>11}{'np.load/ours':>14}  same\n"
        f"{r['ours']:>8.3f}ms{r['limit']:>8.3f}ms{r['ours'] / r['limit']:>11.2f}x{'':17}{r['read_cached']:>11.3f}ms"
        f"{r['np.load']:>8.3f}ms{r['np.load mmap']:>9.3f}ms{r['np.load'] / r['read_cached']:>13.2f}x"
        f"  {'yes' if r['identical'] else 'NO'}\n"
        "limit: np.load of the cached .npy + tokenising the caption; ours: the whole item (cache key, frames read "
        "into the sample,\ncaption, mask); same: the warm-cache item equals the one that filled the cache."
    )


def main(argv: list[str] | None = None) -> dict[str, dict[str, object]]:
    """The table; returns each file's figures by its name."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two timed runs per method (about 1-2 minutes)")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed runs per method, taken in turns; the fastest counts"
    )
    parser.add_argument("--video_dir", default=None, help="where to build (and reuse) the videos; default: a temp dir")
    parser.add_argument("--toy", action="store_true", help="one 64x48 video of 2 s, one run per method (seconds)")
    args = parser.parse_args(argv)
    repeats = 1 if args.toy else 2 if args.quick else args.repeats
    videos, seconds = (TOY_VIDEOS, 2) if args.toy else (VIDEOS, 15)
    results = {}
    torch.set_num_threads(1)  # as in a DataLoader worker

    with tempfile.TemporaryDirectory() as tmp:
        video_dir = Path(args.video_dir or tmp)
        video_dir.mkdir(parents=True, exist_ok=True)
        print(
            f"{os.cpu_count()} CPU cores, torch threads 1, cv2 {cv2.__version__}; best of {repeats}; "
            f"{MAX_FRAMES} frames, slice_framepos {SLICE_FRAMEPOS}, framerate {FRAMERATE}, {SIZE}px"
        )
        header = (
            f"{'file':<22}{'baseline':>10}{'ours':>9}{'ours/PIL':>10}{'limit':>9}{'cache':>8}  "
            f"{'base/ours':>9}{'ours/limit':>11}{'base/cache':>11}  same  max|ours-PIL|  limit made of"
        )
        print(header + "\n" + "-" * len(header))
        for name, (w, h, extra) in videos.items():
            path = str(make_video(video_dir / (name.replace(" ", "_") + ".mp4"), w, h, extra, seconds))
            r = results[name] = bench_file(path, repeats, os.path.join(tmp, "cache"))
            print(
                f"{name:<22}{r['baseline']:>8.0f}ms{r['ours']:>7.0f}ms{r['ours_pil']:>8.0f}ms{r['limit']:>7.0f}ms"
                f"{r['cache']:>6.1f}ms  {r['baseline'] / r['ours']:>8.2f}x{r['ours'] / r['limit']:>10.2f}x"
                f"{r['baseline'] / r['cache']:>10.0f}x  {'yes' if r['identical'] else 'NO ':<4}  "
                f"{r['max_diff_255']:>7.2f}/255  {r['limit_how']} "
                f"(PIL {r['pil_ms_frame']:.1f} ms/frame, tensor {r['tensor_ms_frame']:.1f})"
            )
        print(
            "base: the original's seek per sampled frame + PIL; ours: get_video_sample (tensor resize); "
            "ours/PIL: pil_resize=True;\nlimit: min(sequential grab to the last needed frame, cv2 seek per needed "
            "frame) + the faster transform; cache: warm --frame_cache;\nsame: bit-identical to the original "
            "algorithm run with the same transform (and the cache to no cache)."
        )
        first_video = str(video_dir / (next(iter(videos)).replace(" ", "_") + ".mp4"))
        # sub-millisecond calls on a shared machine: many short rounds, so that one of them runs undisturbed
        rounds, calls = (1, 5) if args.toy else (3 * repeats, 50)
        r = results["cached sample"] = bench_cached_sample(first_video, Path(tmp) / "sample", rounds, calls)
        print_cached_sample(r)
    return results


if __name__ == "__main__":
    main()
