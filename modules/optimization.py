"""BertAdam with warm-up schedules, as CLIP4Clip trains with it (the original's update rule, quirks included).

Deliberately not torch.optim.AdamW: no bias correction, a per-tensor gradient clip, the learning rate taken from
the step count *before* the increment (so the first update is zero), and a cosine that is not re-based after the
warm-up. All of it changes results, so all of it is kept.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterable, Iterator

import torch
from torch.optim import Optimizer

from modules import optimization_cpu
from modules.optimization_cpu import CpuKernel

logger = logging.getLogger(__name__)


def warmup_cosine(x: float, warmup: float = 0.002) -> float:
    """Linear warm-up to 1, then 0.5·(1 + cos πx) on the *un-rebased* progress x."""
    if x < warmup:
        return x / warmup
    return 0.5 * (1.0 + math.cos(math.pi * x))


def warmup_constant(x: float, warmup: float = 0.002) -> float:
    """Linear warm-up to 1, then 1."""
    if x < warmup:
        return x / warmup
    return 1.0


def warmup_linear(x: float, warmup: float = 0.002) -> float:
    """Linear warm-up to 1, then linear decay reaching 0 at x = 1."""
    if x < warmup:
        return x / warmup
    return max((x - 1.0) / (warmup - 1.0), 0.0)


SCHEDULES: dict[str, Callable[[float, float], float]] = {
    "warmup_cosine": warmup_cosine,
    "warmup_constant": warmup_constant,
    "warmup_linear": warmup_linear,
}


def _scheduled_lr(group: dict, step: int) -> float:
    """The group's lr at optimizer step ``step`` (0-based); constant when ``t_total == -1``."""
    if group["t_total"] == -1:
        return group["lr"]
    return group["lr"] * SCHEDULES[group["schedule"]](step / group["t_total"], group["warmup"])


