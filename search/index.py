"""The index on disk: two plain files (never a pickle), their checks, the locks, and the plan of an update.

  - ``index.json``: the settings (weights, head, sampling, a fingerprint of the model), the indexed files with their
    size and modification time, the unreadable files with the reason;
  - ``embeddings-<id>.npy``: float32 (n_videos, D), row i is the i-th file of ``index.json``.

``index.json`` names its embeddings file and is replaced atomically after that file is complete, so an interrupted
run leaves the previous index intact. Writers of one index take turns (a lock file), and a reader never opens an
embeddings file that a writer is just removing.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np

from search.settings import SAMPLING_KEYS, IndexSettings
from util import UsageError, atomic_path, atomic_write_text

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None

FORMAT = 1
MANIFEST = "index.json"
WRITE_LOCK = ".write.lock"  # held by an `index` run from start to end: writers of one index take turns
COMMIT_LOCK = ".commit.lock"  # exclusive while a writer swaps the files, shared while a reader opens them
# Containers FFmpeg (and so cv2) reads; other files in the folder are ignored, not reported.
VIDEO_SUFFIXES = frozenset(".mp4 .m4v .mov .avi .mkv .webm .mpg .mpeg .wmv .flv .3gp .ts .mts .m2ts .ogv .vob".split())
DAMAGED = "the index is damaged, re-index into a new --index directory"


@dataclass
class Index:
    """One index directory in memory; ``videos[i]`` describes ``embeddings[i]``."""

    settings: IndexSettings
    # {"path": relative posix path, "size": bytes, "mtime_ns": int, "frames": int, "real": absolute path with symlinks
    # resolved (absent in indexes written before it was recorded)}
    videos: list[dict]
    unreadable: list[dict]  # {"path", "size", "mtime_ns", "error"}: not retried until the file changes
    embeddings: np.ndarray  # (len(videos), D) float32, rows of unit L2 norm

    @property
    def root(self) -> Path:
        return self.settings.root


@contextlib.contextmanager
def locked(path: Path, exclusive: bool, waiting: str = "") -> Iterator[None]:
    """Hold ``flock`` on ``path`` (created when missing) for the block; ``waiting`` is printed when it must wait.

    A reader that cannot create the lock file (a read-only index, which nobody is writing) reads without it.
    """
    if fcntl is None:
        yield
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if exclusive:
            raise UsageError(f"{path.parent}: cannot write to the index directory ({e.strerror})") from None
        yield
        return
    try:
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                print(waiting, file=sys.stderr)
            fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)


def save_index(directory: Path, index: Index) -> None:
    """Write ``index`` to ``directory``: a new embeddings file first, then the manifest that names it (the commit)."""
    directory.mkdir(parents=True, exist_ok=True)
    emb = np.ascontiguousarray(index.embeddings, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != len(index.videos):
        raise ValueError(f"embeddings of shape {emb.shape} do not match {len(index.videos)} videos")
    # A fresh name: nothing refers to this file until the manifest is replaced.
    name = f"embeddings-{uuid.uuid4().hex[:12]}.npy"
    with atomic_path(directory / name) as tmp, open(tmp, "wb") as f:
        np.save(f, emb, allow_pickle=False)
    manifest = {
        "format": FORMAT,
        "embeddings": name,
        "settings": index.settings.to_json(),
        "videos": index.videos,
        "unreadable": index.unreadable,
    }
    with locked(directory / COMMIT_LOCK, exclusive=True):
        atomic_write_text(json.dumps(manifest, indent=1), directory / MANIFEST)
        for old in directory.glob("embeddings-*.npy"):
            if old.name != name:
                old.unlink()


_SETTINGS = {"videos_root": str, "model": dict, "sampling": dict}
_MODEL_KEYS = {
    "init_model": (str, type(None)),
    "pretrained_clip_name": str,
    "sim_header": str,
    "linear_patch": str,
    "fingerprint": str,
}
_SAMPLING_KEYS = dict.fromkeys(SAMPLING_KEYS, int)
_VIDEO_KEYS = {"path": str, "size": int, "mtime_ns": int, "frames": int}
_UNREADABLE_KEYS = {"path": str, "size": int, "mtime_ns": int, "error": str}


def _check_fields(path: Path, where: str, value, fields: dict) -> None:
    """``value`` is an object holding ``fields`` (name: type), or a UsageError naming the file and the place."""
    if not isinstance(value, dict):
        raise UsageError(
            f"{path}: {where}: expected an object with {sorted(fields)}, found {type(value).__name__}; {DAMAGED}"
        )
    for key, kind in fields.items():
        if key not in value or not isinstance(value[key], kind) or isinstance(value[key], bool):
            shown = "missing" if key not in value else f"{value[key]!r}"
            kinds = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise UsageError(f"{path}: {where}: expected {key!r} of type {kinds}, found {shown}; {DAMAGED}")


def _check_manifest(path: Path, manifest: dict) -> None:
    """Every field the commands read, with its type, so a damaged index fails here with one line."""
    missing = {"format", "embeddings", "settings", "videos", "unreadable"} - set(manifest)
    if missing:
        raise UsageError(f"{path}: missing keys {sorted(missing)}")
    if manifest["format"] != FORMAT:
        raise UsageError(f"{path}: index format {manifest['format']!r}, this retrieve.py reads format {FORMAT}")
    _check_fields(path, "settings", manifest["settings"], _SETTINGS)
    _check_fields(path, "settings.model", manifest["settings"]["model"], _MODEL_KEYS)
    _check_fields(path, "settings.sampling", manifest["settings"]["sampling"], _SAMPLING_KEYS)
    for key, fields in (("videos", _VIDEO_KEYS), ("unreadable", _UNREADABLE_KEYS)):
        if not isinstance(manifest[key], list):
            raise UsageError(f"{path}: {key}: expected a list, found {type(manifest[key]).__name__}")
        for i, entry in enumerate(manifest[key]):
            _check_fields(path, f"{key}[{i}]", entry, fields)
            _check_entry_path(path, f"{key}[{i}]", entry)
    name = manifest["embeddings"]
    if not isinstance(name, str) or Path(name).name != name or not name:
        raise UsageError(f"{path}: embeddings: expected a file name in the index directory, found {name!r}")


def _check_entry_path(path: Path, where: str, entry: dict) -> None:
    """An entry names a file inside the videos folder: a relative path that never climbs out of it. The file's real
    path, when recorded, is absolute. The page serves these files, so a tampered index must not reach others."""
    rel = entry["path"]
    parts = PurePosixPath(rel).parts
    if not rel or "\0" in rel or PurePosixPath(rel).is_absolute() or ".." in parts:
        raise UsageError(f"{path}: {where}: path {rel!r} is not a relative path inside the videos folder; {DAMAGED}")
    real = entry.get("real")
    if real is not None and (not isinstance(real, str) or "\0" in real or not os.path.isabs(real)):
        raise UsageError(f"{path}: {where}: expected 'real' to be an absolute path, found {real!r}; {DAMAGED}")


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise UsageError(f"{path}: expected a JSON object, found {type(manifest).__name__}")
    _check_manifest(path, manifest)
    return manifest


def load_index(directory: Path, mmap: bool = False) -> Index:
    """Read an index directory written by :func:`save_index`; ``mmap`` maps the embeddings instead of reading them."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise UsageError(f"{directory} is not an index: {MANIFEST} not found (create one with `retrieve.py index`)")
    # Shared with other readers, never while a writer swaps the manifest and removes the embeddings it replaces.
    with locked(path.parent / COMMIT_LOCK, exclusive=False):
        manifest = _read_manifest(path)
        emb_path = path.parent / manifest["embeddings"]
        if not emb_path.is_file():
            raise UsageError(f"{path}: names {emb_path.name}, which is missing")
        try:
            emb = np.load(emb_path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise UsageError(f"{emb_path}: not a readable .npy array ({str(e) or 'empty file'})") from None
    n = len(manifest["videos"])
    if emb.dtype != np.float32 or emb.ndim != 2 or emb.shape[0] != n:
        raise UsageError(f"{emb_path}: expected float32 of shape ({n}, D), found {emb.dtype} {emb.shape}")
    _check_finite(emb_path, emb, manifest["videos"])
    return Index(IndexSettings.from_json(manifest["settings"]), manifest["videos"], manifest["unreadable"], emb)


def _check_finite(emb_path: Path, emb: np.ndarray, videos: list[dict]) -> None:
    """Rows holding NaN or Inf would be ranked arbitrarily (NaN compares false with everything): refused, named."""
    bad = np.flatnonzero(~np.isfinite(emb).all(axis=1)) if emb.size else []
    if len(bad):
        named = ", ".join(f"{i} ({videos[i]['path']!r})" for i in bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise UsageError(f"{emb_path}: rows {named} hold non-finite values (NaN or Inf); {DAMAGED}")


class FileStat(NamedTuple):
    """What identifies an indexed file: its size and modification time, and where its symlinks lead."""

    size: int
    mtime_ns: int
    real: str


def scan_videos(root: Path) -> tuple[dict[str, FileStat], dict[str, str]]:
    """Every video file under ``root`` (recursively), by relative posix path: {path: FileStat} sorted by path, and
    {path: reason} for those that cannot even be stat'ed (a dangling link, a symlink loop, no permission)."""
    found, errors = {}, {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if Path(name).suffix.lower() in VIDEO_SUFFIXES:
                path = Path(dirpath) / name
                rel = path.relative_to(root).as_posix()
                try:
                    st = path.stat()
                except OSError as e:
                    errors[rel] = f"{type(e).__name__}: {e.strerror}"
                    continue
                found[rel] = FileStat(st.st_size, st.st_mtime_ns, os.path.realpath(path))
    return dict(sorted(found.items())), errors


@dataclass(frozen=True)
class Plan:
    """What an index run does: keep some old rows, encode some files, forget the rest."""

    keep: list[int]  # rows of the old index whose file is unchanged
    encode: list[str]  # new or changed files
    removed: list[str]  # files in the old index (or its unreadable list) that are gone
    still_unreadable: list[dict]  # old unreadable entries whose file is unchanged: reported again, not retried


def same_file(entry: dict, stat: FileStat) -> bool:
    """``entry`` (of an index) describes the file ``stat``: same size, time and, when recorded, real path."""
    return (entry["size"], entry["mtime_ns"]) == stat[:2] and entry.get("real", stat.real) == stat.real


def plan_update(old: Index | None, found: dict[str, FileStat]) -> Plan:
    """Compare the files on disk with ``old`` by size, mtime and real path."""
    videos = old.videos if old else []
    unreadable = old.unreadable if old else []
    row_of = {v["path"]: i for i, v in enumerate(videos)}
    bad_of = {u["path"]: u for u in unreadable}
    keep, encode, still = [], [], []
    for path, stat in found.items():
        if path in row_of and same_file(videos[row_of[path]], stat):
            keep.append(row_of[path])
        elif path in bad_of and same_file(bad_of[path], stat):
            still.append(bad_of[path])
        else:
            encode.append(path)
    removed = sorted(p for p in list(row_of) + list(bad_of) if p not in found)
    return Plan(keep, encode, removed, still)
