"""Training throughput end to end: clips per second from video file to optimizer step, and what bounds it.

Generates an MSR-VTT-layout data set of real h264 videos (320x240, 30 fps, like MSR-VTT's), then runs the driver's
own pieces (its argument parser, ``DATALOADER_DICT`` data set and DataLoader, ``init_model``, ``prep_optimizer``,
``normalize_video``) and prints side by side:

* loader alone: clips/s and frames/s with N workers, first pass (decoding, filling the frame cache), cached pass,
  and the cached pass with the original's float64 frames instead of uint8;
* model step alone (synthetic batch already on the device): before (nn.MultiheadAttention, per-tensor BertAdam),
  now (scaled_dot_product_attention, BertAdam by cache-sized slices), and now with ``--compile``, per phase;
* the whole loop (loader + model + optimizer, cached pass), its ratio to min(loader, model), the breakdown of a step
  (data wait, host->device, forward, backward, optimizer, all-reduce) and the projected time of the paper's recipe
  (MSR-VTT 9k expanded: 180,000 pairs x 5 epochs).

Random weights (no download): ``--clip ViT-B/32`` writes a random ViT-B/32 weight file into the data folder once.

    python bench/bench_train_throughput.py                  # CPU, small sizes
    python bench/bench_train_throughput.py --device cuda    # the recipe's sizes: batch 128, 12 frames, 16 workers
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "bench"):
    sys.path.insert(0, str(path))
from bench_optimizer import PerTensorBertAdam  # noqa: E402  (the original's per-tensor step)
from bench_video_loading import make_video  # noqa: E402

import main_task_retrieval as driver  # noqa: E402
from dataloaders.data_dataloaders import DATALOADER_DICT  # noqa: E402
from dataloaders.rawvideo_util import normalize_video  # noqa: E402
from modules import module_clip  # noqa: E402
from modules.modeling import freeze_clip_layers  # noqa: E402
from modules.module_clip import CLIP, clip_config_from_state_dict  # noqa: E402
from modules.tokenization_clip import SimpleTokenizer  # noqa: E402

RECIPE_PAIRS, RECIPE_EPOCHS, GOAL_MINUTES = 180_000, 5, 30
VIT_B_32 = dict(
    embed_dim=512,
    image_resolution=224,
    vision_layers=12,
    vision_width=768,
    vision_patch_size=32,
    context_length=77,
    vocab_size=49408,
    transformer_width=512,
    transformer_heads=8,
    transformer_layers=12,
)
CAPTIONS_PER_VIDEO = 20
PHASES = ("data wait", "host->device", "forward", "backward", "optimizer", "all-reduce")


# ---- the data set ---------------------------------------------------------------------------------------------------


def make_msrvtt_layout(root: Path, n_videos: int, seconds: int, distinct: int = 4) -> dict[str, str]:
    """``n_videos`` MSR-VTT ids with 20 captions each; ``distinct`` real encodings, the other ids symlinked to
    them (every id is still decoded and cached on its own)."""
    videos = root / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    sources = [
        make_video(root / f"source{k}_{seconds}s.mp4", 320, 240, [], seconds=seconds)
        for k in range(min(distinct, n_videos))
    ]
    ids = [f"video{i}" for i in range(n_videos)]
    for i, vid in enumerate(ids):
        link = videos / f"{vid}.mp4"
        if not link.exists():
            link.symlink_to(sources[i % len(sources)])
    (root / "MSRVTT_train.9k.csv").write_text("video_id\n" + "".join(f"{v}\n" for v in ids))
    (root / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\n"
        + "".join(f"ret{i},msr{i},{v},a test pattern number {i}\n" for i, v in enumerate(ids))
    )
    sentences = [
        {"video_id": v, "caption": f"a moving test pattern {k} with noise", "sen_id": i * 20 + k}
        for k in range(CAPTIONS_PER_VIDEO)
        for i, v in enumerate(ids)
    ]
    (root / "MSRVTT_data.json").write_text(
        json.dumps({"videos": [{"video_id": v} for v in ids], "sentences": sentences})
    )
    return {
        "train_csv": str(root / "MSRVTT_train.9k.csv"),
        "val_csv": str(root / "MSRVTT_JSFUSION_test.csv"),
        "data_path": str(root / "MSRVTT_data.json"),
        "features_path": str(videos),
    }


def clip_weights(name: str, root: Path) -> str:
    """A known model name as it is, or a random ViT-B/32 weight file (fp16, as OpenAI's) written once."""
    if name != "ViT-B/32":
        return name
    path = root / "random-ViT-B-32.pt"
    if not path.exists():
        torch.manual_seed(0)
        torch.save({k: v.half() for k, v in CLIP(**VIT_B_32).state_dict().items()}, path)
    return str(path)


def driver_args(opts: argparse.Namespace, paths: dict[str, str], frame_cache: str | None) -> argparse.Namespace:
    """The driver's own parsed flags for the recipe (loose meanP, 1 fps, uniform 12 frames, 32 words)."""
    argv = [
        "--do_train",
        "--output_dir",
        str(Path(opts.data_dir) / "run"),
        "--datatype",
        "msrvtt",
        "--pretrained_clip_name",
        opts.clip_file,
        "--sim_header",
        opts.sim_header,
        "--loose_type",
        "--batch_size",
        str(opts.batch),
        "--max_frames",
        str(opts.frames),
        "--max_words",
        "32",
        "--feature_framerate",
        "1",
        "--slice_framepos",
        "2",
        "--num_thread_reader",
        str(opts.workers),
        "--precision",
        opts.precision,
        "--lr",
        "1e-4",
        "--coef_lr",
        "1e-3",
        "--epochs",
        "5",
    ]
    for flag, value in paths.items():
        argv += [f"--{flag}", value]
    if frame_cache:
        argv += ["--frame_cache", frame_cache]
    args = driver.get_args(argv)
    args.n_gpu = 1
    return args


def train_loader(args: argparse.Namespace, tokenizer: SimpleTokenizer, uint8: bool = True):
    loader, _, sampler = DATALOADER_DICT["msrvtt"]["train"](args, tokenizer)
    sampler.set_epoch(0)
    return driver.frames_as_uint8(loader) if uint8 else loader


# ---- timing helpers -------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Phases:
    """Wall time per named phase, synchronising the device at each boundary when ``exact``."""

    def __init__(self, device: torch.device, exact: bool):
        self.device, self.exact = device, exact
        self.total: dict[str, float] = {name: 0.0 for name in PHASES}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.exact:
            sync(self.device)
        self.total[name] += time.perf_counter() - start


def loader_pass(loader, steps: int) -> dict[str, float]:
    """Clips/s and frames/s over ``steps`` batches, counting the workers' start-up (part of every epoch)."""
    clips = frames = 0
    start = time.perf_counter()
    for i, batch in enumerate(loader):
        if i == steps:
            break
        clips += batch[3].shape[0]
        frames += int(batch[4].sum())
    seconds = time.perf_counter() - start
    return {"clips_s": clips / seconds, "frames_s": frames / seconds}


# ---- the model step -------------------------------------------------------------------------------------------------


def mha_attention(attn: torch.nn.MultiheadAttention, x: torch.Tensor, mask: torch.Tensor | None = None):
    """The previous attention: nn.MultiheadAttention itself, per-sample masks copied once per head."""
    if mask is not None and mask.dim() == 4:
        mask = mask.expand(-1, attn.num_heads, -1, -1).reshape(-1, *mask.shape[-2:])
    return attn(x, x, x, need_weights=False, attn_mask=mask)[0]


def build(args: argparse.Namespace, device: torch.device, variant: str):
    """Model and optimizer as the driver builds them; ``variant`` is 'before', 'now' or 'compile'."""
    torch.manual_seed(0)
    model = driver.init_model(args, device)
    freeze_clip_layers(model, args.freeze_layer_num, args.linear_patch)
    optimizer = driver.prep_optimizer(
        args, model, RECIPE_PAIRS // args.batch_size * RECIPE_EPOCHS, coef_lr=args.coef_lr
    )
    if variant == "before":
        optimizer.__class__ = PerTensorBertAdam
    if variant == "compile":
        driver.compile_model(model)
    return model.train(), optimizer


@contextlib.contextmanager
def attention(variant: str) -> Iterator[None]:
    saved = module_clip.self_attention
    if variant == "before":
        module_clip.self_attention = mha_attention
    try:
        yield
    finally:
        module_clip.self_attention = saved


def train_step(model, optimizer, batch, args, device: torch.device, phases: Phases) -> None:
    """The driver's train_epoch step (gas 1), phase by phase."""
    with phases("host->device"):
        input_ids, input_mask, segment_ids, video, video_mask = (t.to(device, non_blocking=True) for t in batch)
        video = normalize_video(video, video_mask)
    with phases("forward"):
        with driver.autocast_for(args.precision, device):
            loss = model(input_ids, segment_ids, input_mask, video, video_mask)
    with phases("backward"):
        loss.backward()
    with phases("optimizer"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        torch.clamp_(model.clip.logit_scale.data, max=math.log(100))


def synthetic_batch(args: argparse.Namespace, device: torch.device) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    b, words, size = args.batch_size, args.max_words, args.image_resolution
    ids = torch.randint(1, 49000, (b, 1, words), generator=gen)
    ids[:, 0, words // 2 :] = 0
    mask = (ids != 0).long()
    video = torch.randint(0, 256, (b, 1, args.max_frames, 1, 3, size, size), generator=gen, dtype=torch.uint8)
    return [
        t.to(device)
        for t in (ids, mask, torch.zeros_like(ids), video, torch.ones(b, 1, args.max_frames, dtype=torch.long))
    ]


def model_alone(
    model, optimizer, args, device: torch.device, variant: str, warmup: int, steps: int
) -> dict[str, float]:
    """Seconds per phase of one step on a batch already on the device (the fastest of ``steps``), and clips/s."""
    batch = synthetic_batch(args, device)
    best: dict[str, float] = {}
    with attention(variant):
        for i in range(warmup + steps):
            phases = Phases(device, exact=True)
            train_step(model, optimizer, batch, args, device, phases)
            if i >= warmup and (not best or sum(phases.total.values()) < sum(best.values())):
                best = dict(phases.total)
    best["clips_s"] = args.batch_size / sum(best.values())
    return best


def whole_loop(
    model, optimizer, args, device: torch.device, loader, warmup: int, steps: int, exact: bool
) -> dict[str, float]:
    """Loader + model + optimizer over ``steps`` batches after ``warmup``: clips/s and seconds per phase."""
    phases = Phases(device, exact)
    batches = iter(loader)
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            phases = Phases(device, exact)
            start = time.perf_counter()
        with phases("data wait"):
            batch = next(batches)
        train_step(model, optimizer, batch, args, device, phases)
    sync(device)
    seconds = time.perf_counter() - start
    out = {name: t / steps for name, t in phases.total.items()}
    out["clips_s"] = steps * args.batch_size / seconds
    return out


# ---- report ---------------------------------------------------------------------------------------------------------


def report(opts, args, device, results: dict[str, dict[str, float]]) -> None:
    first, cached, float64 = results["loader first"], results["loader cached"], results["loader float64"]
    print(
        f"\nTraining throughput, {opts.clip} random weights, {opts.sim_header}, batch {args.batch_size} x "
        f"{args.max_frames} frames, device {device}, precision {args.precision}, {opts.workers} workers, "
        f"{torch.get_num_threads()} torch threads"
    )
    print(f"\n{'loader alone':34}{'clips/s':>10}{'frames/s':>11}{'ratio':>8}")
    print(f"{'  first pass (decode, fill cache)':34}{first['clips_s']:>10.1f}{first['frames_s']:>11.0f}{'':>8}")
    print(
        f"{'  frame cache, uint8 frames':34}{cached['clips_s']:>10.1f}{cached['frames_s']:>11.0f}"
        f"{cached['clips_s'] / first['clips_s']:>8.2f}"
    )
    print(
        f"{'  frame cache, float64 frames':34}{float64['clips_s']:>10.1f}{float64['frames_s']:>11.0f}"
        f"{float64['clips_s'] / first['clips_s']:>8.2f}   (uint8/float64: "
        f"{cached['clips_s'] / float64['clips_s']:.2f})"
    )

    variants = [v for v in ("before", "now", "compile") if f"model {v}" in results]
    print(
        f"\n{'model step alone (s)':22}"
        + "".join(f"{v:>11}" for v in variants)
        + (f"{'now/before':>12}" if "before" in variants else "")
    )
    for name in PHASES[1:5] + ("clips/s",):
        key = "clips_s" if name == "clips/s" else name
        vals = [results[f"model {v}"][key] for v in variants]
        line = f"{'  ' + name:22}" + "".join(f"{x:>11.3g}" for x in vals)
        if "before" in variants:
            line += f"{vals[variants.index('now')] / vals[0]:>12.2f}"
        print(line)

    whole = results["whole"]
    model_rate = results["model now"]["clips_s"]
    bound = min(cached["clips_s"], model_rate)
    print(
        f"\nwhole loop (frame cache, uint8): {whole['clips_s']:.3g} clips/s; loader {cached['clips_s']:.3g}, "
        f"model {model_rate:.3g}; whole/min(loader, model) = {whole['clips_s'] / bound:.2f}"
    )
    step = sum(whole[p] for p in PHASES)
    print(
        "one step: "
        + ", ".join(f"{p} {whole[p] * 1e3:.1f} ms ({100 * whole[p] / step:.0f}%)" for p in PHASES if p != "all-reduce")
        + ", all-reduce n/a (one process)"
    )
    hours = RECIPE_PAIRS * RECIPE_EPOCHS / whole["clips_s"] / 3600
    print(
        f"projected MSR-VTT recipe ({RECIPE_PAIRS:,} pairs x {RECIPE_EPOCHS} epochs, this batch size): "
        f"{hours:.3g} h at {whole['clips_s']:.3g} clips/s (goal {GOAL_MINUTES} min: "
        f"{RECIPE_PAIRS * RECIPE_EPOCHS / (GOAL_MINUTES * 60):.0f} clips/s)"
    )


def run(opts: argparse.Namespace) -> dict[str, dict[str, float]]:
    device = torch.device(opts.device)
    root = Path(opts.data_dir)
    n_videos = (opts.warmup + opts.steps) * opts.batch
    paths = make_msrvtt_layout(root, n_videos, opts.seconds)
    opts.clip_file = clip_weights(opts.clip, root)
    cache = root / "frame_cache"
    shutil.rmtree(cache, ignore_errors=True)
    args = driver_args(opts, paths, str(cache))
    args.precision = driver.resolve_precision(args.precision, device)
    args.image_resolution = clip_config_from_state_dict(CLIP.get_config(opts.clip_file))["image_resolution"]
    tokenizer = SimpleTokenizer()
    steps = opts.warmup + opts.steps

    results = {
        "loader first": loader_pass(train_loader(args, tokenizer), steps),
        "loader cached": loader_pass(train_loader(args, tokenizer), steps),
        "loader float64": loader_pass(train_loader(args, tokenizer, uint8=False), steps),
    }
    for variant in ("before", "now") + (() if opts.no_compile else ("compile",)):
        model, optimizer = build(args, device, variant)
        results[f"model {variant}"] = model_alone(model, optimizer, args, device, variant, opts.warmup, opts.steps)
        if variant == "now":
            now = model, optimizer
    # The whole loop continues training the "now" model: its rate does not depend on the weights.
    results["whole"] = whole_loop(
        *now, args, device, train_loader(args, tokenizer), opts.warmup, opts.steps, exact=device.type != "cuda"
    )
    if device.type == "cuda":  # the rate above ran without syncs; the breakdown needs them
        breakdown = whole_loop(*now, args, device, train_loader(args, tokenizer), opts.warmup, opts.steps, exact=True)
        results["whole"].update({p: breakdown[p] for p in PHASES})
    report(opts, args, device, results)
    return results


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu, or cuda for the recipe's sizes")
    p.add_argument("--clip", default="ViT-B/32", help="ViT-B/32 (random weights) or tiny-random-ViT/16")
    p.add_argument("--batch", type=int, default=None, help="clips per step (default 4 on CPU, 128 on CUDA)")
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 2 on CPU, 16 on CUDA)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 3 on CPU, 20 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1 on CPU, 5 on CUDA)")
    p.add_argument("--seconds", type=int, default=15, help="length of the generated videos (MSR-VTT: 10-30 s)")
    p.add_argument("--sim_header", default="meanP", choices=["meanP", "seqLSTM", "seqTransf", "tightTransf"])
    p.add_argument("--precision", default="auto", help="the driver's --precision")
    p.add_argument("--no_compile", action="store_true", help="skip the torch.compile column (slow to warm up)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--data_dir", default=None, help="where to write the data set (default: a temporary folder)")
    return p


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    opts = get_parser().parse_args(argv)
    cuda = opts.device.startswith("cuda")
    for name, cpu_value, cuda_value in (("batch", 4, 128), ("workers", 2, 16), ("steps", 3, 20), ("warmup", 1, 5)):
        if getattr(opts, name) is None:
            setattr(opts, name, cuda_value if cuda else cpu_value)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    with contextlib.ExitStack() as stack:
        if opts.data_dir is None:
            opts.data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_train_"))
        return run(opts)


if __name__ == "__main__":
    main()
