"""One optimizer step at ViT-B/32 sizes: BertAdam now (on CPU its fused C kernel, when it builds here; the log line
says), BertAdam's torch update (the path without the kernel), the original's per-tensor BertAdam, AdamW fused and
foreach.

The parameters are CLIP ViT-B/32's (image and text towers: 151 M fp32 elements in 302 tensors, shapes read off the
model built on the meta device), with random gradients set; BertAdam as the driver builds it (``warmup_cosine``,
weight decay 0.2, per-tensor clip at ``max_grad_norm`` 1.0). All optimizers step the same tensors, in turns, one
step each per round; the table gives the median over rounds. The memory-traffic limit is the bytes BertAdam must
read or write per step (the gradient once for its norm; parameter, gradient and both moments in and out: 36 bytes
per element) at the copy bandwidth measured in the same run on a parameter-sized buffer.

    python bench/bench_optimizer.py [--device cpu|cuda] [--rounds 5] [--toy]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.utils import clip_grad_norm_

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from modules.clip_names import NAMED_ARCHITECTURES  # noqa: E402
from modules.module_clip import CLIP  # noqa: E402
from modules.optimization import SCHEDULES, BertAdam  # noqa: E402

VIT_B_32 = NAMED_ARCHITECTURES["ViT-B/32"]
TOY_SHAPES = [(512, 768), (768,), (3, 64, 33), (1,), (2048, 128), (77, 512)]
BYTES_PER_ELEMENT = 36  # fp32: read g (norm); read p, g, m, v; write p, g (clipped in place), m, v
HYPER = dict(lr=1e-4, warmup=0.1, t_total=1000, schedule="warmup_cosine", b1=0.9, b2=0.98, e=1e-6)


def scheduled_lr(group: dict, step: int) -> float:
    """The group's lr at optimizer step ``step`` (0-based), as the original computes it; constant without t_total."""
    if group["t_total"] == -1:
        return group["lr"]
    return group["lr"] * SCHEDULES[group["schedule"]](step / group["t_total"], group["warmup"])


class TorchUpdateBertAdam(BertAdam):
    """BertAdam without its CPU kernel: the torch update over slices (what runs on GPU, for fp16, or without a C
    compiler)."""

    use_cpu_kernel = False


class PerTensorBertAdam(BertAdam):
    """The original's step: one Python iteration, one ``clip_grad_norm_`` and full-size temporaries per tensor."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in (p for p in group["params"] if p.grad is not None):
                state = self.state[p]
                if not state:
                    state.update(step=0, next_m=torch.zeros_like(p), next_v=torch.zeros_like(p))
                next_m, next_v = state["next_m"], state["next_v"]
                if group["max_grad_norm"] > 0:
                    clip_grad_norm_(p, group["max_grad_norm"])
                grad = p.grad
                next_m.mul_(group["b1"]).add_(grad, alpha=1 - group["b1"])
                next_v.mul_(group["b2"]).addcmul_(grad, grad, value=1 - group["b2"])
                update = next_m / (next_v.sqrt() + group["e"])
                if group["weight_decay"] > 0.0:
                    update += group["weight_decay"] * p
                p.add_(-(scheduled_lr(group, state["step"]) * update))
                state["step"] += 1


def vit_b_32_shapes() -> list[torch.Size]:
    with torch.device("meta"):
        return [p.shape for p in CLIP(**VIT_B_32).parameters()]


def make_params(shapes: list[torch.Size], device: torch.device) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(device))
        p.grad = (torch.randn(shape, generator=gen) * 0.01).to(device)
        params.append(p)
    return params


def optimizers(params: list[torch.nn.Parameter]) -> dict[str, torch.optim.Optimizer]:
    """The columns, each with its own state over the same parameters (the stepping order does not change a time)."""
    bert = dict(HYPER, weight_decay=0.2, max_grad_norm=1.0)
    adamw = dict(lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    return {
        "BertAdam (now)": BertAdam(params, **bert),
        "BertAdam (torch update)": TorchUpdateBertAdam(params, **bert),
        "BertAdam (original per-tensor)": PerTensorBertAdam(params, **bert),
        "AdamW fused": torch.optim.AdamW(params, fused=True, **adamw),
        "AdamW foreach": torch.optim.AdamW(params, foreach=True, **adamw),
    }


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def copy_bandwidth(numel: int, device: torch.device, rounds: int) -> float:
    """Bytes per second of ``dst.copy_(src)`` (read + write) on fp32 buffers of ``numel`` elements, touched first."""
    src = torch.ones(numel, device=device)
    dst = torch.zeros(numel, device=device)
    dst.copy_(src)
    seconds = statistics.median(timed(lambda: dst.copy_(src), device) for _ in range(rounds))
    return 2 * 4 * numel / seconds


def measure(shapes: list[torch.Size], device: torch.device, rounds: int) -> dict[str, float]:
    """Median seconds per step of each optimizer (after one untimed step that creates its state), and the limit."""
    params = make_params(shapes, device)
    opts = optimizers(params)
    for opt in opts.values():
        opt.step()
    times: dict[str, list[float]] = {name: [] for name in opts}
    for _ in range(rounds):
        for name, opt in opts.items():
            times[name].append(timed(opt.step, device))
    result = {name: statistics.median(t) for name, t in times.items()}
    numel = sum(p.numel() for p in params)
    bandwidth = copy_bandwidth(numel, device, rounds)
    result["copy-bandwidth limit"] = BYTES_PER_ELEMENT * numel / bandwidth
    result["numel"], result["tensors"], result["bandwidth"] = numel, len(params), bandwidth
    return result


def report(result: dict[str, float], device: torch.device, rounds: int) -> None:
    print(
        f"\nOptimizer step, {result['numel'] / 1e6:.1f} M fp32 parameters in {result['tensors']} tensors, device "
        f"{device}, {torch.get_num_threads()} torch threads, median of {rounds} rounds; copy bandwidth "
        f"{result['bandwidth'] / 1e9:.2f} GB/s"
    )
    names = [k for k in result if k not in ("numel", "tensors", "bandwidth")]
    now, fused, limit = result["BertAdam (now)"], result["AdamW fused"], result["copy-bandwidth limit"]
    print(f"{'':32}{'ms':>10}{'now/this':>10}{'this/fused':>12}{'this/limit':>12}")
    for name in names:
        t = result[name]
        print(f"{name:32}{t * 1e3:>10.1f}{now / t:>10.2f}{t / fused:>12.2f}{t / limit:>12.2f}")


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--rounds", type=int, default=5, help="timed steps per optimizer, taken in turns")
    p.add_argument("--toy", action="store_true", help="a few small tensors instead of ViT-B/32 (runs in seconds)")
    opts = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # BertAdam says whether its CPU kernel runs
    device = torch.device(opts.device)
    result = measure(TOY_SHAPES if opts.toy else vit_b_32_shapes(), device, opts.rounds)
    report(result, device, opts.rounds)
    return result


if __name__ == "__main__":
    main()
