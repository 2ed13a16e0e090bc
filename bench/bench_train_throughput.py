"""Training throughput end to end: clips per second from video file to optimizer step, and what bounds it.

Generates an MSR-VTT-layout data set of real h264 videos (320x240, 30 fps, like MSR-VTT's), then runs the engine's
own pieces (the typed run config, ``DATALOADER_DICT``'s data set and DataLoader, ``init_model``, ``prep_optimizer``,
``autocast_for``, ``normalize_video``) and prints side by side:

* loader alone: clips/s and frames/s with N workers, first pass (decoding, filling the frame cache), cached pass,
  and the cached pass with the original's float64 frames instead of uint8;
* model step alone (synthetic batch already on the device): before (nn.MultiheadAttention, per-tensor BertAdam),
  now (scaled_dot_product_attention, BertAdam by cache-sized slices), and now with ``--compile``, per phase, with
  the optimizer's share of the step;
* the whole loop (loader + model + optimizer, cached pass), its ratio to min(loader, model), the breakdown of a step
  (data wait, host->device, forward, backward, optimizer, all-reduce) with the original's per-tensor BertAdam and
  with today's, and the projected time of the paper's recipe (MSR-VTT 9k expanded: 180,000 pairs x 5 epochs).

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
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "bench"):
    sys.path.insert(0, str(path))
from bench_optimizer import PerTensorBertAdam  # noqa: E402  (the original's per-tensor step)
from bench_video_loading import make_video  # noqa: E402
from throughput_report import PHASES, RECIPE_EPOCHS, RECIPE_PAIRS, report  # noqa: E402

import util  # noqa: E402
from dataloaders.data_dataloaders import DATALOADER_DICT, DataConfig  # noqa: E402
from dataloaders.dataloader_msrvtt_retrieval import MSRVTT_TrainDataLoader  # noqa: E402
from dataloaders.rawvideo_util import normalize_video  # noqa: E402
from dataloaders.sampling import VideoSampling  # noqa: E402
from engine.config import OptimConfig, RunConfig, RunOptions, clip_image_resolution  # noqa: E402
from engine.context import RunContext, autocast_for  # noqa: E402
from engine.model import compile_model, init_model, prep_optimizer  # noqa: E402
from modules import module_clip  # noqa: E402
from modules.clip_names import NAMED_ARCHITECTURES  # noqa: E402
from modules.modeling import CLIP4ClipConfig, resolve_precision  # noqa: E402
from modules.module_clip import CLIP  # noqa: E402
from modules.optimization import BertAdam  # noqa: E402
from modules.tokenization_clip import SimpleTokenizer  # noqa: E402

VIT_B_32 = NAMED_ARCHITECTURES["ViT-B/32"]
CAPTIONS_PER_VIDEO = 20
MAX_WORDS = 32


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


def run_config(opts: argparse.Namespace, paths: dict[str, str], frame_cache: str | None) -> RunConfig:
    """The recipe as a run config (loose meanP, 1 fps, uniform 12 frames, 32 words), built from its typed parts."""
    model = CLIP4ClipConfig(
        pretrained_clip_name=opts.clip_file,
        sim_header=opts.sim_header,
        max_words=MAX_WORDS,
        max_frames=opts.frames,
        precision=opts.precision,
    )
    sampling = VideoSampling(
        max_frames=opts.frames,
        feature_framerate=1,
        slice_framepos=2,
        image_resolution=clip_image_resolution(opts.clip_file),
    )
    data = DataConfig(
        datatype="msrvtt",
        **paths,
        num_workers=opts.workers,
        max_words=MAX_WORDS,
        expand_msrvtt_sentences=False,
        frame_cache=frame_cache,
        skip_missing=False,
    )
    optim = OptimConfig(
        epochs=RECIPE_EPOCHS,
        batch_size=opts.batch,
        batch_size_val=opts.batch,
        lr=1e-4,
        coef_lr=1e-3,
        warmup_proportion=0.1,
        gradient_accumulation_steps=1,
        n_display=100,
    )
    run = RunOptions(
        do_train=True,
        seed=0,
        output_dir=str(Path(opts.data_dir) / "run"),
        init_model=None,
        resume_model=None,
        cross_model="cross-base",
        tuning="full",
        compile=False,
        local_rank=0,
        eval_dsl=False,
        dsl_temperature=1.0,
        eval_report=False,
        tensorboard=False,
    )
    return RunConfig(model, sampling, sampling, data, optim, run, flags=())


def lone_process(precision: str, device: torch.device) -> RunContext:
    """The context of one process on ``device``, no process group, the asked precision resolved for it."""
    dist = util.DistInfo(rank=0, local_rank=0, world_size=1, device=device, initialized=False)
    return RunContext(dist, resolve_precision(precision, device))


def train_loader(config: RunConfig, tokenizer: SimpleTokenizer) -> DataLoader:
    """The run's training loader (uint8 frames, as the engine trains)."""
    loader, _, sampler = DATALOADER_DICT["msrvtt"]["train"](
        config.data, config.train_sampling, tokenizer, config.optim.batch_size
    )
    sampler.set_epoch(0)
    return loader


