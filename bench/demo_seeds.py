"""The demo over several seeds: mean and spread of test R@1 and order-dependent R@1 per head.

One demo run is deterministic on a given machine but its figures move with the CPU (floating-point kernels differ
and training amplifies the difference), so one run is not a result. This runs demo.sh, with its settings, for each
seed and head (stage 1 and stage 2 take the same seed; stage 1 is shared by the heads of a seed), then prints the
per-seed figures and mean +- std. Runs that already finished are read, not repeated, so an interrupted sweep is
finished by running the same command again.

    nice -n 19 python bench/demo_seeds.py --out /work/demo_sweep        # 3 seeds x meanP, seqTransf
    EPOCHS=2 python bench/demo_seeds.py --out /tmp/sweep --seeds 1 2     # demo.sh's variables pass through
    python bench/demo_seeds.py --out /tmp/qb --heads meanP --qb_norm     # also test R@1 after QB-Norm
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_folder(out: Path, head: str, seed: int) -> Path:
    return out / f"run_{head}_seed{seed}"


def records(run: Path, epochs: int) -> tuple[dict, dict] | None:
    """The last epoch's test record and the order-dependent record of a finished run, or None."""
    test, order = run / f"metrics_epoch{epochs - 1}.json", run / "order" / "metrics_eval.json"
    if not (test.is_file() and order.is_file()):
        return None
    return json.loads(test.read_text()), json.loads(order.read_text())


def run_demo(out: Path, head: str, seed: int, extra: list[str]) -> None:
    """One demo.sh run; its output goes to a log file beside the run folder."""
    env = dict(os.environ, OUT=str(out), SIM_HEADER=head, PRETRAIN_SEED=str(seed), TRAIN_SEED=str(seed))
    env.setdefault("INSTALL", "0")
    env.setdefault("PYTHON", sys.executable)
    log = out / f"demo_{head}_seed{seed}.log"
    print(f"== {head}, seed {seed} (log: {log})", flush=True)
    with open(log, "w") as f:
        done = subprocess.run(
            ["bash", str(REPO / "demo.sh"), "--output_dir", str(run_folder(out, head, seed)), *extra],
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    if done.returncode != 0:
        sys.exit(f"demo_seeds.py: error: demo.sh failed for {head}, seed {seed} (exit {done.returncode}); see {log}")


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} +- {std:.1f}"


def print_tables(figures: dict[str, list[tuple[float, ...]]], qb_norm: bool) -> None:
    columns = "test R@1 | order-dependent R@1" + (" | test R@1, QB-Norm" if qb_norm else "")
    rule = "|---|---|---|---|" + ("---|" if qb_norm else "")
    print(f"\n| head | seed | {columns} |\n{rule}")
    for head, rows in figures.items():
        for seed, *r1 in rows:
            print(f"| {head} | {seed} | " + " | ".join(f"{v:.1f}" for v in r1) + " |")
    print(f"\n| head | seeds | {columns} |\n{rule}")
    for head, rows in figures.items():
        if rows:
            means = " | ".join(mean_std([r[i] for r in rows]) for i in range(1, len(rows[0])))
            print(f"| {head} | {len(rows)} | {means} |")
    print("(each: mean +- sample std over the seeds)")


def main(argv: list[str] | None = None) -> dict[str, list[tuple[float, ...]]]:
    """Runs what is missing (unless ``--dry_run``) and prints the tables; returns (seed, test R@1, order R@1) per
    head."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for data, checkpoints, logs (outside the repo)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--heads", nargs="+", default=["meanP", "seqTransf"])
    parser.add_argument("--qb_norm", action="store_true", help="evaluate with --qb_norm and add its R@1 column")
    parser.add_argument(
        "--dry_run", action="store_true", help="run nothing: name the missing runs, tabulate the finished ones"
    )
    args = parser.parse_args(argv)
    epochs = int(os.environ.get("EPOCHS", "10"))  # demo.sh's default
    args.out.mkdir(parents=True, exist_ok=True)

    figures: dict[str, list[tuple[float, ...]]] = {head: [] for head in args.heads}
    extra = ["--qb_norm"] if args.qb_norm else []
    for seed in args.seeds:  # seed-major, so an interrupted sweep has both heads for the seeds it finished
        for head in args.heads:
            run = run_folder(args.out, head, seed)
            if records(run, epochs) is None:
                if args.dry_run:
                    print(f"== {head}, seed {seed}: not run yet (--dry_run)")
                    continue
                run_demo(args.out, head, seed, extra)
            test, order = records(run, epochs)
            row = (seed, test["text_to_video"]["R1"], order["text_to_video"]["R1"])
            if args.qb_norm:
                row += (test["qb_norm"]["text_to_video"]["R1"],)
            figures[head].append(row)
    print_tables(figures, args.qb_norm)
    return figures


if __name__ == "__main__":
    main()
