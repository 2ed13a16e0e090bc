#!/usr/bin/env python
"""Index a folder of your own videos with a CLIP4Clip model, then search it by text (or rank captions for a video).

    python retrieve.py index    --videos DIR --index IDX [--init_model CKPT | --pretrained_clip_name NAME] ...
    python retrieve.py search   --index IDX (--query TEXT | --queries FILE) [--top_k 5] [--json]
    python retrieve.py search   --index IDX --video FILE_OR_ID [--top_k 5] [--json]
    python retrieve.py captions --index IDX --video FILE (--caption TEXT ... | --captions FILE) [--json]
    python retrieve.py serve    --index IDX [--videos DIR] [--host 127.0.0.1] [--port 8000]  (requirements-web.txt)

An index directory holds two plain files, never a pickle:
  - ``index.json``: the settings (weights, head, sampling flags, a fingerprint of the model), the indexed files with
    their size and modification time, the unreadable files with the reason;
  - ``embeddings-<id>.npy``: float32 (n_videos, 512), row i is the i-th file of ``index.json``: the video embedding
    after the similarity head, the per-frame normalisation, the masked mean and the final normalisation.
``index.json`` names its embeddings file and is replaced atomically after that file is complete, so an
interrupted run leaves the previous index intact. Two ``index`` runs on one index take turns (a lock file), and a
reader never opens an embeddings file that a writer is just removing.

For the loose heads (meanP, seqLSTM, seqTransf) the video side does not depend on the text, so a query scores every
video with one matrix product: ``exp(logit_scale) * text @ videos.T``, the numbers ``get_similarity_logits`` gives.
tightTransf scores each (text, video) pair with a cross encoder, so it cannot be indexed; ``index`` refuses it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dataloaders.dataset_util import encode_caption
from dataloaders.rawvideo_util import RawVideoExtractor
from modules.modeling import SIM_HEADERS, CLIP4Clip, CLIP4ClipConfig, implied_by_state_dict
from modules.tokenization_clip import SimpleTokenizer
from util import UsageError, atomic_path, atomic_write_text, default_device, read_state_dict

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None

FORMAT = 1
MANIFEST = "index.json"
WRITE_LOCK = ".write.lock"  # held by an `index` run from start to end: writers of one index take turns
COMMIT_LOCK = ".commit.lock"  # exclusive while a writer swaps the files, shared while a reader opens them
DEFAULT_CLIP = "ViT-B/32"
DEFAULT_SAMPLING = {"max_frames": 12, "feature_framerate": 1, "slice_framepos": 2}
# Containers FFmpeg (and so cv2) reads; other files in the folder are ignored, not reported.
VIDEO_SUFFIXES = frozenset(".mp4 .m4v .mov .avi .mkv .webm .mpg .mpeg .wmv .flv .3gp .ts .mts .m2ts .ogv .vob".split())


class RetrieveError(UsageError):
    """A problem with the user's input; ``main`` prints it as one line and exits non-zero."""


# ---------------------------------------------------------------------------------------------------------------------
# The index on disk


@dataclass
class Index:
    """One index directory in memory; ``videos[i]`` describes ``embeddings[i]``."""

    settings: dict  # {"videos_root": str, "model": {...}, "sampling": {...}}
    videos: list[dict]  # {"path": relative posix path, "size": bytes, "mtime_ns": int, "frames": int}
    unreadable: list[dict]  # {"path", "size", "mtime_ns", "error"}: not retried until the file changes
    embeddings: np.ndarray  # (len(videos), D) float32, rows of unit L2 norm

    @property
    def root(self) -> Path:
        return Path(self.settings["videos_root"])


@contextlib.contextmanager
def _locked(path: Path, exclusive: bool, waiting: str = "") -> Iterator[None]:
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
            raise RetrieveError(f"{path.parent}: cannot write to the index directory ({e.strerror})") from None
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
        "settings": index.settings,
        "videos": index.videos,
        "unreadable": index.unreadable,
    }
    with _locked(directory / COMMIT_LOCK, exclusive=True):
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
_SAMPLING_KEYS = {"max_frames": int, "feature_framerate": int, "slice_framepos": int}
_VIDEO_KEYS = {"path": str, "size": int, "mtime_ns": int, "frames": int}
_UNREADABLE_KEYS = {"path": str, "size": int, "mtime_ns": int, "error": str}


def _check_fields(path: Path, where: str, value, fields: dict) -> None:
    """``value`` is an object holding ``fields`` (name: type), or a RetrieveError naming the file and the place."""
    if not isinstance(value, dict):
        raise RetrieveError(
            f"{path}: {where}: expected an object with {sorted(fields)}, found "
            f"{type(value).__name__}; the index is damaged, re-index into a new --index directory"
        )
    for key, kind in fields.items():
        if key not in value or not isinstance(value[key], kind) or isinstance(value[key], bool):
            shown = "missing" if key not in value else f"{value[key]!r}"
            raise RetrieveError(
                f"{path}: {where}: expected {key!r} of type "
                f"{' or '.join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))}"
                f", found {shown}; the index is damaged, re-index into a new --index directory"
            )


