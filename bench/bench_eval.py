"""Similarity stage of MSVD-test-sized evaluation: ours vs the original's approach, per loose head.

670 videos × 12 frames and 27,763 captions of random 512-d features (what the CLIP towers would hand over).
- ours: ``main_task_retrieval.similarity_columns``: all texts × blocks of videos, so the temporal head runs once
  per video;
- original: one process, batches of 16 texts × batches of 16 videos (the scripts' --batch_size_val),
  ``get_similarity_logits`` per pair of batches, so the head is re-applied for every text batch; the rows are
  numpy-concatenated into the whole matrix.
The original is timed on the first --orig_text_batches text batches and scaled linearly to all 1,736 (every text
batch does the same work); its peak memory is the larger of that run's and the finished matrix's.
Each measurement runs in a fresh process; memory is the peak RSS growth (CPU) or peak allocation (CUDA) over
what the features take. Heads have random weights from modules/modeling (tiny random CLIP, nothing to download).

    python bench/bench_eval.py            # a few minutes on 2 CPU cores
    python bench/bench_eval.py --toy --heads meanP --orig_text_batches 2   # 20 videos x 50 captions, seconds
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
N_VIDEOS, N_TEXTS, FRAMES, DIM, BATCH = 670, 27763, 12, 512, 16
TOY_VIDEOS, TOY_TEXTS = 20, 50


def _setup(header: str, device: str, n_videos: int, n_texts: int):
    sys.path.insert(0, str(ROOT))
    import torch

    from modules.modeling import CLIP4Clip, CLIP4ClipConfig

    torch.set_num_threads(1)
    config = CLIP4ClipConfig(
        pretrained_clip_name="tiny-random-ViT/16",
        sim_header=header,
        cross_num_hidden_layers=4,
        max_words=32,
        max_frames=FRAMES,
        precision="fp32",
    )
    torch.manual_seed(0)
    model = CLIP4Clip.from_config(config).to(device).eval()
    gen = torch.Generator().manual_seed(1)
    seq = torch.randn(n_texts, 1, DIM, generator=gen)
    text_mask = torch.ones(n_texts, 32, dtype=torch.long)
    vis = torch.randn(n_videos, FRAMES, DIM, generator=gen)
    lengths = torch.randint(1, FRAMES + 1, (n_videos, 1), generator=gen)
    video_mask = (torch.arange(FRAMES) < lengths).long()
    return torch, model, seq, text_mask, vis, video_mask


def _peak_bytes(torch, device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(header: str, method: str, device: str, orig_text_batches: int, sizes: tuple[int, int], queue) -> None:
    n_videos, n_texts = sizes
    torch, model, seq, text_mask, vis, video_mask = _setup(header, device, n_videos, n_texts)
    import numpy as np

    from engine import evaluate as mtr

    dev = torch.device(device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = _peak_bytes(torch, device)
    with torch.no_grad():
        start = time.perf_counter()
        if method == "ours":
            sim = mtr.similarity_columns(model, seq, text_mask, vis, video_mask, dev).numpy()
            rows = sim[: orig_text_batches * BATCH]
            scale = 1.0
        else:
            # The original's cache: per-batch features already on the device.
            seqs = [seq[i : i + BATCH].to(dev) for i in range(0, n_texts, BATCH)]
            tmasks = [text_mask[i : i + BATCH].to(dev) for i in range(0, n_texts, BATCH)]
            viss = [vis[i : i + BATCH].to(dev) for i in range(0, n_videos, BATCH)]
            vmasks = [video_mask[i : i + BATCH].to(dev) for i in range(0, n_videos, BATCH)]
            start = time.perf_counter()
            sim_rows = []
            for s, m in zip(seqs[:orig_text_batches], tmasks[:orig_text_batches]):
                row = [
                    model.get_similarity_logits(s, v, m, vm, loose_type=True)[0].cpu().numpy()
                    for v, vm in zip(viss, vmasks)
                ]
                sim_rows.append(np.concatenate(row, axis=-1))
            rows = np.concatenate(sim_rows, axis=0)
            scale = len(seqs) / orig_text_batches
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) * scale
    peak = _peak_bytes(torch, device) - base
    if method != "ours":  # the finished [texts, videos] float32 matrix, held twice while concatenating
        peak = max(peak, 2 * n_texts * n_videos * 4)
    queue.put((seconds, peak, rows))


def measure(header: str, method: str, device: str, orig_text_batches: int, sizes: tuple[int, int]):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(header, method, device, orig_text_batches, sizes, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """The table; returns per head ours and the original's seconds and peak bytes, and their largest difference."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", default="meanP,seqLSTM,seqTransf")
    parser.add_argument(
        "--orig_text_batches",
        type=int,
        default=20,
        help="text batches of 16 the original is timed on (scaled to all 1,736)",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--toy", action="store_true", help=f"{TOY_TEXTS} captions x {TOY_VIDEOS} videos (seconds)")
    args = parser.parse_args(argv)
    sizes = (TOY_VIDEOS, TOY_TEXTS) if args.toy else (N_VIDEOS, N_TEXTS)
    results = {}
    print(f"{sizes[1]} captions x {sizes[0]} videos, {FRAMES} frames, {DIM}-d, device {args.device}, 1 thread")
    print(
        f"{'head':<10} {'ours s':>8} {'orig s':>9} {'speed-up':>9} {'ours MiB':>9} {'orig MiB':>9} "
        f"{'mem ratio':>9} {'max |diff|':>11}"
    )
    for header in args.heads.split(","):
        ours_s, ours_mem, ours_rows = measure(header, "ours", args.device, args.orig_text_batches, sizes)
        orig_s, orig_mem, orig_rows = measure(header, "original", args.device, args.orig_text_batches, sizes)
        diff = float(abs(ours_rows - orig_rows).max())
        results[header] = dict(ours_s=ours_s, orig_s=orig_s, ours_bytes=ours_mem, orig_bytes=orig_mem, diff=diff)
        print(
            f"{header:<10} {ours_s:8.2f} {orig_s:9.1f} {orig_s / ours_s:8.1f}x {ours_mem / 2**20:9.0f} "
            f"{orig_mem / 2**20:9.0f} {orig_mem / max(ours_mem, 1):8.2f}x {diff:11.2e}"
        )
    return results


if __name__ == "__main__":
    main()
