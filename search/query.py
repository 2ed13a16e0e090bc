"""What the search commands answer: an index and its model opened once, then text → videos, video → videos and
video → captions."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from search.encode import encode_videos, index_model, logit_scale
from search.index import Index, load_index
from search.querybank import load_bank
from search.rank import rank_caption_texts, rank_similar, rank_texts
from search.settings import AS_STORED, Weights
from util import UsageError


def open_index(index_dir: str | Path, weights: Weights, max_words: int = 32) -> tuple[Index, object]:
    """The index (embeddings memory-mapped) and the model that built it."""
    index = load_index(Path(index_dir), mmap=True)
    if not index.videos:
        raise UsageError(f"{index_dir} holds no videos")
    return index, index_model(index, index_dir, weights, max_words)


def _find_row(index: Index, video: Path) -> int | None:
    """The index row of ``video`` (an absolute path), or None when it is not indexed."""
    root = index.root
    for i, v in enumerate(index.videos):
        if root / v["path"] == video or v.get("real") == str(video):  # a link's target is the file too
            return i
    return None


def _named_file(index: Index, video: str) -> tuple[Path | None, int | None]:
    """``--video`` as (a file, None) or, for an index id, (None, its row)."""
    path = Path(video).expanduser()
    if path.is_file():
        return path, None
    if video.isdigit():
        if int(video) >= len(index.videos):
            raise UsageError(f"--video {video}: the index holds ids 0 to {len(index.videos) - 1}")
        return None, int(video)
    if (index.root / video).is_file():
        return index.root / video, None
    raise UsageError(f"--video {video} is neither a video file nor an index id (0 to {len(index.videos) - 1})")


def _check_video_file(video: Path) -> None:
    """``video`` is a regular file, or a UsageError saying what it is instead (missing, a loop of symlinks, ...)."""
    try:
        mode = video.stat().st_mode
    except OSError as e:
        raise UsageError(f"--video {os.path.abspath(video)} not found ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        raise UsageError(f"--video {os.path.abspath(video)} is not a regular file (a video file expected)")


def query_video(index: Index, model, video: str) -> tuple[np.ndarray, int | None, str]:
    """(embedding, index row or None, description) of ``--video``: a file, an index id, or a path as indexed.

    An indexed, unchanged file uses its stored embedding; any other file is encoded with the index's settings.
    """
    path, row = _named_file(index, video)
    if path is None:
        return np.asarray(index.embeddings[row]), row, str(index.root / index.videos[row]["path"])
    path = path.resolve()
    row = _find_row(index, path)
    st = path.stat()
    if row is not None and (index.videos[row]["size"], index.videos[row]["mtime_ns"]) == (st.st_size, st.st_mtime_ns):
        return np.asarray(index.embeddings[row]), row, str(path)
    ((_, emb, _, error),) = encode_videos(
        model, path.parent, [path.name], index.settings.sampling, batch_size=1, progress=False
    )
    if error:
        raise UsageError(f"cannot read {path}: {error}")
    return emb, row, str(path)


def search(
    index_dir: str | Path,
    queries: Sequence[str],
    top: int = 5,
    max_words: int = 32,
    weights: Weights = AS_STORED,
    qb_norm: bool = False,
) -> list[dict]:
    """Text → videos: for each query ``{"query", "results": [{"rank", "id", "path", "score"}, ...]}``, best first;
    ``qb_norm`` ranks with the index's QB-Norm querybank (``index --qb_bank``)."""
    index, model = open_index(index_dir, weights, max_words)
    bank = load_bank(Path(index_dir), index) if qb_norm else None
    return rank_texts(index, model, queries, top, max_words, bank)


def search_video(index_dir: str | Path, video: str, top: int = 5, weights: Weights = AS_STORED) -> dict:
    """Video → videos: ``{"video", "results": [...]}``, the query video itself left out; the search page's
    "more like this" ranks the same way."""
    index, model = open_index(index_dir, weights)
    emb, row, described = query_video(index, model, video)
    return {"video": described, "results": rank_similar(index, emb, top, logit_scale(model), exclude=row)}


def rank_captions(
    index_dir: str | Path,
    video: Path,
    captions: Sequence[str],
    top: int | None = None,
    max_words: int = 32,
    weights: Weights = AS_STORED,
) -> dict:
    """Video → text: ``{"video", "results": [{"rank", "caption", "score"}, ...]}``, best first.

    An indexed, unchanged video uses its stored embedding; any other file is encoded with the index's settings.
    """
    index = load_index(Path(index_dir))
    _check_video_file(Path(video))
    model = index_model(index, index_dir, weights, max_words)
    emb, _, described = query_video(index, model, str(video))
    return {"video": described, "results": rank_caption_texts(model, emb, captions, top, max_words)}