def _check_manifest(path: Path, manifest: dict) -> None:
    """Every field the commands read, with its type, so a damaged index fails here with one line."""
    _check_fields(path, "settings", manifest["settings"], _SETTINGS)
    _check_fields(path, "settings.model", manifest["settings"]["model"], _MODEL_KEYS)
    _check_fields(path, "settings.sampling", manifest["settings"]["sampling"], _SAMPLING_KEYS)
    for key, fields in (("videos", _VIDEO_KEYS), ("unreadable", _UNREADABLE_KEYS)):
        if not isinstance(manifest[key], list):
            raise RetrieveError(f"{path}: {key}: expected a list, found {type(manifest[key]).__name__}")
        for i, entry in enumerate(manifest[key]):
            _check_fields(path, f"{key}[{i}]", entry, fields)
    name = manifest["embeddings"]
    if not isinstance(name, str) or Path(name).name != name or not name:
        raise RetrieveError(f"{path}: embeddings: expected a file name in the index directory, found {name!r}")


def load_index(directory: Path, mmap: bool = False) -> Index:
    """Read an index directory written by :func:`save_index`; ``mmap`` maps the embeddings instead of reading them."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise RetrieveError(f"{directory} is not an index: {MANIFEST} not found (create one with `retrieve.py index`)")
    # Shared with other readers, never while a writer swaps the manifest and removes the embeddings it replaces.
    with _locked(path.parent / COMMIT_LOCK, exclusive=False):
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RetrieveError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(manifest, dict):
            raise RetrieveError(f"{path}: expected a JSON object, found {type(manifest).__name__}")
        missing = {"format", "embeddings", "settings", "videos", "unreadable"} - set(manifest)
        if missing:
            raise RetrieveError(f"{path}: missing keys {sorted(missing)}")
        if manifest["format"] != FORMAT:
            raise RetrieveError(f"{path}: index format {manifest['format']!r}, this retrieve.py reads format {FORMAT}")
        _check_manifest(path, manifest)
        emb_path = path.parent / manifest["embeddings"]
        if not emb_path.is_file():
            raise RetrieveError(f"{path}: names {emb_path.name}, which is missing")
        try:
            emb = np.load(emb_path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise RetrieveError(f"{emb_path}: not a readable .npy array ({str(e) or 'empty file'})") from None
    n = len(manifest["videos"])
    if emb.dtype != np.float32 or emb.ndim != 2 or emb.shape[0] != n:
        raise RetrieveError(f"{emb_path}: expected float32 of shape ({n}, D), found {emb.dtype} {emb.shape}")
    return Index(manifest["settings"], manifest["videos"], manifest["unreadable"], emb)


# ---------------------------------------------------------------------------------------------------------------------
# Incremental bookkeeping


def scan_videos(root: Path) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
    """Every video file under ``root`` (recursively), by relative posix path: {path: (size, mtime_ns)} sorted by
    path, and {path: reason} for those that cannot even be stat'ed (a dangling link, no permission)."""
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
                found[rel] = (st.st_size, st.st_mtime_ns)
    return dict(sorted(found.items())), errors


@dataclass
class Plan:
    """What an index run does: keep some old rows, encode some files, forget the rest."""

    keep: list[int]  # rows of the old index whose file is unchanged
    encode: list[str]  # new or changed files
    removed: list[str]  # files in the old index (or its unreadable list) that are gone
    still_unreadable: list[dict]  # old unreadable entries whose file is unchanged: reported again, not retried


def plan_update(old: Index | None, found: dict[str, tuple[int, int]]) -> Plan:
    """Compare the files on disk with ``old`` by (size, mtime_ns)."""
    videos = old.videos if old else []
    unreadable = old.unreadable if old else []
    row_of = {v["path"]: i for i, v in enumerate(videos)}
    bad_of = {u["path"]: u for u in unreadable}
    keep, encode, still = [], [], []
    for path, stat in found.items():
        if path in row_of and (videos[row_of[path]]["size"], videos[row_of[path]]["mtime_ns"]) == stat:
            keep.append(row_of[path])
        elif path in bad_of and (bad_of[path]["size"], bad_of[path]["mtime_ns"]) == stat:
            still.append(bad_of[path])
        else:
            encode.append(path)
    removed = sorted(p for p in list(row_of) + list(bad_of) if p not in found)
    return Plan(keep, encode, removed, still)


# ---------------------------------------------------------------------------------------------------------------------
# Model, text side and video side


def read_checkpoint(path: str | None) -> dict[str, torch.Tensor] | None:
    """The ``--init_model`` state dict, or None without one."""
    return read_state_dict(path, "--init_model") if path is not None else None