def float64_loader(config: RunConfig, tokenizer: SimpleTokenizer) -> DataLoader:
    """The same samples in the same order as the original's float64 frames (``uint8_frames=False``)."""
    data, sampling = config.data, config.train_sampling
    dataset = MSRVTT_TrainDataLoader(
        csv_path=data.train_csv,
        json_path=data.data_path,
        features_path=data.features_path,
        tokenizer=tokenizer,
        max_words=data.max_words,
        feature_framerate=sampling.feature_framerate,
        max_frames=sampling.max_frames,
        image_resolution=sampling.image_resolution,
        slice_framepos=sampling.slice_framepos,
        frame_cache=data.frame_cache,
        uint8_frames=False,
    )
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=1, rank=0)
    sampler.set_epoch(0)
    return DataLoader(
        dataset, batch_size=config.optim.batch_size, num_workers=data.num_workers, sampler=sampler, drop_last=True
    )


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


def build(config: RunConfig, context: RunContext, variant: str):
    """Model and optimizer as the engine builds them; ``variant`` is 'before', 'now' or 'compile'."""
    torch.manual_seed(0)
    model = init_model(config, context)
    optim = config.optim
    total_steps = RECIPE_PAIRS // optim.batch_size * RECIPE_EPOCHS
    optimizer = prep_optimizer(model, optim.lr, optim.coef_lr, optim.warmup_proportion, total_steps)
    if variant == "before":
        optimizer.__class__ = PerTensorBertAdam
    if variant == "compile":
        compile_model(model)
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


