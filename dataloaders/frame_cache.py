"""The frame cache of ``rawvideo_util``: a sample's kept frames after resize and crop, as uint8 ``.npy`` files."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from typing import BinaryIO

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


def read_cached(path: str, out: np.ndarray, order: Callable[[int], np.ndarray] | None = None) -> int | None:
    """Read the frames cached at ``path`` straight into ``out`` (uint8 [max_frames, 3, size, size], C-contiguous) and
    return their number n; ``out[n:]`` is left as it was. ``order(n)`` reorders them on the way in, as indexing
    would (``out[:n] = frames[order(n)]``), and is called only once the entry is known good.

    None when the entry is absent or not what this key should hold (then it is rewritten): a header other than the
    one ``save_cached`` writes for such frames, or a file shorter than its header says.
    """
    try:
        with open(path, "rb", buffering=0) as f:
            n = _frame_count(f, out.shape)
            if n is None or os.fstat(f.fileno()).st_size < f.tell() + out[:n].nbytes:
                return None
            if order is None:
                rows = [out[:n]]
            else:  # stored frame i goes to row where[i], so the file is still read front to back
                where = np.empty(n, dtype=np.intp)
                where[order(n)] = np.arange(n)
                rows = [out[j] for j in where]
            if not all(_read_exactly(f, row) for row in rows):
                return None
    except OSError:  # absent, or unreadable
        return None
    return n


# What np.save writes for C-ordered uint8 [n, 3, H, W] (format 1.0: a 2-byte little-endian header length). Read by
# hand because np.load parses the header with ast.literal_eval, which costs as much as reading the frames.
_MAGIC_1_0 = b"\x93NUMPY\x01\x00"
_HEADER = re.compile(rb"\{'descr': '\|u1', 'fortran_order': False, 'shape': \((\d+), (\d+), (\d+), (\d+)\), \} *\n")


def _frame_count(f: BinaryIO, out_shape: tuple[int, ...]) -> int | None:
    """The frame count of the header at the start of ``f`` (left at the data), or None unless it describes uint8
    frames of ``out_shape[1:]``, at least one and at most ``out_shape[0]``."""
    prefix = f.read(len(_MAGIC_1_0) + 2)
    if len(prefix) < len(_MAGIC_1_0) + 2 or not prefix.startswith(_MAGIC_1_0):
        return None
    header = f.read(int.from_bytes(prefix[-2:], "little"))
    match = _HEADER.fullmatch(header)
    if match is None:
        return None
    n, *frame_shape = (int(d) for d in match.groups())
    if tuple(frame_shape) != tuple(out_shape[1:]) or not 0 < n <= out_shape[0]:
        return None
    return n


def _read_exactly(f: BinaryIO, row: np.ndarray) -> bool:
    """Fill ``row`` from ``f``; False when the file ends first."""
    view = memoryview(row).cast("B")
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            return False
        done += got
    return True


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
