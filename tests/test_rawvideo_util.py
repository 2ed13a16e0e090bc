"""Frame selection, sample assembly, the forward read against the seek-per-frame reference, and the frame cache."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import write_lying_avi, write_video
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

from dataloaders import frame_cache
from dataloaders import rawvideo_util as rvu
from dataloaders.rawvideo_util import (
    RawVideoExtractor,
    RawVideoExtractorCV2,
    order_positions,
    sample_frame_indices,
    select_kept,
)

SIZE = 32  # small crops keep the file fast; the maths does not depend on the size


def _ffmpeg(out: Path, seconds: float, fps: float, extra: list) -> Path:
    import imageio_ffmpeg

    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-hide_banner",
        "-loglevel",
        "error",
        "-y",
        "-f",
        "lavfi",
        "-i",
        f"testsrc2=size=64x48:rate={fps}",
        "-t",
        str(seconds),
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        *extra,
        str(out),
    ]
    subprocess.run(cmd, check=True)
    return out


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("videos")
    v = {
        "mp4v_25": write_video(d / "mp4v_25.mp4", 100, 25),
        "mp4v_2997": write_video(d / "mp4v_2997.mp4", 90, 29.97),
        "mp4v_30": write_video(d / "mp4v_30.mp4", 90, 30),
        "mp4v_3": write_video(d / "mp4v_3.mp4", 12, 3),
        "short": write_video(d / "short.mp4", 10, 25),
        "one": write_video(d / "one.mp4", 1, 25),
        "h264": _ffmpeg(d / "h264.mp4", 4, 25, []),  # x264 defaults: B-frames, one GOP
        "h264_gop": _ffmpeg(d / "h264_gop.mp4", 4, 25, ["-g", "25", "-sc_threshold", "0", "-movflags", "+faststart"]),
    }
    data = v["h264_gop"].read_bytes()  # index at the front, frames cut off: the container promises 100, ~40 exist
    (d / "truncated.mp4").write_bytes(data[: int(len(data) * 0.55)])
    v["truncated"] = d / "truncated.mp4"
    (d / "corrupt.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    v["corrupt"] = d / "corrupt.mp4"
    (d / "empty.mp4").write_bytes(b"")
    v["empty"] = d / "empty.mp4"
    return {k: str(p) for k, p in v.items()}


def _decode_all(path: str) -> list:
    cap = cv2.VideoCapture(path)
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            return frames
        frames.append(f)


def _reference_transform(frame_bgr: np.ndarray, size: int = SIZE) -> torch.Tensor:
    """The original's transform, written out independently of the module."""
    t = Compose(
        [
            Resize(size, interpolation=InterpolationMode.BICUBIC),
            CenterCrop(size),
            lambda im: im.convert("RGB"),
            ToTensor(),
            Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ]
    )
    return t(Image.fromarray(cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB)).convert("RGB"))


def _assemble(data: torch.Tensor, ex: RawVideoExtractorCV2, max_frames: int, slice_framepos: int, frame_order: int):
    """The original datasets' slicing loop, written out, on get_video_data's output."""
    video = np.zeros((1, max_frames, 1, 3, ex.size, ex.size), dtype=np.float64)
    mask = np.zeros((1, max_frames), dtype=np.int64)
    if data.dim() > 3:
        raw = ex.process_raw_data(data)
        if max_frames < raw.shape[0]:
            if slice_framepos == 0:
                raw = raw[:max_frames]
            elif slice_framepos == 1:
                raw = raw[-max_frames:]
            else:
                raw = raw[np.linspace(0, raw.shape[0] - 1, num=max_frames, dtype=int)]
        raw = ex.process_frame_order(raw, frame_order=frame_order)
        video[0][: raw.shape[0]] = raw.numpy()
        mask[0][: raw.shape[0]] = 1
    return video, mask


