"""The frame cache of ``rawvideo_util``: a sample's kept frames after resize and crop, as uint8 ``.npy`` files."""

from __future__ import annotations

import hashlib
import json
import logging
import os

import numpy as np

from util import atomic_path

logger = logging.getLogger(__name__)

# Bump when the cached content changes meaning, so old cache files are never read as new ones.
_CACHE_FORMAT = 1


def cache_file(cache_dir: str, video_path: str, settings: dict) -> str:
    """Where the frames of ``video_path`` read with ``settings`` live: a digest of the file's identity (path, size,
    modification time) and every setting that changes the frames."""
    st = os.stat(video_path)
    key = {
        "format": _CACHE_FORMAT,
        "path": os.path.abspath(video_path),
        "bytes": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        **settings,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return os.path.join(cache_dir, digest[:2], digest + ".npy")


def load_cached(path: str, max_frames: int, size: int) -> np.ndarray | None:
    """The cached frames, or None when absent or not what this key should hold (then it is rewritten)."""
    try:
        frames = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):  # absent, or not an array this code wrote
        return None
    if (
        frames.dtype != np.uint8
        or frames.ndim != 4
        or frames.shape[1:] != (3, size, size)
        or not 0 < frames.shape[0] <= max_frames
    ):
        return None
    return frames


def save_cached(path: str, frames: np.ndarray) -> bool:
    """Write through a temporary file and rename, so concurrent workers never see a partial file. Not synced to
    disk: a cache entry lost in a crash is decoded again.

    False, with one warning, when the cache cannot be written (a full disk, a read-only folder): the cache only saves
    time, so the frames are used uncached rather than ending the run.
    """
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_path(path, sync=False) as tmp, open(tmp, "wb") as f:
            np.save(f, frames, allow_pickle=False)
    except OSError as error:
        logger.warning(
            "frame cache: cannot write %s (%s); going on without writing to the cache in this process",
            path,
            error.strerror or error,
        )
        return False
    return True
