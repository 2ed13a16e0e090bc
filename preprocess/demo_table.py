"""Print demo.sh's closing table: text-to-video metrics of the last epoch on the test split and on the
order-dependent captions, from the driver's metrics JSON files.

    python preprocess/demo_table.py RUN/metrics_epoch9.json RUN/order/metrics_eval.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Said in the title when stage 2 did not fine-tune CLIP itself.
TUNING_NOTES = {"unipt": " with UniPT (CLIP frozen, adapters trained)"}


def table(test_path: Path, order_path: Path, tuning: str = "full") -> str:
    """The markdown table, headed by the run's head name (read from the test record) and, for UniPT, the tuning."""
    rows = [
        ("test (all captions)", json.loads(test_path.read_text())),
        ("test, order-dependent only", json.loads(order_path.read_text())),
    ]
    lines = [
        f"\n== CLIP4Clip {rows[0][1]['sim_header']}{TUNING_NOTES.get(tuning, '')}, text-to-video, last epoch of stage 2",
        f"| {'split':<27}| videos | chance R@1 | R@1   | R@5   | R@10  | MdR  | MnR  |",
        f"|{'-' * 28}|--------|------------|-------|-------|-------|------|------|",
    ]
    for name, record in rows:
        m, n = record["text_to_video"], record["num_videos"]
        lines.append(
            f"| {name:<27}| {n:>6} | {100 / n:>10.1f} | {m['R1']:>5.1f} | {m['R5']:>5.1f} "
            f"| {m['R10']:>5.1f} | {m['MR']:>4.1f} | {m['MeanR']:>4.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("test_json", type=Path, help="metrics_epoch<last>.json of the run")
    parser.add_argument("order_json", type=Path, help="metrics_eval.json of the order-dependent evaluation")
    parser.add_argument("--tuning", default="full", help="stage 2's --tuning (full or unipt)")
    args = parser.parse_args()
    print(table(args.test_json, args.order_json, args.tuning))


if __name__ == "__main__":
    main()