# ---- frame selection ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, expected",
    [
        ((100, 25, 1), [0, 25, 50, 75, 100]),  # 4 s: the inclusive end second asks for frame 100
        ((90, 29, 1), [0, 29, 58, 87, 116]),  # 29.97 fps truncates to 29-frame "seconds"
        ((90, 30, 1), [0, 30, 60, 90]),
        ((60, 30, 2), [0, 15, 30, 45, 60, 75]),  # interval 15
        ((9, 3, 1), [0, 3, 6, 9]),
        ((6, 3, 2), [0, 1, 3, 4, 6, 7]),  # interval 1, offsets cut to 2
        ((50, 25, 3), [0, 8, 16, 25, 33, 41, 50, 58, 66]),  # offsets [0, 8, 16, 24][:3]
        ((7, 3, 0), list(range(12))),  # 0 = every frame
        ((10, 25, 1), [0, 25]),  # shorter than a second
        ((1, 25, 1), [0, 25]),  # one frame
        ((0, 25, 1), [0]),
    ],
)
def test_sample_frame_indices_by_hand(args, expected):
    assert sample_frame_indices(*args) == expected


@pytest.mark.parametrize(
    "window, expected",
    [
        ((1, 2), [25, 50]),  # seconds 1 and 2
        ((2, 10), [50, 75, 100]),  # end clipped to the 4 s total, still inclusive
        ((5, 6), []),  # starts after the end
    ],
)
def test_sample_frame_indices_window(window, expected):
    assert sample_frame_indices(100, 25, 1, *window) == expected


def test_sample_frame_indices_rejects_more_samples_than_frames():
    with pytest.raises(ValueError, match="3 fps"):
        sample_frame_indices(30, 3, 5)


@pytest.mark.parametrize(
    "name, fps_int, n_frames, expected",
    [
        ("mp4v_25", 25, 100, [0, 25, 50, 75]),
        ("mp4v_2997", 29, 90, [0, 29, 58, 87]),
        ("mp4v_30", 30, 90, [0, 30, 60]),
        ("mp4v_3", 3, 12, [0, 3, 6, 9]),
        ("short", 25, 10, [0]),
        ("one", 25, 1, [0]),
    ],
)
def test_get_video_data_reads_the_hand_computed_frames(videos, name, fps_int, n_frames, expected):
    cap = cv2.VideoCapture(videos[name])
    assert int(cap.get(cv2.CAP_PROP_FPS)) == fps_int and int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == n_frames
    seq = _decode_all(videos[name])
    got = RawVideoExtractor(size=SIZE, framerate=1, pil_resize=True).get_video_data(videos[name])["video"]
    assert got.dtype == torch.float32 and got.shape == (len(expected), 3, SIZE, SIZE)
    ref = torch.stack([_reference_transform(seq[i]) for i in expected])
    assert torch.equal(got, ref)


def test_get_video_data_window_and_every_frame(videos):
    seq = _decode_all(videos["mp4v_25"])
    ex = RawVideoExtractor(size=SIZE, framerate=1, pil_resize=True)
    got = ex.get_video_data(videos["mp4v_25"], start_time=1, end_time=2)["video"]
    assert torch.equal(got, torch.stack([_reference_transform(seq[i]) for i in (25, 50)]))
    every = RawVideoExtractor(size=SIZE, framerate=0, pil_resize=True).get_video_data(videos["mp4v_3"])["video"]
    assert len(every) == 12  # 12 frames at 3 fps: all of them, then the 5th second fails
    assert torch.equal(every[5], _reference_transform(_decode_all(videos["mp4v_3"])[5]))


@pytest.mark.parametrize("name", ["corrupt", "empty"])
def test_undecodable_file_gives_zeros(videos, name):
    ex = RawVideoExtractor(size=SIZE, framerate=1)
    assert torch.equal(ex.get_video_data(videos[name])["video"], torch.zeros(1))
    video, mask, n = ex.get_video_sample(videos[name], max_frames=4)
    assert n == 0 and not video.any() and not mask.any()