def train_step(model, optimizer, batch, context: RunContext, phases: Phases) -> None:
    """The engine's train_epoch step (gas 1), phase by phase."""
    device = context.device
    with phases("host->device"):
        input_ids, input_mask, segment_ids, video, video_mask = (t.to(device, non_blocking=True) for t in batch)
        video = normalize_video(video, video_mask)
    with phases("forward"):
        with autocast_for(context.precision, device):
            loss = model(input_ids, segment_ids, input_mask, video, video_mask)
    with phases("backward"):
        loss.backward()
    with phases("optimizer"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        torch.clamp_(model.clip.logit_scale.data, max=math.log(100))


def synthetic_batch(config: RunConfig, device: torch.device) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    b, words = config.optim.batch_size, config.data.max_words
    frames, size = config.train_sampling.max_frames, config.train_sampling.image_resolution
    ids = torch.randint(1, 49000, (b, 1, words), generator=gen)
    ids[:, 0, words // 2 :] = 0
    mask = (ids != 0).long()
    video = torch.randint(0, 256, (b, 1, frames, 1, 3, size, size), generator=gen, dtype=torch.uint8)
    return [t.to(device) for t in (ids, mask, torch.zeros_like(ids), video, torch.ones(b, 1, frames, dtype=torch.long))]


def model_alone(model, optimizer, config: RunConfig, context: RunContext, variant: str, warmup: int, steps: int):
    """Seconds per phase of the median step of ``steps`` (by total time) on a batch already on the device, and
    clips/s."""
    batch = synthetic_batch(config, context.device)
    timed: list[dict[str, float]] = []
    with attention(variant):
        for i in range(warmup + steps):
            phases = Phases(context.device, exact=True)
            train_step(model, optimizer, batch, context, phases)
            if i >= warmup:
                timed.append(dict(phases.total))
    median = sorted(timed, key=lambda t: sum(t.values()))[(len(timed) - 1) // 2]
    median["clips_s"] = config.optim.batch_size / sum(median.values())
    return median


def whole_loop(model, optimizer, config: RunConfig, context: RunContext, loader, warmup: int, steps: int, exact: bool):
    """Loader + model + optimizer over ``steps`` batches after ``warmup``: clips/s and seconds per phase."""
    device = context.device
    phases = Phases(device, exact)
    batches = iter(loader)
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            phases = Phases(device, exact)
            start = time.perf_counter()
        with phases("data wait"):
            batch = next(batches)
        train_step(model, optimizer, batch, context, phases)
    sync(device)
    seconds = time.perf_counter() - start
    out = {name: t / steps for name, t in phases.total.items()}
    out["clips_s"] = steps * config.optim.batch_size / seconds
    return out


def measure_loader(config: RunConfig, tokenizer: SimpleTokenizer, steps: int) -> dict[str, dict[str, float]]:
    return {
        "loader first": loader_pass(train_loader(config, tokenizer), steps),
        "loader cached": loader_pass(train_loader(config, tokenizer), steps),
        "loader float64": loader_pass(float64_loader(config, tokenizer), steps),
    }


def measure_whole(now, config: RunConfig, context: RunContext, tokenizer, opts) -> dict[str, dict[str, float]]:
    """The whole loop continues training the "now" model (its rate does not depend on the weights), with today's
    optimizer, then with the original's per-tensor step on the same state."""
    cuda = context.device.type == "cuda"
    loop = dict(config=config, context=context, warmup=opts.warmup, steps=opts.steps)
    results = {"whole": whole_loop(*now, loader=train_loader(config, tokenizer), exact=not cuda, **loop)}
    if cuda:  # the rate above ran without syncs; the breakdown needs them
        breakdown = whole_loop(*now, loader=train_loader(config, tokenizer), exact=True, **loop)
        results["whole"].update({p: breakdown[p] for p in PHASES})
    model, optimizer = now
    optimizer.__class__ = PerTensorBertAdam
    try:
        results["whole per-tensor"] = whole_loop(
            model, optimizer, loader=train_loader(config, tokenizer), exact=True, **loop
        )
    finally:
        optimizer.__class__ = BertAdam
    return results


def run(opts: argparse.Namespace) -> dict[str, dict[str, float]]:
    device = torch.device(opts.device)
    root = Path(opts.data_dir)
    n_videos = (opts.warmup + opts.steps) * opts.batch
    paths = make_msrvtt_layout(root, n_videos, opts.seconds)
    opts.clip_file = clip_weights(opts.clip, root)
    cache = root / "frame_cache"
    shutil.rmtree(cache, ignore_errors=True)
    config = run_config(opts, paths, str(cache))
    context = lone_process(opts.precision, device)
    tokenizer = SimpleTokenizer()

    results = measure_loader(config, tokenizer, opts.warmup + opts.steps)
    for variant in ("before", "now") + (() if opts.no_compile else ("compile",)):
        model, optimizer = build(config, context, variant)
        results[f"model {variant}"] = model_alone(model, optimizer, config, context, variant, opts.warmup, opts.steps)
        if variant == "now":
            now = model, optimizer
    results.update(measure_whole(now, config, context, tokenizer, opts))
    report(opts, config, context, results)
    return results


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu, or cuda for the recipe's sizes")
    p.add_argument("--clip", default="ViT-B/32", help="ViT-B/32 (random weights) or tiny-random-ViT/16")
    p.add_argument("--batch", type=int, default=None, help="clips per step (default 4 on CPU, 128 on CUDA)")
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 2 on CPU, 16 on CUDA)")
    p.add_argument(
        "--steps", type=int, default=None, help="timed steps, the median reported (default 3 on CPU, 20 on CUDA)"
    )
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1 on CPU, 5 on CUDA)")
    p.add_argument("--seconds", type=int, default=15, help="length of the generated videos (MSR-VTT: 10-30 s)")
    p.add_argument("--sim_header", default="meanP", choices=["meanP", "seqLSTM", "seqTransf", "tightTransf"])
    p.add_argument("--precision", default="auto", help="as the driver's --precision")
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
