"""Process-level helpers: logger, distributed setup, rank and device helpers, seeding and RNG state, file reads
and atomic file writes."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import secrets
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from errors import RunError, UsageError  # noqa: F401  (util.UsageError: the one user-error type)

CONSOLE_FORMAT = "%(asctime)s - %(levelname)s -   %(message)s"
CONSOLE_DATEFMT = "%m/%d/%Y %H:%M:%S"
FILE_FORMAT = "%(asctime)s:%(levelname)s: %(message)s"


class LogFile(logging.FileHandler):
    """``log.txt``: a write that fails (disk full, folder made read-only) is said once, as a WARNING on the console,
    and the file is written no more; logging's default would print a traceback block for every later record."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):  # a bad log call is a bug: logging's report with its traceback
            super().handleError(record)
            return
        if self.failed:
            return
        self.failed = True
        reason = getattr(error, "strerror", None) or str(error)
        logging.getLogger("logger").warning(
            "cannot write %s (%s); the log goes on on the console only", self.baseFilename, reason
        )


def get_logger(filename: str | Path | None = None) -> logging.Logger:
    """The named logger ``logger`` at DEBUG; console through the root handler, ``filename`` through a root file handler.

    Calling it again replaces the file handler of the previous call, so runs in one process do not write into
    each other's ``log.txt``.
    """
    logger = logging.getLogger("logger")
    logger.setLevel(logging.DEBUG)
    logging.basicConfig(format=CONSOLE_FORMAT, datefmt=CONSOLE_DATEFMT, level=logging.INFO)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "clip4clip_log_file", False):
            root.removeHandler(handler)
            handler.close()
    if filename is not None:
        # backslashreplace: a file name that is not UTF-8 (bytes Python keeps as surrogates) is logged, not an error
        handler = LogFile(filename, errors="backslashreplace")
        handler.setLevel(logging.DEBUG)
        handler.setFormatter(logging.Formatter(FILE_FORMAT))
        handler.clip4clip_log_file = True
        root.addHandler(handler)
    return logger