def test_zero_frame_video_gives_zeros(tmp_path):
    path = str(write_video(tmp_path / "zero.mp4", 0, 25))
    ex = RawVideoExtractor(size=SIZE, framerate=1)
    assert torch.equal(ex.get_video_data(path)["video"], torch.zeros(1))
    assert ex.get_video_sample(path, max_frames=4)[2] == 0


def test_file_name_that_is_not_utf8_is_read_like_any_other(videos, tmp_path):
    # cv2.VideoCapture segfaults on such a name; the bytes 0xff never occur in UTF-8.
    odd = os.fsdecode(os.fsencode(str(tmp_path)) + b"/odd\xff name.mp4")
    with open(videos["h264_gop"], "rb") as src, open(odd, "wb") as dst:
        dst.write(src.read())
    ex = RawVideoExtractor(size=SIZE, framerate=1)
    video, mask, n = ex.get_video_sample(odd, max_frames=4, slice_framepos=2)
    ref_video, ref_mask, ref_n = ex.get_video_sample(str(videos["h264_gop"]), max_frames=4, slice_framepos=2)
    assert n == ref_n == 4
    assert np.array_equal(video, ref_video) and np.array_equal(mask, ref_mask)
    assert torch.equal(ex.get_video_data(odd)["video"], ex.get_video_data(str(videos["h264_gop"]))["video"])


def test_missing_file_is_named(tmp_path):
    ex = RawVideoExtractor(size=SIZE, framerate=1)
    missing = str(tmp_path / "nope.mp4")
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        ex.get_video_data(missing)
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        ex.get_video_sample(missing, max_frames=4)


def test_bad_arguments_are_value_errors(videos):
    with pytest.raises(ValueError, match="framerate"):
        RawVideoExtractor(size=SIZE).get_video_data(videos["short"])  # the default framerate -1 is invalid
    ex = RawVideoExtractor(size=SIZE, framerate=1)
    for window in [(2, 2), (-1, 3), (1.0, 3), (None, 3)]:
        with pytest.raises(ValueError, match="start_time"):
            ex.get_video_data(videos["short"], *window)
    with pytest.raises(ValueError, match="mp4v_3.mp4"):
        RawVideoExtractor(size=SIZE, framerate=5).get_video_sample(videos["mp4v_3"], max_frames=4)
    with pytest.raises(ValueError, match="slice_framepos"):
        ex.get_video_sample(videos["short"], max_frames=4, slice_framepos=3)
    with pytest.raises(ValueError, match="frame_order"):
        ex.get_video_sample(videos["short"], max_frames=4, frame_order=3)


