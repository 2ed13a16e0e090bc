"""BertAdam's fp32 CPU update in one pass over memory: the C kernel in ``bert_adam_cpu.c``, built at first use.

torch's eager update walks memory once per operation; the kernel walks it once per step, repeating the roundings of
torch's kernels (see the C file). Whether it does so on this machine is for ``modules.optimization`` to check: it
asks :func:`candidates` for the kernel paired with each square root torch's sqrt kernel may be (MKL's, where torch
ships MKL, then the correctly rounded one) and uses the first that reproduces its torch update bit for bit.

The kernel is compiled with the system C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``) into a temporary
folder, once per process (about half a second), for the machine it runs on; nothing is cached on disk.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("bert_adam_cpu.c")
# Tried in order: tuned for this CPU, then plain (a compiler that does not know -march=native).
_FLAG_SETS = (
    ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno"],
    ["-O3", "-ffp-contract=off", "-fno-math-errno"],
)
# MKL's vector square root (ILP64 entry: 64-bit count) in the mode torch's sqrt kernel calls it with:
# high accuracy, denormals kept, errors ignored.
_MKL_SQRT, _MKL_SQRT_MODE = "vmsSqrt_64", 0x2 | 0x140000 | 0x100
# Below this many elements a step runs on the calling thread: starting threads would cost more than they save.
_THREADED_ABOVE = 1 << 16

Tensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # parameter, gradient, next_m, next_v


class _Hyper(ctypes.Structure):
    """``struct bert_adam_hyper`` of the C file, field for field."""

    _fields_ = [
        (name, ctypes.c_float) for name in ("b1", "one_minus_b1", "b2", "one_minus_b2", "e", "weight_decay", "neg_lr")
    ] + [("decay", ctypes.c_int32)]


@dataclass(frozen=True)
class CpuKernel:
    """The compiled update with one square root; ``sqrt_name`` says which."""

    function: ctypes._CFuncPtr
    sqrt_name: str
    sqrt_address: int
    sqrt_mode: int

    def update(self, tensors: Sequence[Tensors], coefs: Sequence[float], group: dict, lr: float) -> None:
        """One BertAdam update of every (p, grad, next_m, next_v) in place; ``coefs``: each tensor's clip factor."""
        for t in (t for four in tensors for t in four):
            if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
                raise RuntimeError("the CPU kernel takes contiguous fp32 CPU parameters, gradients and moments")
        # ctypes rounds each Python float to float32 to nearest, as torch's float kernels take their scalars.
        hyper = _Hyper(
            group["b1"],
            1 - group["b1"],
            group["b2"],
            1 - group["b2"],
            group["e"],
            group["weight_decay"],
            -lr,  # -(lr·u) == (-lr)·u: negation is exact and rounding to nearest is symmetric
            group["weight_decay"] > 0.0,
        )
        sizes = [four[0].numel() for four in tensors]
        parts = split(sizes, threads_for(sum(sizes)))
        pieces = [[(tensors[i], coefs[i], start, length) for i, start, length in part] for part in parts]

        def run(part: list) -> None:
            for four, coef, start, length in part:
                pointers = [t.data_ptr() + 4 * start for t in four]
                self.function(length, *pointers, coef, ctypes.byref(hyper), self.sqrt_address, self.sqrt_mode)

        run_parallel(run, pieces)


def split(sizes: Sequence[int], parts: int) -> list[list[tuple[int, int, int]]]:
    """The elements of tensors of ``sizes``, laid end to end, cut into ``parts`` runs of equal length (±1):
    each run as (tensor index, first element, element count) pieces."""
    total = sum(sizes)
    bounds = [total * k // parts for k in range(parts + 1)]
    runs: list[list[tuple[int, int, int]]] = [[] for _ in range(parts)]
    offset = 0
    for i, size in enumerate(sizes):
        for k in range(parts):
            lo, hi = max(offset, bounds[k]), min(offset + size, bounds[k + 1])
            if hi > lo:
                runs[k].append((i, lo - offset, hi - lo))
        offset += size
    return runs


def deal(sizes: Sequence[int], parts: int) -> list[list[int]]:
    """Indices of tensors of ``sizes`` dealt into ``parts`` hands of near-equal total size, largest first."""
    hands: list[list[int]] = [[] for _ in range(parts)]
    totals = [0] * parts
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        k = totals.index(min(totals))
        hands[k].append(i)
        totals[k] += sizes[i]
    return hands


def threads_for(elements: int) -> int:
    """torch's thread count, or 1 for work too small to be worth starting threads."""
    return torch.get_num_threads() if elements > _THREADED_ABOVE else 1


def run_parallel(run, parts: list) -> None:
    """``run(part)`` for every part, the first on this thread; ctypes lets go of the GIL while the C code runs. The
    threads end with the call: none is left alive for a data loader's fork to inherit."""
    errors: list[BaseException] = []

    def guarded(part) -> None:
        try:
            run(part)
        except BaseException as error:  # re-raised on the calling thread below
            errors.append(error)

    workers = [threading.Thread(target=guarded, args=(part,)) for part in parts[1:] if part]
    for worker in workers:
        worker.start()
    guarded(parts[0])
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]


def candidates() -> tuple[list[CpuKernel], str]:
    """The kernel with each square root it may have to match, and, when there is none, why (for the log)."""
    if sys.platform == "win32":
        return [], "the kernel is built for Linux and macOS only"
    with tempfile.TemporaryDirectory(prefix="bert_adam_") as folder:
        library, reason = _build(Path(folder))
    if library is None:
        return [], reason
    function = library.bert_adam_update
    function.restype = None
    function.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * 4 + [ctypes.c_float]
    function.argtypes += [ctypes.POINTER(_Hyper), ctypes.c_void_p, ctypes.c_int64]
    kernels = []
    mkl_sqrt = _torch_symbol(_MKL_SQRT)
    if mkl_sqrt is not None:
        kernels.append(CpuKernel(function, "MKL vmsSqrt", mkl_sqrt, _MKL_SQRT_MODE))
    kernels.append(CpuKernel(function, "correctly rounded sqrtf", _address(library.exact_sqrt), 0))
    return kernels, ""


def _build(folder: Path) -> tuple[ctypes.CDLL | None, str]:
    """Compile and load the kernel; (None, why) when no compiler is found or none of the flag sets compiles."""
    compiler = os.environ.get("CC") or next(filter(None, map(shutil.which, ("cc", "gcc", "clang"))), None)
    if compiler is None:
        return None, "no C compiler found (set CC or install gcc)"
    target = folder / "bert_adam_cpu.so"
    error = ""
    for flags in _FLAG_SETS:
        command = [compiler, *flags, "-shared", "-fPIC", str(SOURCE), "-o", str(target), "-lm"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"{compiler} did not run: {exc}"
        if done.returncode == 0:
            try:
                return ctypes.CDLL(str(target)), ""
            except OSError as exc:  # a temporary folder mounted noexec, say
                return None, f"the compiled kernel does not load from {folder}: {exc}"
        error = (done.stderr.strip().splitlines() or ["no message"])[-1]
    return None, f"{compiler} could not compile {SOURCE.name}: {error}"


def _torch_symbol(name: str) -> int | None:
    """The address of ``name`` in the torch library this process loaded, if it exports it."""
    folder = Path(torch.__file__).parent / "lib"
    for file in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        if (folder / file).exists():
            try:
                return _address(getattr(ctypes.CDLL(str(folder / file)), name))
            except (OSError, AttributeError):
                return None
    return None


def _address(function) -> int:
    return ctypes.cast(function, ctypes.c_void_p).value
