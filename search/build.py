"""Creating and updating an index: only new or changed files are encoded, with the settings the index holds."""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from dataloaders.sampling import VideoSampling
from modules.modeling import implied_by_state_dict
from search.encode import encode_videos, fingerprint, load_model, read_checkpoint
from search.index import MANIFEST, WRITE_LOCK, Index, Plan, load_index, locked, plan_update, save_index, scan_videos
from search.settings import AS_STORED, DEFAULT_SAMPLING, SAMPLING_KEYS, IndexSettings, ModelSpec, Weights
from util import UsageError, default_device


@dataclass(frozen=True)
class IndexRequest:
    """An ``index`` run: the folder, the index, and the settings asked for (None: the index's, or the default)."""

    videos: Path
    index: Path
    weights: Weights = AS_STORED
    sim_header: str | None = None
    linear_patch: str | None = None
    max_frames: int | None = None
    feature_framerate: int | None = None
    slice_framepos: int | None = None
    batch_size: int = 16
    num_workers: int = 0
    progress: bool = True
    repoint: bool = False  # index another folder than the index's: its files replace the old folder's

    def asked(self) -> dict[str, object]:
        """The settings given, by flag name; a given one must agree with an existing index."""
        names = ("sim_header", "linear_patch") + SAMPLING_KEYS
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


@dataclass
class IndexReport:
    """The outcome of :func:`build_index`."""

    index: Path
    total: int  # videos in the index now
    encoded: list[str]  # files encoded in this run
    unchanged: int  # rows kept from the previous run
    removed: list[str]  # files gone since the previous run
    unreadable: list[dict]  # {"path", "error"}: not decoded (in this run or, unchanged, before)

    def __str__(self) -> str:
        lines = [
            f"index {self.index}: {self.total} videos ({len(self.encoded)} encoded, {self.unchanged} unchanged, "
            f"{len(self.removed)} removed), {len(self.unreadable)} unreadable"
        ]
        if self.unreadable:
            lines.append("unreadable files (not indexed; retried once they change):")
            lines += [f"  {u['path']}: {u['error']}" for u in self.unreadable]
        return "\n".join(lines)


def build_index(request: IndexRequest) -> IndexReport:
    """Create or update the index ``request.index`` for every video under ``request.videos``.

    A given setting that contradicts the stored ones is an error, since rows encoded two ways cannot be compared.
    """
    videos, index = Path(request.videos), Path(request.index)
    if not videos.is_dir():
        raise UsageError(f"--videos {videos} is not a directory")
    if index.exists() and not index.is_dir():
        raise UsageError(f"--index {index} exists and is not a directory")
    created = not index.exists()
    try:
        index.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--index {index}: cannot create the directory ({e.strerror})") from None
    waiting = f"waiting for another `retrieve.py index` run on {index} to finish"
    try:
        with locked(index / WRITE_LOCK, exclusive=True, waiting=waiting):
            return _update_index(replace(request, videos=videos, index=index))
    except BaseException:
        if created and not (index / MANIFEST).exists():  # a refused first run leaves no directory behind
            (index / WRITE_LOCK).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                index.rmdir()
        raise


def _settings_for(request: IndexRequest, old: Index | None) -> tuple[ModelSpec, VideoSampling]:
    """The old index's settings (or the defaults), with what the request asks; a contradiction is refused."""
    asked = request.asked()
    if old is None:
        spec = ModelSpec(sim_header=request.sim_header, linear_patch=request.linear_patch)
        sampling = DEFAULT_SAMPLING
    else:
        spec, sampling = old.settings.model, old.settings.sampling
        stored = {**vars(spec), **vars(sampling)}
        conflicts = [f"--{k} {v} (index: {stored[k]})" for k, v in asked.items() if v != stored[k]]
        if request.videos.resolve() != old.root and not request.repoint:
            raise UsageError(
                f"{request.index} indexes {old.root}, not --videos {request.videos}: indexing another folder would "
                f"remove its {len(old.videos)} videos from the index. Use a new --index directory, or pass "
                f"--repoint to index the new folder in their place."
            )
        if conflicts:
            raise UsageError(
                f"{request.index} was built with other settings: {', '.join(conflicts)}. Use a new --index "
                f"directory, or leave those flags out to keep the index's settings."
            )
    sampling = replace(sampling, **{k: v for k, v in asked.items() if k in SAMPLING_KEYS})
    return spec.with_weights(request.weights), sampling