def _real_looking_frame(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth gradients, hard-edged shapes and lines, and sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255], -1)
    for _ in range(8):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(3, max(4, h // 3))
        img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
    img[h // 3 : h // 3 + 3, :] = 255
    img[:, w // 4 : w // 4 + 2] = 0
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("h, w", [(240, 320), (720, 1280), (320, 240), (48, 64), (100, 150), (224, 224)])
def test_tensor_resize_within_2_of_pil(h, w):
    """The default resize of the uint8 tensor stays within 2/255 of the original's PIL resize, down- and upscaling."""
    frames = np.stack([_real_looking_frame(h, w, seed) for seed in range(2)])
    pil = rvu.FrameTransform(224, pil_resize=True).resize_crop(frames)
    fast = rvu.FrameTransform(224).resize_crop(frames)
    assert pil.shape == fast.shape == (2, 3, 224, 224) and pil.dtype == fast.dtype == np.uint8
    diff = np.abs(pil.astype(int) - fast.astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.2
    one = rvu.FrameTransform(224, pil_resize=True)(Image.fromarray(frames[0]))
    assert torch.equal(one, _reference_transform(frames[0][..., ::-1].copy(), 224))  # BGR in, like a cv2 frame


# ---- sample assembly ----------------------------------------------------------------------------------------------


def test_select_kept():
    assert select_kept(30, 12, 2).tolist() == [0, 2, 5, 7, 10, 13, 15, 18, 21, 23, 26, 29]
    assert select_kept(30, 12, 0).tolist() == list(range(12))
    assert select_kept(30, 12, 1).tolist() == list(range(18, 30))
    assert select_kept(5, 12, 2).tolist() == [0, 1, 2, 3, 4]
    assert select_kept(12, 12, 1).tolist() == list(range(12))


def test_frame_order():
    assert order_positions(4, 0).tolist() == [0, 1, 2, 3]
    assert order_positions(4, 1).tolist() == [3, 2, 1, 0]
    np.random.seed(7)
    got = order_positions(6, 2)
    expected = np.random.RandomState(7).permutation(6)  # shuffle of arange draws like permutation
    assert got.tolist() == expected.tolist()
    x = torch.arange(4.0).view(4, 1, 1, 1, 1)
    ex = RawVideoExtractor(size=SIZE, framerate=1)
    assert ex.process_frame_order(x, 1).flatten().tolist() == [3.0, 2.0, 1.0, 0.0]
    assert ex.process_raw_data(torch.zeros(5, 3, 8, 8)).shape == (5, 1, 3, 8, 8)


def test_sample_layout_and_order(videos):
    ex = RawVideoExtractor(size=SIZE, framerate=1)
    video, mask, n = ex.get_video_sample(videos["mp4v_25"], max_frames=6)
    assert video.dtype == np.float64 and video.shape == (1, 6, 1, 3, SIZE, SIZE)
    assert mask.dtype == np.int64 and mask.tolist() == [[1, 1, 1, 1, 0, 0]] and n == 4
    assert not video[0, 4:].any() and video[0, :4].std(axis=(1, 2, 3, 4)).min() > 0
    rev, _, _ = ex.get_video_sample(videos["mp4v_25"], max_frames=6, frame_order=1)
    assert np.array_equal(rev[0, :4], video[0, 3::-1])
    np.random.seed(3)
    shuf, _, _ = ex.get_video_sample(videos["mp4v_25"], max_frames=6, frame_order=2)
    np.random.seed(3)
    perm = np.arange(4)
    np.random.shuffle(perm)
    assert np.array_equal(shuf[0, :4], video[0, perm])


# ---- the forward read equals the reference -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, framerate",
    [
        ("h264", 1),
        ("h264", 3),
        ("h264_gop", 1),
        ("h264_gop", 3),
        ("mp4v_25", 1),
        ("mp4v_25", 3),
        ("mp4v_2997", 1),
        ("truncated", 1),
        ("truncated", 3),
        ("short", 1),
        ("one", 1),
        ("mp4v_3", 0),
        ("short", 0),
    ],
)
def test_sample_equals_reference_assembly(videos, name, framerate):
    ex = RawVideoExtractor(size=SIZE, framerate=framerate)
    data = ex.get_video_data(videos[name])["video"]
    for max_frames in (1, 3, 64):
        for slice_framepos in (0, 1, 2):
            frame_order = slice_framepos % 2  # reversal exercised too, without doubling the matrix
            video, mask, n = ex.get_video_sample(videos[name], max_frames, slice_framepos, frame_order)
            ref_video, ref_mask = _assemble(data, ex, max_frames, slice_framepos, frame_order)
            assert np.array_equal(video, ref_video), (name, framerate, max_frames, slice_framepos)
            assert np.array_equal(mask, ref_mask) and n == ref_mask.sum()


def test_clean_files_never_take_the_reference_read(videos, monkeypatch):
    expected = {}
    for name in ("h264", "h264_gop", "mp4v_2997"):
        for slice_framepos in (0, 1, 2):
            expected[name, slice_framepos] = RawVideoExtractor(size=SIZE, framerate=1).get_video_sample(
                videos[name], 3, slice_framepos
            )
    monkeypatch.setattr(rvu, "read_seek_per_frame", lambda *a: pytest.fail("fell back to seek-per-frame"))
    for (name, slice_framepos), ref in expected.items():
        got = RawVideoExtractor(size=SIZE, framerate=1).get_video_sample(videos[name], 3, slice_framepos)
        assert all(np.array_equal(a, b) for a, b in zip(got, ref))


def test_sample_equals_reference_with_window(videos):
    ex = RawVideoExtractor(size=SIZE, framerate=2)
    for window in [(1, 2), (0, 3), (2, 9), (5, 8)]:
        data = ex.get_video_data(videos["h264"], *window)["video"]
        for slice_framepos in (0, 1, 2):
            video, mask, _ = ex.get_video_sample(videos["h264"], 3, slice_framepos, 0, *window)
            ref_video, ref_mask = _assemble(data, ex, 3, slice_framepos, 0)
            assert np.array_equal(video, ref_video) and np.array_equal(mask, ref_mask)


def test_truncated_file_is_read_the_reference_way(videos):
    path = videos["truncated"]
    assert int(cv2.VideoCapture(path).get(cv2.CAP_PROP_FRAME_COUNT)) == 100
    assert rvu.scan_packets(path)[0] < 75  # the container promises frames that are not there
    ex = RawVideoExtractor(size=SIZE, framerate=1)
    # seeks past the cut still return frames; the sample must reproduce them, not what a forward read would see
    n_reference = len(ex.get_video_data(path)["video"])
    assert n_reference > len(range(0, len(_decode_all(path)), 25))
    assert ex.get_video_sample(path, 64, 2)[2] == n_reference


class _CountingCapture:
    """A cv2.VideoCapture that counts seeks, to see the forward read choose between seeking and grabbing."""

    def __init__(self, path):
        self.cap, self.seeks = cv2.VideoCapture(path), 0

    def set(self, prop, value):
        self.seeks += prop == cv2.CAP_PROP_POS_FRAMES
        return self.cap.set(prop, value)

    def __getattr__(self, name):
        return getattr(self.cap, name)


def test_forward_read_seeks_only_past_keyframes(videos):
    path = videos["h264_gop"]  # keyframes every 25 frames
    seq = _decode_all(path)
    n_packets, keyframes = rvu.scan_packets(path)
    assert n_packets == 100 and keyframes == [0, 25, 50, 75]
    for targets, seeks in [([0, 99], 1), ([0, 10, 20, 30, 40], 0), ([3, 45, 99], 2)]:
        cap = _CountingCapture(path)
        got = rvu.read_forward(cap, targets, keyframes, 25.0)
        assert cap.seeks == seeks
        assert all(np.array_equal(g, seq[k]) for g, k in zip(got, targets))


# ---- the frame cache ----------------------------------------------------------------------------------------------


def test_frame_cache(videos, tmp_path, monkeypatch):
    src = tmp_path / "v.mp4"
    src.write_bytes(Path(videos["h264"]).read_bytes())
    cache = tmp_path / "cache"
    ex = RawVideoExtractor(size=SIZE, framerate=2, cache_dir=str(cache))
    plain = RawVideoExtractor(size=SIZE, framerate=2)
    first = ex.get_video_sample(str(src), 5, 2)
    files = sorted(cache.rglob("*.npy"))
    assert len(files) == 1 and not list(cache.rglob(".tmp-*"))
    stored = np.load(files[0], allow_pickle=False)
    assert stored.dtype == np.uint8 and stored.shape == (5, 3, SIZE, SIZE)

    def no_decoding(*a, **k):
        raise AssertionError("decoded although the cache holds the sample")

    with monkeypatch.context() as m:
        m.setattr(rvu.cv2, "VideoCapture", no_decoding)
        second = ex.get_video_sample(str(src), 5, 2)
        np.random.seed(0)
        shuffled_a = ex.get_video_sample(str(src), 5, 2, frame_order=2)[0]
        shuffled_b = ex.get_video_sample(str(src), 5, 2, frame_order=2)[0]
    for a, b, c in zip(first, second, plain.get_video_sample(str(src), 5, 2)):
        assert np.array_equal(a, b) and np.array_equal(a, c)
    assert not np.array_equal(shuffled_a, shuffled_b)  # order is drawn after the cache, per call

    ex.get_video_sample(str(src), 4, 2)  # another setting: another entry
    RawVideoExtractor(size=SIZE, framerate=1, cache_dir=str(cache)).get_video_sample(str(src), 5, 2)
    ex.get_video_sample(str(src), 5, 2, start_time=1, end_time=3)
    RawVideoExtractor(size=SIZE, framerate=2, cache_dir=str(cache), pil_resize=True).get_video_sample(str(src), 5, 2)
    assert len(list(cache.rglob("*.npy"))) == 5
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))  # a rewritten file
    ex.get_video_sample(str(src), 5, 2)
    assert len(list(cache.rglob("*.npy"))) == 6


def test_frame_cache_rewrites_a_bad_entry_and_skips_failures(videos, tmp_path):
    cache = tmp_path / "cache"
    ex = RawVideoExtractor(size=SIZE, framerate=1, cache_dir=str(cache))
    good = ex.get_video_sample(videos["mp4v_25"], 3, 0)
    entry = next(cache.rglob("*.npy"))
    entry.write_bytes(b"not an array")
    again = ex.get_video_sample(videos["mp4v_25"], 3, 0)
    assert all(np.array_equal(a, b) for a, b in zip(good, again))
    assert np.load(entry, allow_pickle=False).shape == (3, 3, SIZE, SIZE)
    assert ex.get_video_sample(videos["corrupt"], 3, 0)[2] == 0
    assert len(list(cache.rglob("*.npy"))) == 1  # an undecodable file is not cached


def _sample_before_direct_reads(frames: np.ndarray, max_frames: int, frame_order: int, uint8: bool):
    """How a sample was assembled before the cache read into it: the kept frames (as np.load gave them) reordered
    with numpy's global RNG, then copied into a zero-filled array; floats through ToTensor's scaling and Normalize."""
    n = len(frames)
    video = np.zeros((1, max_frames, 1, 3, SIZE, SIZE), dtype=np.uint8 if uint8 else np.float64)
    mask = np.zeros((1, max_frames), dtype=np.int64)
    if n:
        order = np.arange(n)
        if frame_order == 1:
            order = order[::-1]
        elif frame_order == 2:
            np.random.shuffle(order)
        frames = frames[order]
        normalize = Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
        video[0, :n, 0] = frames if uint8 else normalize(torch.from_numpy(frames).float().div(255)).numpy()
        mask[0, :n] = 1
    return video, mask, n


@pytest.mark.parametrize("uint8", [True, False], ids=["uint8", "float"])
@pytest.mark.parametrize("frame_order", [0, 1, 2])
@pytest.mark.parametrize("max_frames", [3, 6], ids=["full", "padded"])
def test_samples_bit_identical_to_the_copying_assembly(videos, tmp_path, uint8, frame_order, max_frames):
    ex = RawVideoExtractor(size=SIZE, framerate=1, cache_dir=str(tmp_path / "cache"))
    plain = RawVideoExtractor(size=SIZE, framerate=1)
    path = videos["mp4v_25"]  # 4 sampled frames
    for seed, reader in enumerate((ex, ex, plain)):  # filling the cache, reading it, no cache
        np.random.seed(seed)
        got = reader.get_video_sample(path, max_frames, 0, frame_order, uint8=uint8)
        after = np.random.random()
        (entry,) = (tmp_path / "cache").rglob("*.npy")
        np.random.seed(seed)
        expected = _sample_before_direct_reads(np.load(entry), max_frames, frame_order, uint8)
        assert got[2] == expected[2] == min(4, max_frames)
        for a, b in zip(got[:2], expected[:2]):
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
        assert np.random.random() == after  # the same draws from numpy's RNG, no more


# ---- uint8 samples, normalised later ---------------------------------------------------------------------------------


@pytest.mark.parametrize("frame_order", [0, 1])
def test_uint8_sample_normalised_later_equals_float_sample(videos, frame_order):
    ex = RawVideoExtractor(size=SIZE, framerate=1)
    video, mask, n = ex.get_video_sample(videos["mp4v_25"], 6, 0, frame_order)
    pixels, mask8, n8 = ex.get_video_sample(videos["mp4v_25"], 6, 0, frame_order, uint8=True)
    assert pixels.dtype == np.uint8 and pixels.shape == video.shape and (n8, n) == (4, 4)
    assert np.array_equal(mask8, mask) and not pixels[0, n:].any()
    # a batch of two samples, as a DataLoader collates them
    batch = torch.from_numpy(np.stack([pixels, pixels]))
    got = rvu.normalize_video(batch, torch.from_numpy(np.stack([mask8, mask8])))
    assert got.dtype == torch.float32 and got.shape == batch.shape
    assert torch.equal(got[0].double(), torch.from_numpy(video)) and torch.equal(got[1], got[0])
    # and torchvision's ToTensor + Normalize of the same pixels, frame by frame
    norm = Normalize(rvu.CLIP_MEAN, rvu.CLIP_STD)
    for t in range(n):
        assert torch.equal(got[0, 0, t, 0], norm(ToTensor()(pixels[0, t, 0].transpose(1, 2, 0))))
    float_video = torch.from_numpy(video)
    assert rvu.normalize_video(float_video, torch.from_numpy(mask)) is float_video


# ---- untrusted files -------------------------------------------------------------------------------------------------


def test_header_claiming_2_to_31_frames_is_refused_unread(tmp_path):
    path = str(write_lying_avi(tmp_path / "liar.avi", 8, 2**31))
    assert cv2.VideoCapture(path).get(cv2.CAP_PROP_FRAME_COUNT) == 2**31
    ex = RawVideoExtractor(size=SIZE, framerate=1)
    tracemalloc.start()
    try:
        for read in (lambda: ex.get_video_sample(path, 4), lambda: ex.get_video_data(path)):
            with pytest.raises(rvu.UnreadableVideoError, match=r"liar\.avi: the header claims 2147483648 frames"):
                read()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20  # the 2**31 claimed frames were never listed


def test_header_lies_below_the_cap_cost_only_what_is_decoded(tmp_path):
    # 2**24 claimed frames at 10 fps and 1 frame per second: 1.7 million indices if listed; the read stops at the
    # first index the file does not hold (10), so one frame comes back.
    path = str(write_lying_avi(tmp_path / "liar.avi", 8, 2**24))
    tracemalloc.start()
    try:
        video, mask, n = RawVideoExtractor(size=SIZE, framerate=1).get_video_sample(path, 4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == 1 and mask.tolist() == [[1, 0, 0, 0]]
    assert peak < 8 * 2**20


def test_frame_indices_are_lazy_whatever_the_fps():
    every = rvu.iter_frame_indices(8, 10**9, 0)  # "every frame" of a 1e9 fps header: 2e9 indices if listed
    assert [next(every) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="fps must be positive"):
        rvu.iter_frame_indices(8, 0, 1)  # checked at the call, not at the first index


class _FakeCapture:
    def __init__(self, count: float, fps: float, width: float = 64, height: float = 48):
        self.props = {
            cv2.CAP_PROP_FRAME_COUNT: count,
            cv2.CAP_PROP_FPS: fps,
            cv2.CAP_PROP_FRAME_WIDTH: width,
            cv2.CAP_PROP_FRAME_HEIGHT: height,
        }

    def get(self, prop):
        return self.props[prop]


@pytest.mark.parametrize(
    "count, fps, expected",
    [
        (90, 29.97, (90, 29.97)),
        (90, float("nan"), (90, 0.0)),  # no usable rate: not a video, no frame read
        (90, float("inf"), (90, 0.0)),
        (90, 0.5, (90, 0.0)),  # truncates to 0 frames per "second"
        (-1, 25.0, (-1, 25.0)),  # unknown count: read until a frame fails, as the original
    ],
)
def test_read_header_turns_unusable_rates_into_no_video(count, fps, expected):
    assert rvu.read_header(_FakeCapture(count, fps), "v.mp4") == expected


@pytest.mark.parametrize(
    "count, width, height, match",
    [
        (2**24 + 1, 64, 48, "claims 16777217 frames"),
        (float("inf"), 64, 48, "claims inf frames"),
        (float("nan"), 64, 48, "claims nan frames"),
        (10, 100_000, 100_000, "frames of 10000000000 pixels"),
        (10, 7681, 4320, "more than the 33177600"),
    ],
)
def test_read_header_refuses_impossible_headers(count, width, height, match):
    with pytest.raises(rvu.UnreadableVideoError, match=f"^v.mp4: the header {match}|{match}"):
        rvu.read_header(_FakeCapture(count, 25.0, width, height), "v.mp4")


@pytest.mark.parametrize("kind", ["folder", "dangling", "loop", "fifo"])
def test_what_is_not_a_file_is_an_unreadable_video(tmp_path, kind):
    path = tmp_path / "v.mp4"
    if kind == "folder":
        path.mkdir()
    elif kind == "dangling":
        path.symlink_to(tmp_path / "gone.mp4")
    elif kind == "loop":
        path.symlink_to(tmp_path / "w.mp4")
        (tmp_path / "w.mp4").symlink_to(path)
    else:
        os.mkfifo(path)  # cv2 would block forever opening it
    expected = {"folder": "a folder", "dangling": "a symlink to nothing: dangling or a loop"}
    expected["loop"] = expected["dangling"]
    ex = RawVideoExtractor(size=SIZE, framerate=1, cache_dir=str(tmp_path / "cache"))
    for read in (lambda: ex.get_video_sample(str(path), 4), lambda: ex.get_video_data(str(path))):
        with pytest.raises(rvu.UnreadableVideoError) as caught:
            read()
        assert str(caught.value) == f"{path}: not a video file ({expected.get(kind, 'not a regular file')})"
    assert not (tmp_path / "cache").exists()


def test_full_disk_under_the_frame_cache_warns_once_and_goes_on(videos, tmp_path, monkeypatch, caplog):
    cache = tmp_path / "cache"
    ex = RawVideoExtractor(size=SIZE, framerate=1, cache_dir=str(cache))
    writes = []

    def disk_full(f, *a, **k):
        writes.append(f.name)
        f.write(b"\x93NUMPY")  # a partial file, as a write that ran out of space leaves
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(frame_cache.np, "save", disk_full)
    with caplog.at_level(logging.WARNING, logger="dataloaders.frame_cache"):
        got = [ex.get_video_sample(videos[name], 3) for name in ("mp4v_25", "mp4v_30", "mp4v_25")]
    monkeypatch.undo()
    plain = RawVideoExtractor(size=SIZE, framerate=1)
    for sample, name in zip(got, ("mp4v_25", "mp4v_30", "mp4v_25")):
        assert all(np.array_equal(a, b) for a, b in zip(sample, plain.get_video_sample(videos[name], 3)))
    assert len(writes) == 1  # tried once, then left alone
    assert [r.getMessage() for r in caplog.records] == [
        f"frame cache: cannot write {writes[0].rsplit('/', 1)[0]}/"
        f"{os.path.basename(ex._cache_file(videos['mp4v_25'], 3, 0, None, None))} (No space left on device); "
        "going on without writing to the cache in this process"
    ]
    assert [p for p in cache.rglob("*") if p.is_file()] == []  # the partial file is removed
