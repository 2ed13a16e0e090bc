"""A video file -> the selected frames as a normalised tensor (frame selection, decoding, transform, frame cache).

Two ways to the same frames:

* ``get_video_data`` is the original's algorithm, kept as the reference: one cv2 seek and read per sampled frame,
  each frame through the transform.
* ``get_video_sample`` builds one dataset sample. It works out which sampled frames the sample keeps *before*
  decoding, then reads forward once, decoding skipped frames with ``grab()`` and converting only the kept ones
  (seeking instead where cv2's seek decodes less). When the stream does not behave as planned it falls back to the
  reference read, so the result is always bit for bit the one assembled from ``get_video_data``.

An optional frame cache (``frame_cache``) stores the kept frames after resize and crop, so later epochs skip
decoding altogether.

Videos are untrusted input: every list this module builds is bounded by what the file really holds (its packets or
its decoded frames), never by the counts its header claims; a header beyond the caps of ``video_reading`` is refused.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Callable, Iterator

import cv2
import numpy as np
import torch
from PIL import Image
from torchvision.transforms import CenterCrop, InterpolationMode, Resize, v2

from dataloaders.frame_cache import cache_file, read_cached, save_cached
from dataloaders.video_reading import MAX_FRAME_COUNT as MAX_FRAME_COUNT  # re-exported: callers meet these here
from dataloaders.video_reading import MAX_PIXELS as MAX_PIXELS
from dataloaders.video_reading import UnreadableVideoError as UnreadableVideoError
from dataloaders.video_reading import (
    check_video_file,
    open_capture,
    read_forward,
    read_header,
    read_seek_per_frame,
    scan_packets,
)

# Decoding runs in DataLoader worker processes, which already use every core: OpenCV's own thread pool would only
# oversubscribe them, and a pool started before the workers fork is not fork-safe.
cv2.setNumThreads(1)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _check_request(sample_fp: int, start_time, end_time) -> None:
    """The original's argument asserts, as ValueErrors."""
    if start_time is not None or end_time is not None:
        ints = all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in (start_time, end_time))
        if not (ints and 0 <= start_time < end_time):
            raise ValueError(
                f"start_time and end_time must both be ints with 0 <= start_time < end_time, "
                f"got start_time={start_time!r}, end_time={end_time!r}"
            )
    if sample_fp <= -1:
        raise ValueError(f"framerate must be >= 0 (0 reads every frame), got {sample_fp}")


def sample_frame_indices(
    frame_count: int, fps: int, sample_fp: int, start_time: int | None = None, end_time: int | None = None
) -> list[int]:
    """The frame indices the original tries to read, in order; reading stops at the first that fails.

    ``fps`` is the container's rate truncated to int (29.97 -> 29) and every "second" is ``fps`` frames long.
    For each second from the window start to its end *inclusive* it takes the offsets
    ``range(0, fps, fps // sample_fp)[:sample_fp]``; ``sample_fp == 0`` means every frame.
    """
    return list(iter_frame_indices(frame_count, fps, sample_fp, start_time, end_time))


def iter_frame_indices(
    frame_count: int, fps: int, sample_fp: int, start_time: int | None = None, end_time: int | None = None
) -> Iterator[int]:
    """:func:`sample_frame_indices` one at a time (arguments checked now): a reader takes only what it decodes, so a
    header's claims (any fps, any count) cost no memory."""
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    total = (frame_count + fps - 1) // fps
    start_sec, end_sec = 0, total
    if start_time is not None:
        start_sec, end_sec = int(start_time), min(int(end_time), total)
    if sample_fp > 0:
        interval = max(fps // sample_fp, 1)
    else:
        sample_fp, interval = fps, 1
    offsets = range(0, fps, interval)
    if len(offsets) < sample_fp:
        raise ValueError(f"cannot sample {sample_fp} frames per second from a {fps} fps video")
    offsets = offsets[:sample_fp]
    return (sec * fps + off for sec in range(start_sec, end_sec + 1) for off in offsets)


def select_kept(n_frames: int, max_frames: int, slice_framepos: int) -> np.ndarray:
    """Positions among the ``n_frames`` sampled frames that a sample keeps, as the original's data sets slice."""
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if slice_framepos not in (0, 1, 2):
        raise ValueError(f"slice_framepos must be 0 (head), 1 (tail) or 2 (uniform), got {slice_framepos}")
    if n_frames <= max_frames:
        return np.arange(n_frames)
    if slice_framepos == 0:
        return np.arange(max_frames)
    if slice_framepos == 1:
        return np.arange(n_frames - max_frames, n_frames)
    return np.linspace(0, n_frames - 1, num=max_frames, dtype=int)


def order_positions(n: int, frame_order: int) -> np.ndarray:
    """The permutation the original applies to ``n`` kept frames: 0 as is, 1 reversed, 2 ``np.random.shuffle``."""
    if frame_order == 0:
        return np.arange(n)
    if frame_order == 1:
        return np.arange(n - 1, -1, -1)
    _check_frame_order(frame_order)
    order = np.arange(n)
    np.random.shuffle(order)  # numpy's global RNG, as the original
    return order


def _check_frame_order(frame_order: int) -> None:
    if frame_order not in (0, 1, 2):
        raise ValueError(f"frame_order must be 0 (ordinary), 1 (reverse) or 2 (random), got {frame_order}")


def normalize_uint8(frames: np.ndarray) -> torch.Tensor:
    """uint8 RGB frames [T, 3, H, W] -> float32, bit for bit ``ToTensor`` then CLIP ``Normalize``."""
    return _normalize(torch.from_numpy(np.ascontiguousarray(frames)))


def _normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 (x / 255 - mean) / std, on x's device, in float32 as ``Normalize`` does."""
    shape = (3, 1, 1)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=x.device).view(shape)
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=x.device).view(shape)
    return x.float().div_(255).sub_(mean).div_(std)