class BertAdam(Optimizer):
    """Adam with decoupled-style weight decay added to the update, a schedule, and per-tensor clipping.

    State per parameter (the original's key names, so its optimizer checkpoints load): ``step`` (int),
    ``next_m`` and ``next_v`` in the parameter's dtype (fp16 for CLIP's fp16 weights).
    """

    #: fp32 CPU parameters go through the fused C kernel where it builds and reproduces the torch update; False runs
    #: the torch update everywhere (the same numbers, slower: for comparison).
    use_cpu_kernel: bool = True

    def __init__(
        self,
        params: Iterable,
        lr: float,
        warmup: float = -1,
        t_total: float = -1,
        schedule: str = "warmup_linear",
        b1: float = 0.9,
        b2: float = 0.999,
        e: float = 1e-6,
        weight_decay: float = 0.01,
        max_grad_norm: float = 1.0,
    ):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr} - should be >= 0.0")
        if schedule not in SCHEDULES:
            raise ValueError(f"Invalid schedule parameter: {schedule}; expected one of {', '.join(SCHEDULES)}")
        if not 0.0 <= warmup < 1.0 and warmup != -1:
            raise ValueError(f"Invalid warmup: {warmup} - should be in [0.0, 1.0[ or -1")
        if not 0.0 <= b1 < 1.0:
            raise ValueError(f"Invalid b1 parameter: {b1} - should be in [0.0, 1.0[")
        if not 0.0 <= b2 < 1.0:
            raise ValueError(f"Invalid b2 parameter: {b2} - should be in [0.0, 1.0[")
        if e < 0.0:
            raise ValueError(f"Invalid epsilon value: {e} - should be >= 0.0")
        defaults = dict(
            lr=lr,
            schedule=schedule,
            warmup=warmup,
            t_total=t_total,
            b1=b1,
            b2=b2,
            e=e,
            weight_decay=weight_decay,
            max_grad_norm=max_grad_norm,
        )
        super().__init__(params, defaults)

    def get_lr(self) -> list[float]:
        """Scheduled lr of every parameter that has a gradient; ``[0]`` while any of them has no state yet."""
        lrs = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    return [0]
                lrs.append(_scheduled_lr(group, state["step"]))
        return lrs

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One update of every parameter with a gradient, as the original's per-tensor loop computes it.

        Differs from the original in form only. The original materialises four parameter-sized temporaries (1.9 GiB
        for ViT-B/32) and walks all memory once per operation. Here fp32 CPU parameters go through a C kernel that
        walks memory once per step (``optimization_cpu``, used only where it reproduces the torch update bit for
        bit); everything else runs the torch update over slices of at most ``_chunk_elements`` elements, all its
        operations on one slice before the next, temporaries in a scratch buffer of one slice. Every operation is the
        original's, on the same elements, so the result is the original's to the last bit
        (tests/test_optimization.py).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for bucket in self._buckets(group):
                self._update(group, *bucket)
        return loss

    def _buckets(self, group: dict) -> list[tuple[list[torch.Tensor], list[dict], int]]:
        """The group's parameters with a gradient, split by (device, dtype, step count), state created lazily."""
        buckets: dict[tuple[torch.device, torch.dtype, int], tuple[list[torch.Tensor], list[dict]]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("BertAdam does not support sparse gradients")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = 0
                state["next_m"] = torch.zeros_like(p)
                state["next_v"] = torch.zeros_like(p)
            params, states = buckets.setdefault((p.device, p.dtype, state["step"]), ([], []))
            params.append(p)
            states.append(state)
        return [(params, states, step) for (_, _, step), (params, states) in buckets.items()]

    @staticmethod
    def _clip_coefs(grads: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
        """The factor ``clip_grad_norm_(p, max_norm)`` scales each gradient by, with its arithmetic: the tensor's
        norm, then the norm of that one norm, coefficient max_norm / (norm + 1e-6) capped at 1 (0-d tensors)."""
        norms = torch.linalg.vector_norm(torch.stack(_grad_norms(grads)).unsqueeze(1), 2, dim=1)
        return list(torch.clamp(max_norm / (norms + 1e-6), max=1.0).unbind(0))

    def _update(self, group: dict, params: list[torch.Tensor], states: list[dict], step: int) -> None:
        tensors = [(p, p.grad, s["next_m"], s["next_v"]) for p, s in zip(params, states)]
        coefs = (
            self._clip_coefs([t[1] for t in tensors], group["max_grad_norm"]) if group["max_grad_norm"] > 0 else None
        )
        lr = _scheduled_lr(group, step)  # the step count before the increment: the very first update has lr 0
        on_cpu_fp32 = params[0].device.type == "cpu" and params[0].dtype == torch.float32
        kernel = _cpu_kernel() if self.use_cpu_kernel and on_cpu_fp32 else None
        if kernel is not None:
            kernel.update(tensors, [1.0] * len(tensors) if coefs is None else torch.stack(coefs).tolist(), group, lr)
        else:
            _torch_update(group, lr, tensors, coefs)
        for state in states:
            state["step"] += 1


def _grad_norms(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each gradient's 2-norm, as ``clip_grad_norm_`` computes it. torch reduces a whole CPU tensor on one thread, so
    there the tensors are dealt out among torch's threads (each norm still comes from the same kernel, bit for bit)."""
    threads = optimization_cpu.threads_for(sum(g.numel() for g in grads))
    if grads[0].device.type != "cpu" or threads == 1:
        return list(torch._foreach_norm(grads))
    norms: list[torch.Tensor] = [torch.empty(())] * len(grads)

    def run(hand: list[int]) -> None:
        for i, norm in zip(hand, torch._foreach_norm([grads[i] for i in hand])):
            norms[i] = norm

    optimization_cpu.run_parallel(run, optimization_cpu.deal([g.numel() for g in grads], threads))
    return norms


@functools.cache
def _cpu_kernel() -> CpuKernel | None:
    """The fused CPU update, if it builds here and reproduces the torch update; else None (said once in the log)."""
    kernels, reason = optimization_cpu.candidates()
    for kernel in kernels:
        if _reproduces_torch_update(kernel):
            logger.info("BertAdam: fused CPU update (square root: %s)", kernel.sqrt_name)
            return kernel
    reason = reason or "it does not round as this torch build does"
    logger.info("BertAdam: fused CPU update off (%s); the torch update runs: same results, slower", reason)
    return None


def _reproduces_torch_update(kernel: CpuKernel) -> bool:
    """Whether ``kernel`` leaves probe tensors bit for bit as the torch update does: values over 40 binary orders of
    magnitude, lengths no vector width divides, clipped or not, with and without weight decay, two steps each."""
    gen = torch.Generator().manual_seed(0)
    for n, coef, weight_decay in ((1, 1.0, 0.2), (37, 0.37, 0.0), (10_007, 0.81, 0.2)):
        drawn = [torch.randn(n, generator=gen) * torch.exp2(torch.randint(-36, 4, (n,), generator=gen)) for _ in "pgmv"]
        drawn[3].abs_()  # a second moment
        group = dict(b1=0.9, b2=0.98, e=1e-6, weight_decay=weight_decay)
        ours, torchs = [t.clone() for t in drawn], [t.clone() for t in drawn]
        for lr in (1e-3, 3.7e-5):
            kernel.update([tuple(ours)], [coef], group, lr)
            _torch_update(group, lr, [tuple(torchs)], [torch.tensor(coef)])
        if not all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(ours, torchs)):
            return False
    return True


def _torch_update(group: dict, lr: float, tensors: list[tuple[torch.Tensor, ...]], coefs) -> None:
    """The update with torch operations, all of them on one slice before the next (parameter-sized temporaries
    avoided); ``coefs``: each tensor's clip factor (0-d tensors), or None without the per-tensor clip."""
    # fp32 kernels round a moment update alike in their vectorised body and their scalar tail, so the moments
    # may be updated slice by slice; fp16 ones do not, so there the moments update whole tensors first, as the
    # original does, and only the rest of the update (single-rounding operations) runs by slices.
    by_slices = tensors[0][0].dtype == torch.float32
    if not by_slices:
        for i, (_, grad, next_m, next_v) in enumerate(tensors):
            _moments_(group, grad, next_m, next_v, None if coefs is None else coefs[i])
    size = _chunk_elements(tensors[0][0].device)
    scratch = torch.empty(2 * size, dtype=tensors[0][0].dtype, device=tensors[0][0].device)
    for i, piece in _slices(tensors, size):
        p, grad, next_m, next_v = piece
        if by_slices:
            _moments_(group, grad, next_m, next_v, None if coefs is None else coefs[i])
        _apply_update_(group, lr, p, next_m, next_v, scratch[: p.numel()], scratch[size : size + p.numel()])


def _chunk_elements(device: torch.device) -> int:
    """Slice length: on CPU the six slices an update touches (24 MiB) stay in the last-level cache, and few enough
    operations run that their start-up does not bound the step on a busy machine; on a GPU launches are the cost."""
    return 1 << 20 if device.type == "cpu" else 1 << 24


def _slices(tensors: list[tuple[torch.Tensor, ...]], size: int) -> Iterator[tuple[int, tuple[torch.Tensor, ...]]]:
    """(tensor index, the same slice of each of its tensors), slices of at most ``size`` elements, flat views."""
    for i, group in enumerate(tensors):
        if not all(t.is_contiguous() for t in group):
            raise RuntimeError("BertAdam needs contiguous parameters, gradients and moments")
        flat = [t.view(-1) for t in group]
        for start in range(0, flat[0].numel(), size):
            yield i, tuple(t[start : start + size] for t in flat)


def _moments_(group: dict, grad: torch.Tensor, next_m: torch.Tensor, next_v: torch.Tensor, coef) -> None:
    """Per-tensor clip (on top of the train loop's global clip: rarely active, kept because it is), then m and v."""
    if coef is not None:
        grad.mul_(coef)
    next_m.mul_(group["b1"]).add_(grad, alpha=1 - group["b1"])
    next_v.mul_(group["b2"]).addcmul_(grad, grad, value=1 - group["b2"])


def _apply_update_(
    group: dict, lr: float, p: torch.Tensor, next_m: torch.Tensor, next_v: torch.Tensor, u: torch.Tensor, tmp
) -> None:
    """p += -(lr·(m / (√v + e) + wd·p)), each operation rounded as the original rounds it; u, tmp: scratch."""
    torch.sqrt(next_v, out=u)
    u.add_(group["e"])
    torch.div(next_m, u, out=u)
    if group["weight_decay"] > 0.0:
        u.add_(torch.mul(p, group["weight_decay"], out=tmp))
    # -(lr·u) in one multiply: negation is exact, and rounding to nearest is symmetric, so (-lr)·u == -(lr·u).
    u.mul_(-lr)
    p.add_(u)