def _complete_head(spec: ModelSpec, state: dict[str, torch.Tensor] | None) -> ModelSpec:
    """Fill sim_header / linear_patch from the checkpoint (else meanP / 2d); refuse what cannot be indexed."""
    trained = implied_by_state_dict(state or {})
    for key in ("sim_header", "linear_patch"):
        value, asked = trained[key], getattr(spec, key)
        if asked is None:
            spec = replace(spec, **{key: value})
        elif state is not None and asked != value:
            print(
                f"warning: {spec.init_model} looks trained with --{key} {value}; using --{key} {asked} as asked",
                file=sys.stderr,
            )
    if spec.sim_header == "tightTransf":
        raise UsageError(
            "sim_header tightTransf cannot be indexed: its cross encoder scores each (text, video) pair jointly, so "
            "there is no per-video embedding to store. Use a checkpoint trained with meanP, seqLSTM or seqTransf."
        )
    if state is None and spec.sim_header != "meanP":
        raise UsageError(
            f"sim_header {spec.sim_header} needs trained head weights: pass its checkpoint with "
            f"--init_model (plain CLIP weights run zero-shot with meanP only)"
        )
    return spec


def _indexing_model(request: IndexRequest, spec: ModelSpec, sampling: VideoSampling, old: Index | None):
    """(the model, its spec with head and fingerprint filled); another model than ``old``'s is refused."""
    state = read_checkpoint(spec.init_model)
    spec = _complete_head(spec, state)
    model = load_model(spec, state, sampling.max_frames, default_device())
    print_fp = fingerprint(model)
    if old is not None and print_fp != old.settings.model.fingerprint:
        raise UsageError(
            f"{request.index} was built with other weights than {spec.describe()} (their fingerprints "
            f"differ); index into a new --index directory instead"
        )
    return model, replace(spec, fingerprint=print_fp)


def _encode_into(
    rows: dict, request: IndexRequest, model, spec: ModelSpec, sampling: VideoSampling, root: Path, paths, found
) -> list[dict]:
    """Encode ``paths`` into ``rows`` ({path: (entry, embedding)}); returns the unreadable ones. A non-finite
    embedding stops the run: the weights are broken, and NaN scores would rank arbitrarily."""
    failed = []
    encoded = encode_videos(model, root, paths, sampling, request.batch_size, request.num_workers, request.progress)
    with contextlib.closing(encoded):  # the progress bar ends before an error is printed
        for path, emb, n_frames, error in encoded:
            size, mtime_ns, real = found[path]
            if error:
                failed.append({"path": path, "size": size, "mtime_ns": mtime_ns, "error": error})
            elif not np.isfinite(emb).all():
                raise UsageError(
                    f"{root / path}: the model gives non-finite embedding values (NaN or Inf) for this video; "
                    f"check the weights {spec.describe()} (nothing was written)"
                )
            else:
                rows[path] = ({"path": path, "size": size, "mtime_ns": mtime_ns, "frames": n_frames, "real": real}, emb)
    return failed


def _update_index(request: IndexRequest) -> IndexReport:
    """:func:`build_index` under the index's write lock."""
    old = load_index(request.index) if (request.index / MANIFEST).exists() else None
    spec, sampling = _settings_for(request, old)
    root = request.videos.resolve()
    found, unstatable = scan_videos(root)
    plan = plan_update(old, found)
    kept = [old.videos[i] for i in plan.keep] if old else []
    # An index written before real paths were recorded gets them now (the file is unchanged by size and time).
    rows = {v["path"]: ({**v, "real": found[v["path"]].real}, old.embeddings[i]) for i, v in zip(plan.keep, kept)}
    failed = []
    if old is None or plan.encode or spec != old.settings.model:
        model, spec = _indexing_model(request, spec, sampling, old)
        failed = _encode_into(rows, request, model, spec, sampling, root, plan.encode, found)
    order = sorted(rows)
    embeddings = (
        np.stack([rows[p][1] for p in order]).astype(np.float32) if order else np.zeros((0, 0), dtype=np.float32)
    )
    unreadable = sorted(plan.still_unreadable + failed, key=lambda u: u["path"])
    settings = IndexSettings(str(root), spec, sampling)
    save_index(request.index, Index(settings, [rows[p][0] for p in order], unreadable, embeddings))
    return _report(request.index, plan, rows, unreadable, unstatable)


def _report(index: Path, plan: Plan, rows: dict, unreadable: list[dict], unstatable: dict[str, str]) -> IndexReport:
    encoded = sorted(p for p in plan.encode if p in rows)
    listed = unreadable + [{"path": p, "error": e} for p, e in unstatable.items()]
    listed = [{"path": u["path"], "error": u["error"]} for u in sorted(listed, key=lambda u: u["path"])]
    return IndexReport(index, len(rows), encoded, len(plan.keep), plan.removed, listed)