# ---------------------------------------------------------------------------------------------------------------
# Distributed set-up
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class DistInfo:
    """Where this process sits: ranks, world size, its device, and whether a process group runs."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    initialized: bool


def init_distributed(local_rank_flag: int = 0) -> DistInfo:
    """Join the process group the launcher describes, or run as a lone process.

    - torchrun (single or multi-node): ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and the rendezvous variables are set.
    - ``python -m torch.distributed.launch``: ``RANK``/``WORLD_SIZE`` are set, the local rank comes as
      ``--local_rank``/``--local-rank`` (``local_rank_flag``) unless ``--use-env`` put it in ``LOCAL_RANK``.
    - no launcher: one process, rank 0, no process group (the model's all-gather is then the identity).

    NCCL when CUDA is available, gloo otherwise. On CUDA the process uses ``cuda:<local_rank>``.
    """
    use_cuda = torch.cuda.is_available()
    if "WORLD_SIZE" not in os.environ:
        device = default_device()
        if use_cuda:
            torch.cuda.set_device(device)
        return DistInfo(rank=0, local_rank=0, world_size=1, device=device, initialized=False)

    world_size = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank_flag))
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"local rank {local_rank} has no GPU: only {torch.cuda.device_count()} visible "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                f"start at most that many processes per node"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", init_method="env://", world_size=world_size, rank=rank
        )
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device, initialized=True)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def default_device() -> torch.device:
    """CUDA when a GPU is visible, else the CPU: where a lone process (no launcher) runs."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` without a process group)."""
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_objects(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on ``dst``; None on the other ranks."""
    if get_world_size() == 1:
        return [obj]
    out: list[Any] | None = [None] * get_world_size() if get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank. A collective every rank must reach: a failure one process sees then stops
    them all, where a lone raise would leave the others waiting at their next collective."""
    if get_world_size() == 1:
        return flag
    on_gpu = dist.get_backend() == "nccl"
    box = torch.tensor([int(flag)], device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return bool(box.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ---------------------------------------------------------------------------------------------------------------
# Seeding and RNG state
# ---------------------------------------------------------------------------------------------------------------


def set_seed(seed: int) -> None:
    """Seed python, numpy, torch and CUDA alike on every rank; deterministic cuDNN, as the original."""
    random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def get_rng_state() -> dict[str, Any]:
    """Python, numpy, torch and (current-device) CUDA generator states, as plain values and tensors.

    Only types that ``torch.load(weights_only=True)`` accepts, so a checkpoint holding it needs no pickle trust.
    """
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without moving any generator: what it draws does not change what comes after."""
    state = get_rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------


def read_torch_file(path: str | Path, flag: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; an unreadable file is a :class:`UsageError` naming ``flag``.

    ``weights_only`` accepts tensors and plain containers only, so loading never runs code stored in the file.
    """
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        if "Weights only load failed" in str(error):
            reason = (
                "it holds Python objects besides tensors and plain containers; they are not loaded, since "
                "loading them could run code"
            )
        else:
            detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
            reason = f"not a torch.save file, or a truncated one: {type(error).__name__} {detail}".strip()
        raise UsageError(f"{flag} {path}: cannot read it ({reason})") from error


def read_state_dict(path: str | Path, flag: str) -> dict[str, torch.Tensor]:
    """A checkpoint's flat name → tensor mapping (this project's, the original's or the UniPT fork's files)."""
    state = read_torch_file(path, flag)
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise UsageError(f"{flag} {path}: expected a state dict (name → tensor), got {type(state).__name__}")
    return check_finite(state, f"{flag} {path}")


def check_finite(state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """``state``, or a :class:`UsageError` naming ``where`` and the weights holding NaN or Inf.

    Damaged weights would be evaluated (or indexed) to the end and give NaN scores: refused before any work."""
    damaged = [name for name, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if damaged:
        named = ", ".join(damaged[:3]) + (f" and {len(damaged) - 3} more" if len(damaged) > 3 else "")
        raise UsageError(f"{where}: weights hold NaN or Inf values ({named}); the file is damaged")
    return state


def file_sha256(path: str | Path) -> str:
    """The hex SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# A temporary file is ``.<name>.<pid>.<random>.tmp<suffix>`` beside its target: the suffix stays, since some writers
# (ffmpeg) choose the format from it, and the pid tells the next run whether the writer is gone.
_TEMPORARY = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp(\.[^.]*)?$")


def temporary_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{path.suffix}")


@contextmanager
def atomic_path(path: str | Path, sync: bool = True) -> Iterator[Path]:
    """A temporary path beside ``path`` for the block to write; renamed over ``path`` when the block ends, removed
    when it raises (or is interrupted). ``sync`` flushes it to disk first, so a crash never leaves a truncated file.

    A reader sees the previous file (or none) until the rename, never a partial one. Nested blocks commit in reverse
    order, the innermost first: put the file that marks a set complete outermost.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        if sync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def run_output(path: str | Path) -> Iterator[None]:
    """A write of a run's record ``path``: an OSError (disk full, read-only folder) is a :class:`RunError` naming
    the file, since the run cannot keep its record; files written before stay as they were."""
    try:
        yield
    except OSError as error:
        reason = error.strerror or str(error)
        raise RunError(f"cannot write {path} ({reason}); the files written before it are intact") from None


def atomic_write_text(text: str, path: str | Path) -> None:
    """UTF-8 text through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _process_gone(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporary files of :func:`atomic_path` in ``directory`` whose writer process is gone (a save killed
    mid-write); those of running processes are left alone. Returns what was removed."""
    removed = []
    for entry in sorted(Path(directory).glob(".*.tmp*")):
        match = _TEMPORARY.match(entry.name)
        if match and entry.is_file() and _process_gone(int(match.group(1))):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def append_line(text: str, path: str | Path) -> None:
    """Append ``text`` and a newline to ``path`` in one ``write`` on an O_APPEND descriptor: a reader sees whole
    lines only, and a run killed mid-way leaves every earlier line intact."""
    data = (text.rstrip("\n") + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