def normalize_video(video: torch.Tensor, video_mask: torch.Tensor) -> torch.Tensor:
    """A batch's video as the model reads it: uint8 pixels (a loader asked for ``uint8_frames``) -> the normalised
    float32 frames, with the padded frames (mask 0) zero, exactly what the datasets give as floats; float video is
    returned unchanged.

    The one place where uint8 frames are normalised for training, evaluation and the benches: called on the device,
    so the loader copies a quarter of the bytes of float32 (an eighth of the original's float64).
    """
    if video.dtype != torch.uint8:
        return video
    keep = video_mask.reshape(*video_mask.shape, *([1] * (video.dim() - video_mask.dim()))).bool()
    return _normalize(video).masked_fill_(~keep, 0.0)


class FrameTransform:
    """CLIP's frame transform: bicubic resize of the short side to ``size``, centre crop, CLIP mean/std.

    ``pil_resize=True`` resizes through PIL exactly as the original (bit for bit); the default resizes the uint8
    tensor with torchvision's antialiased bicubic, about 3x faster and never more than 2/255 from PIL before
    normalisation (tests/test_rawvideo_util.py). A class, not a lambda, so it pickles into spawned workers.
    """

    def __init__(self, size: int, pil_resize: bool = False):
        self.size, self.pil_resize = size, pil_resize
        self._pil_steps = (Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size))

    def resize_crop(self, frames_rgb: np.ndarray) -> np.ndarray:
        """uint8 RGB frames [T, H, W, 3] -> uint8 [T, 3, size, size] (channels first, as the model reads them)."""
        if self.pil_resize:
            out = []
            for frame in frames_rgb:
                image = Image.fromarray(frame).convert("RGB")
                for step in self._pil_steps:
                    image = step(image)
                out.append(np.asarray(image).transpose(2, 0, 1))
            return np.stack(out)
        x = torch.from_numpy(np.ascontiguousarray(frames_rgb)).permute(0, 3, 1, 2)
        x = v2.functional.resize(x, self.size, interpolation=InterpolationMode.BICUBIC, antialias=True)
        return v2.functional.center_crop(x, self.size).contiguous().numpy()

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """One PIL image -> float32 [3, size, size], as the original's ``Compose`` did."""
        return normalize_uint8(self.resize_crop(np.array(image.convert("RGB"))[None]))[0]


def _open(video_path: str) -> cv2.VideoCapture:
    check_video_file(video_path)
    return open_capture(video_path)


def empty_video(max_frames: int, size: int, uint8: bool = False) -> np.ndarray:
    """A sample's all-padding video [1, max_frames, 1, 3, size, size]: float64 as the original, or uint8 pixels."""
    return np.zeros((1, max_frames, 1, 3, size, size), dtype=np.uint8 if uint8 else np.float64)


