"""One CLIP4Clip training step at ViT-B/32 shapes: UniPT parallel tuning against full fine-tuning, same batch.

A step is what the driver does per batch: forward, backward, gradient clipping, BertAdam step. Both models are
set up as the scripts set them up (full: ``--freeze_layer_num 0``; unipt: only the adapters train) with the
driver's own optimizer groups. Random weights from the real CLIP constructor (they cost what real ones cost).
Each mode runs in a fresh subprocess, so neither inherits the other's memory high-water mark.

Memory: "rest" is what a training process holds between steps (weights, gradients, optimizer state), measured
after one warm-up step; "step" is the peak a step adds above it (activations kept for backward, temporaries).
On CUDA both come from the caching allocator's counters; on CPU from the process RSS, sampled every 2 ms.
"Saved for backward" sums the distinct non-parameter tensors autograd keeps during the forward pass, which names
the tensors that dominate the step's memory.

    python bench/bench_unipt_step.py [--batch 2] [--frames 12] [--steps 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.bench_model_step import MAX_WORDS, clip_shapes, make_batch, rss_bytes, time_steps  # noqa: E402
from engine.model import prep_optimizer  # noqa: E402
from modules.modeling import CLIP4Clip, CLIP4ClipConfig, freeze_clip_layers  # noqa: E402
from modules.module_clip import CLIP  # noqa: E402
from modules.module_cross import CrossConfig  # noqa: E402

TARGETS = {"step memory": 0.35, "step time": 0.6}  # unipt / full, from the issue that asked for this mode


def _saved_for_backward(model: torch.nn.Module, inputs) -> Counter:
    """Bytes autograd keeps for backward in one forward pass, by (shape, dtype), each storage counted once.

    Parameters are left out: they are held at rest anyway.
    """
    seen = {(p.untyped_storage().data_ptr(), p.device) for p in model.parameters()}
    by_shape = Counter()

    def pack(t: torch.Tensor):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            by_shape[(tuple(t.shape), str(t.dtype).replace("torch.", ""))] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(*inputs)
    del loss
    return by_shape


def run_one(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()
    torch.manual_seed(0)
    cfg = CLIP4ClipConfig(max_words=MAX_WORDS, max_frames=args.frames, precision=args.precision, tuning=args.tuning)
    shapes = clip_shapes(args.toy)
    clip_state_dict = CLIP(**shapes).state_dict()
    model = CLIP4Clip(CrossConfig.get_config("cross-base"), clip_state_dict, cfg).to(device).train()
    del clip_state_dict
    freeze_clip_layers(model, 0, "2d")  # the scripts' --freeze_layer_num 0 (unipt has frozen CLIP already)
    optimizer = prep_optimizer(model, lr=1e-4, coef_lr=1.0, warmup=0.1, total_steps=100.0)
    inputs = make_batch(args.batch, args.frames, device, shapes["image_resolution"])
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        loss = model(*inputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # as the driver: gradients stay allocated between steps
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()  # warm-up: allocates gradients and optimizer state
    times, rest, peak = time_steps(step, args.steps, device)
    saved = _saved_for_backward(model, inputs)
    return {
        "step_s": min(times),
        "rest_bytes": rest - before,
        "step_bytes": peak - rest,
        "saved_bytes": sum(saved.values()),
        "precision": model.precision,
        "trainable": sum(p.numel() for p in params),
        "top_saved": [[list(shape), dtype, n] for (shape, dtype), n in saved.most_common(4)],
    }


def _child(args: argparse.Namespace, tuning: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        tuning,
        "--batch",
        str(args.batch),
        "--frames",
        str(args.frames),
        "--steps",
        str(args.steps),
        "--device",
        args.device,
        "--precision",
        args.precision,
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.toy:
        cmd.append("--toy")
    # Every allocation of 64 KiB or more gets its own mapping, so freed tensors leave the RSS at once.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=None, help="videos per step (default 2 on CPU, 32 on CUDA)")
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up (best is reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="auto", help="auto, fp16-weights, fp32, bf16 or fp16")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--toy", action="store_true", help="the tiny random CLIP's shapes (runs in seconds)")
    parser.add_argument("--child", choices=["full", "unipt"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch is None:
        args.batch = 32 if args.device.startswith("cuda") else 2
    return args


def print_table(args: argparse.Namespace, full: dict, unipt: dict) -> None:
    """Both modes side by side with unipt / full ratios against TARGETS, then what unipt saves for backward."""
    mib = 2**20
    memory = "CUDA memory_allocated" if args.device.startswith("cuda") else "CPU RSS (sampled)"
    print(
        f"CLIP4Clip training step (forward, backward, BertAdam), {'tiny CLIP' if args.toy else 'ViT-B/32'} shapes, meanP, {args.batch} videos x "
        f"{args.frames} frames, {MAX_WORDS} words, device {args.device}, precision {full['precision']}, "
        f"threads {torch.get_num_threads()}"
    )
    rows = [
        ("trainable parameters (M)", full["trainable"] / 1e6, unipt["trainable"] / 1e6, None),
        ("step time (s)", full["step_s"], unipt["step_s"], TARGETS["step time"]),
        ("memory at rest (MiB)", full["rest_bytes"] / mib, unipt["rest_bytes"] / mib, None),
        ("step memory above rest (MiB)", full["step_bytes"] / mib, unipt["step_bytes"] / mib, TARGETS["step memory"]),
        (
            "peak memory, total (MiB)",
            (full["rest_bytes"] + full["step_bytes"]) / mib,
            (unipt["rest_bytes"] + unipt["step_bytes"]) / mib,
            None,
        ),
        ("saved for backward (MiB)", full["saved_bytes"] / mib, unipt["saved_bytes"] / mib, None),
    ]
    print(f"{'':30}{'full':>12}{'unipt':>12}{'ratio':>8}{'target':>9}")
    missed = []
    for name, a, b, target in rows:
        ratio = b / a if a else float("nan")
        mark = ""
        if target is not None:
            mark = f"<= {target:.2f}" + ("" if ratio <= target else " MISSED")
            if ratio > target:
                missed.append(name)
        print(f"{name:30}{a:>12.2f}{b:>12.2f}{ratio:>8.2f} {mark:>8}")
    print(f"(memory: {memory}; rest = weights + gradients + optimizer state after one warm-up step)")
    print("largest tensors unipt saves for backward (shape, dtype, MiB):")
    for shape, dtype, n in unipt["top_saved"]:
        print(f"  {tuple(shape)} {dtype} {n / mib:.1f}")
    if missed:
        print(
            f"target missed: {', '.join(missed)}; the tensors above are what unipt's step still holds (its "
            f"frozen towers keep no activations; the adapters keep their ReLU inputs per hidden state)"
        )


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """The table; returns each mode's figures ("full", "unipt")."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        args.tuning = args.child
        print(json.dumps(run_one(args)))
        return {}
    full, unipt = _child(args, "full"), _child(args, "unipt")
    print_table(args, full, unipt)
    return {"full": full, "unipt": unipt}


if __name__ == "__main__":
    main()
