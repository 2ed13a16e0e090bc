"""One CLIP4Clip training step (forward + backward) at ViT-B/32 shapes, with and without gradient checkpointing.

Random weights built with the real CLIP constructor (no weight file needed; they cost the same as real ones).
Each configuration runs in its own fresh subprocess so one cannot inherit the other's memory high-water mark.
Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the step; on CPU the growth of the process RSS during
the step, sampled every 2 ms by a thread (torch's CPU allocator is invisible to tracemalloc). Either way the figure is
what one step adds (activations and temporaries) over the weights, gradients and inputs already held.

    python bench/bench_model_step.py [--batch 4] [--frames 12] [--sim_header meanP] [--steps 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from modules.clip_names import NAMED_ARCHITECTURES, TINY_MODELS  # noqa: E402
from modules.modeling import CLIP4Clip, CLIP4ClipConfig  # noqa: E402
from modules.module_clip import CLIP  # noqa: E402
from modules.module_cross import CrossConfig  # noqa: E402

VIT_B_32 = NAMED_ARCHITECTURES["ViT-B/32"]
MAX_WORDS = 32


def clip_shapes(toy: bool) -> dict[str, int]:
    """ViT-B/32's architecture, or the tiny random CLIP's (``--toy``: the suite runs the bench in seconds)."""
    return TINY_MODELS["tiny-random-ViT/16"] if toy else VIT_B_32


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssPeak:
    """Samples the process RSS in a thread; ``peak`` is the largest value seen."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def make_batch(batch: int, frames: int, device: torch.device, resolution: int = 224):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 49000, (batch, 1, MAX_WORDS), generator=gen)
    ids[:, 0, MAX_WORDS // 2] = 49407
    ids[:, 0, MAX_WORDS // 2 + 1 :] = 0
    mask = (ids != 0).long()
    video = torch.randn(batch, 1, frames, 1, 3, resolution, resolution, generator=gen)
    video_mask = torch.ones(batch, 1, frames, dtype=torch.long)
    return [t.to(device) for t in (ids, torch.zeros_like(ids), mask, video, video_mask)]


def time_steps(step: Callable[[], None], steps: int, device: torch.device) -> tuple[list[float], int, int]:
    """Seconds of each of ``steps`` calls of ``step``, the memory held before them and the peak during them (bytes):
    allocated CUDA memory on a GPU, the process RSS (sampled by a thread) on the CPU."""
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        rest = torch.cuda.memory_allocated(device)
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return times, rest, torch.cuda.max_memory_allocated(device)
    rest = rss_bytes()
    with RssPeak() as sampler:
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    return times, rest, sampler.peak


def run_one(args: argparse.Namespace) -> dict:
    """Build the model and time ``args.steps`` training steps after one warm-up step (this process only)."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    shapes = clip_shapes(args.toy)
    clip_state_dict = CLIP(**shapes).state_dict()
    cfg = CLIP4ClipConfig(
        sim_header=args.sim_header,
        max_words=MAX_WORDS,
        max_frames=args.frames,
        precision=args.precision,
        grad_checkpointing=args.checkpointing,
    )
    model = CLIP4Clip(CrossConfig.get_config("cross-base"), clip_state_dict, cfg).to(device).train()
    del clip_state_dict
    inputs = make_batch(args.batch, args.frames, device, shapes["image_resolution"])
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(model.precision)

    def step() -> None:
        model.zero_grad(set_to_none=False)  # gradients stay allocated, as in a training loop
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss = model(*inputs)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up: allocates gradients, picks kernels
    times, rest, peak = time_steps(step, args.steps, device)
    peak -= rest
    return {"step_s": min(times), "peak_bytes": peak, "precision": model.precision}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=None, help="videos per step (default 4 on CPU, 32 on CUDA)")
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--sim_header", default="meanP", choices=["meanP", "seqLSTM", "seqTransf", "tightTransf"])
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up (best is reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="auto", help="auto, fp16-weights, fp32, bf16 or fp16")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--toy", action="store_true", help="the tiny random CLIP's shapes (runs in seconds)")
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch is None:
        args.batch = 32 if args.device.startswith("cuda") else 4
    return args


def run_child(args: argparse.Namespace, checkpointing: bool) -> dict:
    """``run_one``'s figures from a fresh subprocess with the same settings."""
    cmd = [sys.executable, __file__, "--child", "--batch", str(args.batch), "--frames", str(args.frames)]
    cmd += ["--sim_header", args.sim_header, "--steps", str(args.steps)]
    cmd += ["--device", args.device, "--precision", args.precision]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if checkpointing:
        cmd.append("--checkpointing")
    if args.toy:
        cmd.append("--toy")
    # Every allocation of 64 KiB or more gets its own mapping, so freed tensors leave the RSS at once.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def print_table(args: argparse.Namespace, plain: dict, ckpt: dict) -> None:
    memory = "CUDA max_memory_allocated" if args.device.startswith("cuda") else "CPU RSS growth (sampled)"
    shapes = "tiny CLIP" if args.toy else "ViT-B/32"
    print(
        f"CLIP4Clip training step, {shapes} shapes, {args.sim_header}, {args.batch} videos x {args.frames} frames, "
        f"{MAX_WORDS} words, device {args.device}, precision {plain['precision']}, threads {torch.get_num_threads()}"
    )
    print(f"{'':24}{'no checkpointing':>18}{'checkpointing':>16}{'ratio':>9}")
    print(
        f"{'forward+backward (s)':24}{plain['step_s']:>18.3f}{ckpt['step_s']:>16.3f}"
        f"{ckpt['step_s'] / plain['step_s']:>9.2f}"
    )
    print(
        f"{'peak step memory (MiB)':24}{plain['peak_bytes'] / 2**20:>18.0f}{ckpt['peak_bytes'] / 2**20:>16.0f}"
        f"{ckpt['peak_bytes'] / max(plain['peak_bytes'], 1):>9.2f}"
    )
    print(f"(memory: {memory}, growth during a step over what is held before it: weights, gradients, inputs)")


def main(argv: list[str] | None = None) -> dict[bool, dict]:
    """The table; returns each child's figures by whether it checkpointed."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(run_one(args)))
        return {}
    results = {checkpointing: run_child(args, checkpointing) for checkpointing in (False, True)}
    print_table(args, results[False], results[True])
    return results


if __name__ == "__main__":
    main()