class RawVideoExtractorCV2:
    """Reads videos with cv2 and turns frames into CLIP input (the original's class name and arguments).

    ``centercrop`` is kept for the original's signature; like the original, the transform always centre-crops.
    ``cache_dir`` turns on the frame cache used by :meth:`get_video_sample`. ``pil_resize=True`` gives the
    original's pixels exactly; the default tensor resize is within 2/255 of them and faster (see FrameTransform).
    """

    def __init__(
        self,
        centercrop: bool = False,
        size: int = 224,
        framerate: int = -1,
        cache_dir: str | None = None,
        pil_resize: bool = False,
    ):
        self.centercrop = centercrop
        self.size = size
        self.framerate = framerate
        self.cache_dir = cache_dir
        self._cache_writable = True  # until a write fails (a full disk): then frames are used uncached
        self.transform = FrameTransform(size, pil_resize)

    # ---- the reference path -------------------------------------------------------------------------------------

    def video_to_tensor(
        self,
        video_file: str,
        preprocess,
        sample_fp: int = 0,
        start_time: int | None = None,
        end_time: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """The original's read: every sampled frame, seek per frame, through ``preprocess``."""
        _check_request(sample_fp, start_time, end_time)
        cap = _open(video_file)
        try:
            frame_count, fps_float = read_header(cap, video_file)
            fps = int(fps_float)
            if fps <= 0:  # cv2 could not open it as a video; the original divided by zero here
                return {"video": torch.zeros(1)}
            try:
                indices = iter_frame_indices(frame_count, fps, sample_fp, start_time, end_time)
            except ValueError as e:
                raise ValueError(f"{video_file}: {e}") from e
            frames = read_seek_per_frame(cap, indices)
        finally:
            cap.release()
        images = [preprocess(Image.fromarray(cv2.cvtColor(f, cv2.COLOR_BGR2RGB)).convert("RGB")) for f in frames]
        if not images:
            return {"video": torch.zeros(1)}
        return {"video": torch.tensor(np.stack(images))}

    def get_video_data(
        self, video_path: str, start_time: int | None = None, end_time: int | None = None
    ) -> dict[str, torch.Tensor]:
        """``{'video': float32 [T, 3, size, size]}``, or ``zeros(1)`` when no frame could be read."""
        return self.video_to_tensor(
            video_path, self.transform, sample_fp=self.framerate, start_time=start_time, end_time=end_time
        )

    def process_raw_data(self, raw_video_data: torch.Tensor) -> torch.Tensor:
        """[T, 3, H, W] -> [T, 1, 3, H, W]."""
        s = raw_video_data.size()
        return raw_video_data.view(-1, 1, s[-3], s[-2], s[-1])

    def process_frame_order(self, raw_video_data: torch.Tensor, frame_order: int = 0) -> torch.Tensor:
        """0 keeps the order, 1 reverses it, 2 shuffles with numpy's global RNG."""
        if frame_order == 0:
            return raw_video_data
        return raw_video_data[order_positions(raw_video_data.size(0), frame_order), ...]

    # ---- the sample path ----------------------------------------------------------------------------------------

    def get_video_sample(
        self,
        video_path: str,
        max_frames: int,
        slice_framepos: int = 0,
        frame_order: int = 0,
        start_time: int | None = None,
        end_time: int | None = None,
        uint8: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """One sample's video: float64 [1, max_frames, 1, 3, size, size], int64 mask [1, max_frames], frame count.

        Identical to slicing, ordering and copying :meth:`get_video_data`'s frames as the original datasets do.
        ``uint8=True`` gives the frames' pixels before normalisation instead (uint8, same shape; padding 0), for
        :func:`normalize_video` to turn into those same floats later, on the device.
        ``n_frames == 0`` means nothing could be decoded (video and mask stay zero); the caller decides what to do.
        """
        select_kept(0, max_frames, slice_framepos)  # validates max_frames and slice_framepos before any work
        _check_frame_order(frame_order)
        video = np.empty((1, max_frames, 1, 3, self.size, self.size), dtype=np.uint8 if uint8 else np.float64)
        # uint8: the frames land in the sample itself; float: in a scratch array, normalised into the sample below
        pixels = video[0, :, 0] if uint8 else np.empty((max_frames, 3, self.size, self.size), dtype=np.uint8)
        order = None if frame_order == 0 else lambda n: order_positions(n, frame_order)
        n = self._read_kept(video_path, max_frames, slice_framepos, start_time, end_time, pixels, order)
        video[0, n:] = 0
        if n and not uint8:
            video[0, :n, 0] = normalize_uint8(pixels[:n]).numpy()
        video_mask = np.zeros((1, max_frames), dtype=np.int64)
        video_mask[0, :n] = 1
        return video, video_mask, n

    def _kept_frames(
        self, video_path: str, max_frames: int, slice_framepos: int, start_time: int | None, end_time: int | None
    ) -> np.ndarray:
        """The kept frames in time order after resize and crop, uint8 [n, 3, size, size], through the cache."""
        out = np.empty((max_frames, 3, self.size, self.size), dtype=np.uint8)
        return out[: self._read_kept(video_path, max_frames, slice_framepos, start_time, end_time, out)]

    def _read_kept(
        self,
        video_path: str,
        max_frames: int,
        slice_framepos: int,
        start_time: int | None,
        end_time: int | None,
        out: np.ndarray,
        order: Callable[[int], np.ndarray] | None = None,
    ) -> int:
        """Write the n kept frames after resize and crop into ``out[:n]`` (uint8 [max_frames, 3, size, size]),
        reordered as ``frames[order(n)]`` when ``order`` is given, from the cache when it holds them; returns n."""
        _check_request(self.framerate, start_time, end_time)
        check_video_file(video_path)
        cached = None
        if self.cache_dir is not None:
            cached = self._cache_file(video_path, max_frames, slice_framepos, start_time, end_time)
            n = read_cached(cached, out, order)
            if n is not None:
                return n
        decoded = self._decode_kept(video_path, max_frames, slice_framepos, start_time, end_time)
        if not decoded:  # may be transient: never cached
            return 0
        frames = self.transform.resize_crop(np.stack([cv2.cvtColor(f, cv2.COLOR_BGR2RGB) for f in decoded]))
        # A cache that cannot be written is left alone from then on.
        if cached is not None and self._cache_writable:
            self._cache_writable = save_cached(cached, frames)
        n = len(frames)
        out[:n] = frames if order is None else frames[order(n)]
        return n

    def _decode_kept(
        self, video_path: str, max_frames: int, slice_framepos: int, start_time: int | None, end_time: int | None
    ) -> list[np.ndarray]:
        """BGR frames the sample keeps, in time order, decoding as little as the plan allows."""
        cap = _open(video_path)
        try:
            frame_count, fps_float = read_header(cap, video_path)
            fps = int(fps_float)
            if fps <= 0:
                return []
            try:
                indices = iter_frame_indices(frame_count, fps, self.framerate, start_time, end_time)
            except ValueError as e:
                raise ValueError(f"{video_path}: {e}") from e
            n_packets, keyframes = scan_packets(video_path) if frame_count > 1 else (0, [])
            # When the packets present agree with the container's count, a read below the count succeeds and a
            # read at or past it fails (cv2 clamps seeks to the count), so T is known before decoding; the indices
            # below the count are then as many as the file's real packets at most.
            if n_packets == frame_count > 1:
                indices = list(itertools.takewhile(lambda i: i < frame_count, indices))
            if n_packets == frame_count > 1 and indices:
                kept = [indices[j] for j in select_kept(len(indices), max_frames, slice_framepos)]
                got = read_forward(cap, kept, keyframes, fps_float)
                if got is not None:
                    return got
                cap.release()
                cap = _open(video_path)
            # The stream is not what the container says: read it the reference way.
            frames = read_seek_per_frame(cap, indices)
            return [frames[j] for j in select_kept(len(frames), max_frames, slice_framepos)]
        finally:
            cap.release()

    # ---- the frame cache ----------------------------------------------------------------------------------------

    def _cache_file(
        self, video_path: str, max_frames: int, slice_framepos: int, start_time: int | None, end_time: int | None
    ) -> str:
        settings = {
            "framerate": self.framerate,
            "max_frames": max_frames,
            "slice_framepos": slice_framepos,
            "start_time": None if start_time is None else int(start_time),
            "end_time": None if end_time is None else int(end_time),
            "size": self.size,
            "centercrop": bool(self.centercrop),
            "pil_resize": self.transform.pil_resize,
        }
        return cache_file(self.cache_dir, video_path, settings)


# ---- pictures of the frames a sample keeps --------------------------------------------------------------------------


def kept_frames_uint8(
    extractor: RawVideoExtractorCV2,
    video_path: str,
    max_frames: int,
    slice_framepos: int,
    start_time: int | None = None,
    end_time: int | None = None,
) -> np.ndarray:
    """The frames :meth:`RawVideoExtractorCV2.get_video_sample` keeps, in time order, before normalisation:
    uint8 RGB [n, 3, size, size] (n = 0 when nothing could be decoded)."""
    return extractor._kept_frames(video_path, max_frames, slice_framepos, start_time, end_time)


def thumbnail_strip(frames: np.ndarray, count: int = 4, height: int = 96, quality: int = 85) -> bytes:
    """``count`` frames spread evenly over uint8 RGB ``frames`` [n, 3, H, W], side by side in one JPEG."""
    if frames.ndim != 4 or frames.shape[1] != 3 or len(frames) == 0:
        raise ValueError(f"thumbnail_strip: expected uint8 frames [n>0, 3, H, W], got shape {tuple(frames.shape)}")
    picks = np.unique(np.linspace(0, len(frames) - 1, num=min(count, len(frames))).round().astype(int))
    width = round(height * frames.shape[3] / frames.shape[2])
    tiles = [
        Image.fromarray(np.ascontiguousarray(frames[i].transpose(1, 2, 0))).resize((width, height), Image.BICUBIC)
        for i in picks
    ]
    strip = Image.new("RGB", (width * len(tiles), height))
    for k, tile in enumerate(tiles):
        strip.paste(tile, (k * width, 0))
    out = io.BytesIO()
    strip.save(out, format="JPEG", quality=quality)
    return out.getvalue()


RawVideoExtractor = RawVideoExtractorCV2