def load_model(
    spec: dict, state: dict[str, torch.Tensor] | None, max_frames: int, device: torch.device, max_words: int = 32
) -> CLIP4Clip:
    """CLIP4Clip in eval mode from ``spec`` (``pretrained_clip_name``, ``sim_header``, ``linear_patch``) and the
    checkpoint ``state`` (which also gives the temporal layer count)."""
    # Modules the weights do not cover are drawn from the global RNG: seed it so index and search build the same
    # model, and fork it so the caller's stream is left as it was. Loading logs go to stderr, keeping stdout for --json.
    try:
        config = CLIP4ClipConfig.from_state_dict(
            state or {},
            pretrained_clip_name=spec["pretrained_clip_name"],
            sim_header=spec["sim_header"],
            linear_patch=spec["linear_patch"],
            max_words=max_words,
            max_frames=max_frames,
        )
        with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(sys.stderr):
            torch.manual_seed(0)
            model = CLIP4Clip.from_config(config, state, checkpoint_name=f"--init_model {spec['init_model']}")
    except ValueError as e:  # the config or the checkpoint, said with the file's name
        raise RetrieveError(str(e)) from None
    except (FileNotFoundError, RuntimeError) as e:
        raise RetrieveError(
            f"cannot build the model ({spec['pretrained_clip_name']}"
            f"{', ' + spec['init_model'] if spec['init_model'] else ''}): {e}"
        ) from None
    return model.to(device).eval()


def fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the model's tensors, as fp16 so a GPU (fp16) and a CPU (fp32) build of the same weights agree."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu")
        if t.is_floating_point():
            t = t.half()
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def logit_scale(model) -> float:
    """The factor ``get_similarity_logits`` puts on cosine similarities (loose heads)."""
    return float(model.clip.logit_scale.detach().exp())


@functools.lru_cache(maxsize=1)
def _tokenizer() -> SimpleTokenizer:
    return SimpleTokenizer()


@torch.no_grad()
def text_embeddings(model, texts: Sequence[str], max_words: int = 32, batch_size: int = 256) -> torch.Tensor:
    """(len(texts), D) end-token embeddings of unit norm, on the model's device."""
    tokenizer = _tokenizer()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        parts = [encode_caption(tokenizer, t, max_words) for t in texts[start : start + batch_size]]
        ids, mask, segment = (torch.from_numpy(np.stack(x)).to(device) for x in zip(*parts))
        out.append(model.get_text_embedding(model.get_sequence_output(ids, segment, mask)))
    return torch.cat(out)


@torch.no_grad()
def video_embeddings(model, video: torch.Tensor, video_mask: torch.Tensor) -> torch.Tensor:
    """(B, D) unit video embeddings (head included) for video (B, 1, F, 1, 3, H, W) and mask (B, 1, F)."""
    return model.get_video_embedding(model.get_visual_output(video, video_mask), video_mask)


# ---------------------------------------------------------------------------------------------------------------------
# Decoding and encoding videos


class VideoFiles(Dataset):
    """The selected frames of each file, or the reason they could not be read."""

    def __init__(self, root: Path, paths: Sequence[str], extractor, max_frames: int, slice_framepos: int):
        self.root, self.paths, self.extractor = root, list(paths), extractor
        self.max_frames, self.slice_framepos = max_frames, slice_framepos

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.root / self.paths[i]
        try:
            video, mask, n_frames = self.extractor.get_video_sample(
                str(path), self.max_frames, slice_framepos=self.slice_framepos, frame_order=0
            )
        except (OSError, ValueError, cv2.error) as e:  # one bad file must not end the run; it is reported instead
            return i, None, None, 0, f"{type(e).__name__}: {e}"
        if n_frames == 0:
            return i, None, None, 0, "no frame could be decoded"
        # float64 came from float32 frames, so float32 is exact and halves what the workers send.
        return i, torch.as_tensor(video).float(), torch.as_tensor(mask), int(n_frames), ""


def _collate(items):
    good = [it for it in items if it[1] is not None]
    video = torch.stack([it[1] for it in good]) if good else None
    mask = torch.stack([it[2] for it in good]) if good else None
    failed = [(it[0], it[4]) for it in items if it[1] is None]
    return [it[0] for it in good], [it[3] for it in good], video, mask, failed


