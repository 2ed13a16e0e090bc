"""Reading a video file with cv2, as untrusted input: opening it, its header within caps, and the two ways to read
the sampled frames (seek per frame as the original, or one forward pass)."""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Iterable, Sequence

import cv2
import numpy as np

# cv2's frame-accurate seek to frame k restarts decoding at the last keyframe at or before k - 16
# (opencv/videoio/src/cap_ffmpeg_impl.hpp, CvCapture_FFMPEG::seek).
_CV2_SEEK_BACKOFF = 16
# A seek also flushes and restarts the decoder: measured at about 5 frames' decoding (320x240 h264), rounded up.
_SEEK_COST_FRAMES = 8
# A header claiming more is damaged or hostile (2**24 frames are six days at 30 fps): the file is refused unread.
MAX_FRAME_COUNT = 2**24
# 8K UHD: one decoded frame of a header claiming more could take gigabytes.
MAX_PIXELS = 7680 * 4320


class UnreadableVideoError(ValueError):
    """One video that cannot be read (not a regular file, an impossible header): the caller treats it as a video
    with no decodable frame, names it, and goes on."""


def open_capture(video_path: str, *args) -> cv2.VideoCapture:
    """``cv2.VideoCapture(video_path, *args)`` for any file name.

    OpenCV crashes the process (a segfault, not an exception) on a name that is not valid UTF-8, which Linux allows
    (Python holds the bad bytes as surrogate escapes). Such a file is opened through ``/proc/self/fd``, whose name is
    plain ASCII; FFmpeg opens its own descriptor, so ours is closed straight away.
    """
    try:
        video_path.encode("utf-8")
    except UnicodeEncodeError:
        pass
    else:
        return cv2.VideoCapture(video_path, *args)
    fd = os.open(video_path, os.O_RDONLY)
    try:
        alias = f"/proc/self/fd/{fd}"
        if not os.path.exists(alias):
            raise ValueError(
                f"{video_path!r}: the file name is not valid UTF-8, which OpenCV cannot open on this "
                f"system; rename the file"
            )
        return cv2.VideoCapture(alias, *args)
    finally:
        os.close(fd)


def check_video_file(video_path: str) -> None:
    """FileNotFoundError when nothing is there; UnreadableVideoError when what is there is not a regular file (a
    folder, a dangling symlink or a symlink loop, a pipe that would block the reader)."""
    if os.path.isfile(video_path):
        return
    if not os.path.lexists(video_path):
        raise FileNotFoundError(f"video file not found: {video_path}")
    if os.path.isdir(video_path):
        kind = "a folder"
    elif os.path.islink(video_path):
        kind = "a symlink to nothing: dangling or a loop"
    else:
        kind = "not a regular file"
    raise UnreadableVideoError(f"{video_path}: not a video file ({kind})")


def read_header(cap: cv2.VideoCapture, video_path: str) -> tuple[int, float]:
    """(frame count, fps) as the container states them; fps 0 when it states none usable (not a video: no frame
    is read). UnreadableVideoError for a header beyond the caps."""
    frame_count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
    fps = cap.get(cv2.CAP_PROP_FPS)
    pixels = cap.get(cv2.CAP_PROP_FRAME_WIDTH) * cap.get(cv2.CAP_PROP_FRAME_HEIGHT)
    if not math.isfinite(frame_count) or frame_count > MAX_FRAME_COUNT:
        raise UnreadableVideoError(
            f"{video_path}: the header claims {frame_count:.0f} frames, more than the {MAX_FRAME_COUNT} accepted; "
            f"the file is damaged or not a video"
        )
    if not math.isfinite(pixels) or pixels > MAX_PIXELS:
        raise UnreadableVideoError(
            f"{video_path}: the header claims frames of {pixels:.0f} pixels, more than the {MAX_PIXELS} (8K UHD) "
            f"accepted; the file is damaged or too large"
        )
    return int(frame_count), fps if math.isfinite(fps) and fps >= 1 else 0.0


def read_seek_per_frame(cap: cv2.VideoCapture, indices: Iterable[int]) -> list[np.ndarray]:
    """The original's read: seek and read each index, stopping at the first failure. BGR frames."""
    frames = []
    for idx in indices:
        cap.set(cv2.CAP_PROP_POS_FRAMES, idx)
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    return frames


def scan_packets(video_path: str) -> tuple[int, list[int]]:
    """Number of video packets and the positions of keyframe packets, without decoding (cv2 raw mode)."""
    cap = open_capture(video_path, cv2.CAP_FFMPEG, [cv2.CAP_PROP_FORMAT, -1])
    n, keyframes = 0, []
    try:
        while cap.grab():
            if cap.get(cv2.CAP_PROP_LRF_HAS_KEY_FRAME):
                keyframes.append(n)
            n += 1
    finally:
        cap.release()
    return n, keyframes


def _pts_frame(cap: cv2.VideoCapture, fps: float) -> int:
    """cv2's own frame number of the last grabbed frame, from its timestamp."""
    return int(round(cap.get(cv2.CAP_PROP_POS_MSEC) * fps / 1000.0))


def read_forward(
    cap: cv2.VideoCapture, targets: Sequence[int], keyframes: Sequence[int], fps: float
) -> list[np.ndarray] | None:
    """BGR frames at the increasing ``targets`` in one forward pass.

    Frames in between are decoded with ``grab()`` and never converted; where cv2's seek would restart decoding
    past the current position by more than a seek costs, it seeks instead. Returns None when a read fails or a
    frame's timestamp disagrees with its position, i.e. when this stream cannot be trusted to behave like the
    seek-per-frame reference.
    """
    if not cap.grab():
        return None
    cur, first = 0, _pts_frame(cap, fps)
    frames = []
    for k in targets:
        i = bisect.bisect_right(keyframes, k - _CV2_SEEK_BACKOFF) - 1
        restart = keyframes[i] if i >= 0 else 0
        if restart - cur > _SEEK_COST_FRAMES:
            cap.set(cv2.CAP_PROP_POS_FRAMES, k)
            if not cap.grab():
                return None
            cur = k
        while cur < k:
            if not cap.grab():
                return None
            cur += 1
        ok, frame = cap.retrieve()
        if not ok or _pts_frame(cap, fps) - first != k:
            return None
        frames.append(frame)
    return frames
