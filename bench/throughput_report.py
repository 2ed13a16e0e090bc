"""The printed report of bench_train_throughput.py: loader alone, model step alone, the whole loop, side by side."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only: the bench puts the repository on sys.path before it imports this file
    from engine.config import RunConfig
    from engine.context import RunContext

RECIPE_PAIRS, RECIPE_EPOCHS, GOAL_MINUTES = 180_000, 5, 30
PHASES = ("data wait", "host->device", "forward", "backward", "optimizer", "all-reduce")


def share(step: dict[str, float], phase: str) -> float:
    """``phase``'s part of the step's total time, in percent."""
    return 100 * step[phase] / sum(step[p] for p in PHASES)


def report_loader(results: dict[str, dict[str, float]]) -> None:
    first, cached, float64 = results["loader first"], results["loader cached"], results["loader float64"]
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


def report_model(results: dict[str, dict[str, float]]) -> None:
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
    print(
        "optimizer share of the step: "
        + ", ".join(f"{v} {share(results[f'model {v}'], 'optimizer'):.0f}%" for v in variants)
        + " (before: the original's per-tensor BertAdam; now: BertAdam as it runs today)"
    )


def report_whole(results: dict[str, dict[str, float]]) -> None:
    whole, cached = results["whole"], results["loader cached"]
    model_rate = results["model now"]["clips_s"]
    bound = min(cached["clips_s"], model_rate)
    print(
        f"\nwhole loop (frame cache, uint8): {whole['clips_s']:.3g} clips/s; loader {cached['clips_s']:.3g}, "
        f"model {model_rate:.3g}; whole/min(loader, model) = {whole['clips_s'] / bound:.2f}"
    )
    for key, label in (("whole per-tensor", "per-tensor BertAdam"), ("whole", "BertAdam now")):
        step = results[key]
        print(
            f"one step, {label}: "
            + ", ".join(f"{p} {step[p] * 1e3:.1f} ms ({share(step, p):.0f}%)" for p in PHASES if p != "all-reduce")
            + ", all-reduce n/a (one process)"
        )
    hours = RECIPE_PAIRS * RECIPE_EPOCHS / whole["clips_s"] / 3600
    print(
        f"projected MSR-VTT recipe ({RECIPE_PAIRS:,} pairs x {RECIPE_EPOCHS} epochs, this batch size): "
        f"{hours:.3g} h at {whole['clips_s']:.3g} clips/s (goal {GOAL_MINUTES} min: "
        f"{RECIPE_PAIRS * RECIPE_EPOCHS / (GOAL_MINUTES * 60):.0f} clips/s)"
    )


def report(
    opts: argparse.Namespace, config: RunConfig, context: RunContext, results: dict[str, dict[str, float]]
) -> None:
    print(
        f"\nTraining throughput, {opts.clip} random weights, {opts.sim_header}, batch {config.optim.batch_size} x "
        f"{config.train_sampling.max_frames} frames, device {context.device}, precision {context.precision}, "
        f"{opts.workers} workers, {torch.get_num_threads()} torch threads"
    )
    report_loader(results)
    report_model(results)
    report_whole(results)
