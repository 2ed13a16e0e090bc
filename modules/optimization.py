"""BertAdam with warm-up schedules, as CLIP4Clip trains with it (the original's update rule, quirks included).

Deliberately not torch.optim.AdamW: no bias correction, a per-tensor gradient clip, the learning rate taken from
the step count *before* the increment (so the first update is zero), and a cosine that is not re-based after the
warm-up. All of it changes results, so all of it is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch.optim import Optimizer


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

        Differs from the original in form only: the same operations run as ``torch._foreach_*`` calls over all
        tensors of a group that share a dtype and a step count, because one Python loop iteration per tensor (about
        200 for ViT-B/32) bounds the step on a GPU. On CPU every foreach call runs the per-tensor kernel, so the
        result is the original's to the last bit (tests/test_optimization.py).
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
    def _clip_each_(grads: list[torch.Tensor], max_norm: float) -> None:
        """``clip_grad_norm_(p, max_norm)`` applied to each gradient on its own, in place, with the same arithmetic:
        the tensor's norm, then the norm of that one norm, coefficient max_norm / (norm + 1e-6) capped at 1."""
        norms = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).unsqueeze(1), 2, dim=1)
        coefs = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
        torch._foreach_mul_(grads, list(coefs.unbind(0)))

    def _update(self, group: dict, params: list[torch.Tensor], states: list[dict], step: int) -> None:
        grads = [p.grad for p in params]
        next_m = [s["next_m"] for s in states]
        next_v = [s["next_v"] for s in states]
        beta1, beta2 = group["b1"], group["b2"]

        opmath = torch.promote_types(params[0].dtype, torch.float32)

        def scalar(x: float) -> torch.Tensor:
            # A 0-d tensor, not a Python float: foreach ops round a Python scalar to the list's dtype first (fp16 for
            # CLIP), while the original's per-tensor ops compute with it in float32 (or the parameter's wider type).
            return torch.tensor(x, dtype=opmath, device=params[0].device)

        # Per-tensor clip on top of the train loop's global clip: rarely active, kept because it is.
        if group["max_grad_norm"] > 0:
            self._clip_each_(grads, group["max_grad_norm"])
        torch._foreach_mul_(next_m, scalar(beta1))
        torch._foreach_add_(next_m, grads, alpha=1 - beta1)
        torch._foreach_mul_(next_v, scalar(beta2))
        torch._foreach_addcmul_(next_v, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(next_v)
        torch._foreach_add_(denom, scalar(group["e"]))
        update = torch._foreach_div(next_m, denom)
        if group["weight_decay"] > 0.0:
            torch._foreach_add_(update, torch._foreach_mul(params, scalar(group["weight_decay"])))
        # The step count before the increment: the very first update has lr 0. p + (-lr·u), as the original.
        torch._foreach_add_(params, torch._foreach_neg(torch._foreach_mul(update, scalar(_scheduled_lr(group, step)))))
        for state in states:
            state["step"] += 1