def encode_videos(
    model,
    root: Path,
    paths: Sequence[str],
    sampling: dict,
    batch_size: int = 16,
    num_workers: int = 0,
    progress: bool = True,
) -> Iterator[tuple[str, np.ndarray | None, int, str]]:
    """Yield (path, embedding or None, n_frames, error) for every file, decoding in ``num_workers`` processes."""
    device = next(model.parameters()).device
    extractor = RawVideoExtractor(
        centercrop=False,
        size=model.clip.visual.input_resolution,
        framerate=sampling["feature_framerate"],
        cache_dir=None,
    )
    data = VideoFiles(root, paths, extractor, sampling["max_frames"], sampling["slice_framepos"])
    loader = DataLoader(data, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
    with tqdm(total=len(data), unit="video", desc="encoding", disable=not progress) as bar:
        for rows, frames, video, mask, failed in loader:
            for i, error in failed:
                yield paths[i], None, 0, error
            if rows:
                emb = video_embeddings(model, video.to(device), mask.to(device)).float().cpu().numpy()
                for i, n, e in zip(rows, frames, emb):
                    yield paths[i], e, n, ""
            bar.update(len(rows) + len(failed))


# ---------------------------------------------------------------------------------------------------------------------
# Search


def top_k(embeddings: np.ndarray, queries: np.ndarray, k: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` rows of ``embeddings`` for each query row: (indices, scores), each (Q, k), best first.

    score = scale * (query @ row): the matrix product first and then the scale, as in ``_loose_similarity``.
    Among the rows returned, equal scores are listed in index order.
    """
    scores = scale * (queries.astype(np.float32) @ np.asarray(embeddings, dtype=np.float32).T)
    k = min(k, scores.shape[1])
    if k < scores.shape[1]:
        cand = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        cand = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    idx = np.empty((scores.shape[0], k), dtype=np.int64)
    for q in range(scores.shape[0]):
        c = cand[q]
        idx[q] = c[np.lexsort((c, -scores[q, c]))]
    return idx, np.take_along_axis(scores, idx, axis=1)


# ---------------------------------------------------------------------------------------------------------------------
# What the commands do


@dataclass
class IndexReport:
    """The outcome of :func:`build_index`."""

    index: Path
    total: int  # videos in the index now
    encoded: list[str]  # files encoded in this run
    unchanged: int  # rows kept from the previous run
    removed: list[str]  # files gone since the previous run
    unreadable: list[dict]  # {"path", "error"} of files that could not be decoded (this run or, unchanged, before)

    def __str__(self) -> str:
        lines = [
            f"index {self.index}: {self.total} videos ({len(self.encoded)} encoded, {self.unchanged} unchanged, "
            f"{len(self.removed)} removed), {len(self.unreadable)} unreadable"
        ]
        if self.unreadable:
            lines.append("unreadable files (not indexed; retried once they change):")
            lines += [f"  {u['path']}: {u['error']}" for u in self.unreadable]
        return "\n".join(lines)


def _with_weights(spec: dict, init_model: str | None, pretrained_clip_name: str | None) -> dict:
    """``spec`` with the weight files given; a file is stored by absolute path so the index works from anywhere."""
    spec = dict(spec)
    if init_model:
        spec["init_model"] = str(Path(init_model).resolve())
    if pretrained_clip_name:
        is_file = Path(pretrained_clip_name).is_file()
        spec["pretrained_clip_name"] = str(Path(pretrained_clip_name).resolve()) if is_file else pretrained_clip_name
    return spec


def _complete_head(spec: dict, state: dict[str, torch.Tensor] | None) -> None:
    """Fill sim_header / linear_patch from the checkpoint (else meanP / 2d); refuse what cannot be indexed."""
    trained = implied_by_state_dict(state or {})
    for key in ("sim_header", "linear_patch"):
        value = trained[key]
        if spec[key] is None:
            spec[key] = value
        elif state is not None and spec[key] != value:
            print(
                f"warning: {spec['init_model']} looks trained with --{key} {value}; using --{key} {spec[key]} as asked",
                file=sys.stderr,
            )
    if spec["sim_header"] == "tightTransf":
        raise RetrieveError(
            "sim_header tightTransf cannot be indexed: its cross encoder scores each (text, video) pair jointly, so "
            "there is no per-video embedding to store. Use a checkpoint trained with meanP, seqLSTM or seqTransf."
        )
    if state is None and spec["sim_header"] != "meanP":
        raise RetrieveError(
            f"sim_header {spec['sim_header']} needs trained head weights: pass its checkpoint with "
            f"--init_model (plain CLIP weights run zero-shot with meanP only)"
        )


def build_index(
    videos: Path,
    index: Path,
    init_model: str | None = None,
    pretrained_clip_name: str | None = None,
    sim_header: str | None = None,
    linear_patch: str | None = None,
    max_frames: int | None = None,
    feature_framerate: int | None = None,
    slice_framepos: int | None = None,
    batch_size: int = 16,
    num_workers: int = 0,
    progress: bool = True,
) -> IndexReport:
    """Create or update the index at ``index`` for every video under ``videos``; only new or changed files are encoded.

    Options left None take the index's stored values (or the defaults for a new index); a given option that
    contradicts the stored settings is an error, since rows encoded two ways cannot be compared.
    """
    videos, index = Path(videos), Path(index)
    if not videos.is_dir():
        raise RetrieveError(f"--videos {videos} is not a directory")
    if index.exists() and not index.is_dir():
        raise RetrieveError(f"--index {index} exists and is not a directory")
    created = not index.exists()
    try:
        index.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RetrieveError(f"--index {index}: cannot create the directory ({e.strerror})") from None
    try:
        with _locked(
            index / WRITE_LOCK,
            exclusive=True,
            waiting=f"waiting for another `retrieve.py index` run on {index} to finish",
        ):
            return _update_index(
                videos,
                index,
                init_model,
                pretrained_clip_name,
                sim_header,
                linear_patch,
                max_frames,
                feature_framerate,
                slice_framepos,
                batch_size,
                num_workers,
                progress,
            )
    except BaseException:
        if created and not (index / MANIFEST).exists():  # a refused first run leaves no directory behind
            (index / WRITE_LOCK).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                index.rmdir()
        raise


def _update_index(
    videos: Path,
    index: Path,
    init_model: str | None,
    pretrained_clip_name: str | None,
    sim_header: str | None,
    linear_patch: str | None,
    max_frames: int | None,
    feature_framerate: int | None,
    slice_framepos: int | None,
    batch_size: int,
    num_workers: int,
    progress: bool,
) -> IndexReport:
    """:func:`build_index` under the index's write lock."""
    old = load_index(index) if (index / MANIFEST).exists() else None
    if old is None:
        spec = {
            "init_model": None,
            "pretrained_clip_name": DEFAULT_CLIP,
            "sim_header": sim_header,
            "linear_patch": linear_patch,
        }
        sampling = dict(DEFAULT_SAMPLING)
    else:
        spec, sampling = dict(old.settings["model"]), dict(old.settings["sampling"])
    asked = {
        "sim_header": sim_header,
        "linear_patch": linear_patch,
        "max_frames": max_frames,
        "feature_framerate": feature_framerate,
        "slice_framepos": slice_framepos,
    }
    if old is not None:
        stored = {**spec, **sampling}
        conflicts = [f"--{k} {v} (index: {stored[k]})" for k, v in asked.items() if v is not None and v != stored[k]]
        if conflicts:
            raise RetrieveError(
                f"{index} was built with other settings: {', '.join(conflicts)}. Use a new --index "
                f"directory, or leave those flags out to keep the index's settings."
            )
    sampling.update({k: v for k, v in asked.items() if k in sampling and v is not None})
    spec = _with_weights(spec, init_model, pretrained_clip_name)
    root = videos.resolve()
    found, unstatable = scan_videos(root)
    plan = plan_update(old, found)

    rows = {old.videos[i]["path"]: (old.videos[i], old.embeddings[i]) for i in plan.keep} if old else {}
    failed = []
    weights_changed = old is not None and spec != old.settings["model"]
    if old is None or plan.encode or weights_changed:
        state = read_checkpoint(spec["init_model"])
        _complete_head(spec, state)
        model = load_model(spec, state, sampling["max_frames"], default_device())
        print_fp = fingerprint(model)
        if old is not None and print_fp != old.settings["model"]["fingerprint"]:
            raise RetrieveError(
                f"{index} was built with other weights than {_describe(spec)} (their fingerprints "
                f"differ); index into a new --index directory instead"
            )
        spec["fingerprint"] = print_fp
        del state
        for path, emb, n_frames, error in encode_videos(
            model, root, plan.encode, sampling, batch_size, num_workers, progress
        ):
            size, mtime_ns = found[path]
            if error:
                failed.append({"path": path, "size": size, "mtime_ns": mtime_ns, "error": error})
            else:
                rows[path] = ({"path": path, "size": size, "mtime_ns": mtime_ns, "frames": n_frames}, emb)

    order = sorted(rows)
    embeddings = (
        np.stack([rows[p][1] for p in order]).astype(np.float32) if order else np.zeros((0, 0), dtype=np.float32)
    )
    unreadable = sorted(plan.still_unreadable + failed, key=lambda u: u["path"])
    settings = {"videos_root": str(root), "model": spec, "sampling": sampling}
    save_index(index, Index(settings, [rows[p][0] for p in order], unreadable, embeddings))
    encoded = sorted(p for p in plan.encode if p in rows)
    report_unreadable = unreadable + [{"path": p, "error": e} for p, e in unstatable.items()]
    return IndexReport(
        index,
        len(order),
        encoded,
        len(plan.keep),
        plan.removed,
        [{"path": u["path"], "error": u["error"]} for u in sorted(report_unreadable, key=lambda u: u["path"])],
    )


def _describe(spec: dict) -> str:
    return spec["init_model"] or spec["pretrained_clip_name"]


def index_model(
    index: Index,
    index_dir: Path,
    init_model: str | None = None,
    pretrained_clip_name: str | None = None,
    max_words: int = 32,
) -> CLIP4Clip:
    """The model that built ``index`` (weights moved since: pass their new place); refuses any other model."""
    spec = _with_weights(index.settings["model"], init_model, pretrained_clip_name)
    if spec["init_model"] and not Path(spec["init_model"]).is_file():
        raise RetrieveError(
            f"checkpoint {spec['init_model']}, which built {index_dir}, not found; "
            f"pass its new location with --init_model"
        )
    model = load_model(
        spec, read_checkpoint(spec["init_model"]), index.settings["sampling"]["max_frames"], default_device(), max_words
    )
    width = model.clip.text_projection.shape[1]
    if index.videos and index.embeddings.shape[1] != width:
        raise RetrieveError(
            f"{index_dir}: the stored embeddings are {index.embeddings.shape[1]} wide, the model's "
            f"{width}; the index is damaged, re-index into a new --index directory"
        )
    if fingerprint(model) != spec["fingerprint"]:
        raise RetrieveError(
            f"{_describe(spec)} is not the model that built {index_dir}: the weights differ "
            f"(fingerprint mismatch), so its text embeddings cannot be compared with the index. "
            f"Pass the original weights, or re-index into a new --index directory."
        )
    return model


def ranked(index: Index, rows: np.ndarray, scores: np.ndarray) -> list[dict]:
    """One query's ``top_k`` output as ``[{"rank", "id", "path", "score"}, ...]``; ``id`` is the index row."""
    return [
        {"rank": r + 1, "id": int(i), "path": str(index.root / index.videos[i]["path"]), "score": float(s)}
        for r, (i, s) in enumerate(zip(rows, scores))
    ]


def rank_texts(index: Index, model, queries: Sequence[str], top: int, max_words: int = 32) -> list[dict]:
    """Text → videos with a loaded model: for each query ``{"query", "results"}``, best first."""
    text = text_embeddings(model, queries, max_words).cpu().numpy()
    rows, scores = top_k(index.embeddings, text, top, logit_scale(model))
    return [{"query": q, "results": ranked(index, row, score)} for q, row, score in zip(queries, rows, scores)]


def rank_similar(index: Index, embedding: np.ndarray, top: int, scale: float, exclude: int | None = None) -> list[dict]:
    """Video → videos: the rows nearest ``embedding`` by the score text search uses, best first, without the
    row ``exclude`` (the query video itself, which would always come first)."""
    rows, scores = top_k(index.embeddings, embedding[None, :], top + (exclude is not None), scale)
    keep = rows[0] != (-1 if exclude is None else exclude)
    return ranked(index, rows[0][keep][:top], scores[0][keep][:top])


def find_row(index: Index, video: Path) -> int | None:
    """The index row of ``video`` (an absolute path), or None when it is not indexed."""
    root = index.root
    for i, v in enumerate(index.videos):
        if root / v["path"] == video:
            return i
    return None


def query_video(index: Index, model, video: str) -> tuple[np.ndarray, int | None, str]:
    """(embedding, index row or None, description) of ``--video``: a file, an index id, or a path as indexed.

    An indexed, unchanged file uses its stored embedding; any other file is encoded with the index's settings.
    """
    path = Path(video).expanduser()
    if not path.is_file():
        if video.isdigit():
            row = int(video)
            if row >= len(index.videos):
                raise RetrieveError(f"--video {video}: the index holds ids 0 to {len(index.videos) - 1}")
            return np.asarray(index.embeddings[row]), row, str(index.root / index.videos[row]["path"])
        if (index.root / video).is_file():
            path = index.root / video
        else:
            raise RetrieveError(
                f"--video {video} is neither a video file nor an index id (0 to {len(index.videos) - 1})"
            )
    path = path.resolve()
    row = find_row(index, path)
    st = path.stat()
    if row is not None and (index.videos[row]["size"], index.videos[row]["mtime_ns"]) == (st.st_size, st.st_mtime_ns):
        return np.asarray(index.embeddings[row]), row, str(path)
    ((_, emb, _, error),) = encode_videos(
        model, path.parent, [path.name], index.settings["sampling"], batch_size=1, progress=False
    )
    if error:
        raise RetrieveError(f"cannot read {path}: {error}")
    return emb, row, str(path)


def open_index(
    index_dir: Path, init_model: str | None, pretrained_clip_name: str | None, max_words: int
) -> tuple[Index, CLIP4Clip]:
    """The index (embeddings memory-mapped) and the model that built it."""
    index = load_index(Path(index_dir), mmap=True)
    if not index.videos:
        raise RetrieveError(f"{index_dir} holds no videos")
    return index, index_model(index, index_dir, init_model, pretrained_clip_name, max_words)


def search(
    index_dir: Path,
    queries: Sequence[str],
    top: int = 5,
    max_words: int = 32,
    init_model: str | None = None,
    pretrained_clip_name: str | None = None,
) -> list[dict]:
    """Text → videos: for each query ``{"query", "results": [{"rank", "id", "path", "score"}, ...]}``, best first."""
    index, model = open_index(index_dir, init_model, pretrained_clip_name, max_words)
    return rank_texts(index, model, queries, top, max_words)


def search_video(
    index_dir: Path, video: str, top: int = 5, init_model: str | None = None, pretrained_clip_name: str | None = None
) -> dict:
    """Video → videos: ``{"video", "results": [...]}``, the query video itself left out; the search page's
    "more like this" ranks the same way."""
    index, model = open_index(index_dir, init_model, pretrained_clip_name, 32)
    emb, row, described = query_video(index, model, video)
    return {"video": described, "results": rank_similar(index, emb, top, logit_scale(model), exclude=row)}


def rank_captions(
    index_dir: Path,
    video: Path,
    captions: Sequence[str],
    top: int | None = None,
    max_words: int = 32,
    init_model: str | None = None,
    pretrained_clip_name: str | None = None,
) -> dict:
    """Video → text: ``{"video", "results": [{"rank", "caption", "score"}, ...]}``, best first.

    An indexed, unchanged video uses its stored embedding; any other file is encoded with the index's settings.
    """
    index = load_index(Path(index_dir))
    if not Path(video).is_file():
        raise RetrieveError(f"--video {Path(video).resolve()} not found")
    model = index_model(index, index_dir, init_model, pretrained_clip_name, max_words)
    emb, _, described = query_video(index, model, str(video))
    text = text_embeddings(model, captions, max_words).cpu().numpy()
    # One video against many captions: rank the captions, i.e. the columns of the (captions, 1) score matrix.
    order, col = top_k(text, emb[None, :], top or len(captions), logit_scale(model))
    return {
        "video": described,
        "results": [
            {"rank": r + 1, "caption": captions[i], "score": float(s)} for r, (i, s) in enumerate(zip(order[0], col[0]))
        ],
    }


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def serve(args: argparse.Namespace) -> None:
    """``retrieve.py serve``: load the index and its model once, then answer the page until interrupted."""
    try:
        import uvicorn

        from search_page import create_app
    except ImportError as e:
        if e.name not in ("fastapi", "uvicorn", "starlette"):
            raise
        raise RetrieveError(
            f"serve needs FastAPI and uvicorn ({e.name} is not installed): pip install -r requirements-web.txt"
        ) from None
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: --host {args.host}: every machine that can reach this one can search the index and "
            f"download its videos (there is no login)",
            file=sys.stderr,
        )
    if args.videos is not None:
        print(build_index(args.videos, args.index, args.init_model, args.pretrained_clip_name), file=sys.stderr)
    index, model = open_index(args.index, args.init_model, args.pretrained_clip_name, args.max_words)
    app = create_app(index, Path(args.index), model, args.max_words)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"searching {len(index.videos)} videos of {args.index} at http://{host}:{args.port}/ (Ctrl+C stops)",
        file=sys.stderr,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def _read_lines(path: str, what: str) -> list[str]:
    """Non-blank lines of a UTF-8 text file, one query or caption each; lines end only at \\n, \\r\\n or \\r (not at
    the other separators ``str.splitlines`` knows, which a caption may hold)."""
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").split("\n")]
    except FileNotFoundError:
        raise RetrieveError(f"{what} file {path} not found") from None
    except UnicodeDecodeError as e:
        raise RetrieveError(f"{what} file {path}: not UTF-8 text (byte {e.start})") from None
    lines = [line for line in lines if line]
    if not lines:
        raise RetrieveError(f"{what} file {path} holds no {what} (one per line expected)")
    return lines


def _print_table(title: str, results: list[dict], column: str) -> None:
    print(title)
    print(f"  {'rank':>4}  {'score':>8}  {column}")
    for r in results:
        print(f"  {r['rank']:>4}  {r['score']:>8.3f}  {r[column]}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def weights(p: argparse.ArgumentParser, index_time: bool) -> None:
        where = "" if index_time else " (only if the weights moved since indexing)"
        p.add_argument("--init_model", help="a CLIP4Clip checkpoint (pytorch_model.bin.N)" + where)
        p.add_argument(
            "--pretrained_clip_name",
            help=f"CLIP weights: ViT-B/32, ViT-B/16, a tiny random name or a file (default {DEFAULT_CLIP})" + where,
        )

    p = commands.add_parser("index", help="encode every video under a folder into an index (incrementally)")
    p.add_argument("--videos", required=True, help="folder searched recursively for video files")
    p.add_argument("--index", required=True, help="index directory (created, or updated)")
    weights(p, index_time=True)
    p.add_argument("--sim_header", choices=SIM_HEADERS, help="default: the checkpoint's head, meanP without one")
    p.add_argument("--linear_patch", choices=("2d", "3d"), help="default: the checkpoint's, 2d without one")
    p.add_argument("--max_frames", type=int, help=f"default {DEFAULT_SAMPLING['max_frames']}")
    p.add_argument("--feature_framerate", type=int, help=f"default {DEFAULT_SAMPLING['feature_framerate']}")
    p.add_argument(
        "--slice_framepos",
        type=int,
        choices=(0, 1, 2),
        help=f"0 first, 1 last, 2 uniform frames (default {DEFAULT_SAMPLING['slice_framepos']})",
    )
    p.add_argument("--batch_size", type=int, default=16, help="videos per forward pass")
    p.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1), help="decoding processes")

    p = commands.add_parser("search", help="text -> the best matching videos of an index")
    p.add_argument("--index", required=True)
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--query", help="one text query")
    q.add_argument("--queries", help="a text file, one query per line")
    q.add_argument(
        "--video",
        metavar="FILE_OR_ID",
        help="video -> similar videos: a video file, or an index id (as the search page shows)",
    )
    p.add_argument("--top_k", type=int, default=5)
    p.add_argument(
        "--json",
        action="store_true",
        help="print a JSON list, one {query, results} per query ({video, results} with --video)",
    )
    p.add_argument("--max_words", type=int, default=32, help="text length in tokens, start and end included")
    weights(p, index_time=False)

    p = commands.add_parser("captions", help="video -> captions ranked by how well they describe it")
    p.add_argument("--index", required=True, help="the index whose model (and stored embeddings) to use")
    p.add_argument("--video", required=True, help="a video file, indexed or not")
    c = p.add_mutually_exclusive_group(required=True)
    c.add_argument("--caption", nargs="+", help="captions to rank")
    c.add_argument("--captions", help="a text file, one caption per line")
    p.add_argument("--top_k", type=int, default=None, help="default: all captions")
    p.add_argument("--json", action="store_true", help="print a JSON object {video, results}")
    p.add_argument("--max_words", type=int, default=32)
    weights(p, index_time=False)

    p = commands.add_parser("serve", help="a local search page (and JSON API) over an index")
    p.add_argument("--index", required=True)
    p.add_argument(
        "--videos",
        help="index (or update) this folder into --index first, as the index command does; "
        "--init_model and --pretrained_clip_name are then the weights to index with",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; anything but the loopback lets other machines read the videos",
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max_words", type=int, default=32)
    weights(p, index_time=False)
    args = parser.parse_args(argv)
    for name in ("top_k", "max_frames", "feature_framerate", "batch_size", "port"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if getattr(args, "max_words", None) is not None and args.max_words < 3:
        parser.error("--max_words must be at least 3 (the start and end tokens and at least one word)")
    if getattr(args, "num_workers", None) is not None and args.num_workers < 0:
        parser.error("--num_workers must be at least 0")
    return args


def _nonblank(texts: Sequence[str], flag: str) -> list[str]:
    """``texts`` with their surrounding blanks removed; an empty or whitespace-only one is refused."""
    stripped = [t.strip() for t in texts]
    if not all(stripped):
        raise RetrieveError(
            f"{flag} is empty (or only whitespace); give the text to {'search for' if flag == '--query' else 'rank'}"
        )
    return stripped


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(errors="backslashreplace")  # a file name that is not UTF-8 is shown, not a crash
    try:
        if args.command == "index":
            report = build_index(
                args.videos,
                args.index,
                args.init_model,
                args.pretrained_clip_name,
                args.sim_header,
                args.linear_patch,
                args.max_frames,
                args.feature_framerate,
                args.slice_framepos,
                args.batch_size,
                args.num_workers,
            )
            print(report)
        elif args.command == "search" and args.video is not None:
            found = search_video(args.index, args.video, args.top_k, args.init_model, args.pretrained_clip_name)
            if args.json:
                print(json.dumps(found, indent=1))
            else:
                _print_table(f"video: {found['video']}", found["results"], "path")
        elif args.command == "search":
            queries = (
                _nonblank([args.query], "--query") if args.query is not None else _read_lines(args.queries, "queries")
            )
            found = search(args.index, queries, args.top_k, args.max_words, args.init_model, args.pretrained_clip_name)
            if args.json:
                print(json.dumps(found, indent=1))
            else:
                for entry in found:
                    _print_table(f"query: {entry['query']}", entry["results"], "path")
        elif args.command == "serve":
            serve(args)
        else:
            captions = _nonblank(args.caption, "--caption") if args.caption else _read_lines(args.captions, "captions")
            ranked = rank_captions(
                args.index, args.video, captions, args.top_k, args.max_words, args.init_model, args.pretrained_clip_name
            )
            if args.json:
                print(json.dumps(ranked, indent=1))
            else:
                _print_table(f"video: {ranked['video']}", ranked["results"], "caption")
    except UsageError as e:
        print(f"retrieve.py {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
