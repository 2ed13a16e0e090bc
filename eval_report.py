#!/usr/bin/env python
"""The evaluation report: the metric table, recall and rank plots, the worst-ranked captions with what came back
instead, and the training curves so far, as one self-contained HTML file (images embedded, nothing fetched).

Written by ``main_task_retrieval.py --eval_report`` after each evaluation; also a small command line that turns a
run's ``metrics.jsonl`` into a PNG of its training curves:

    python eval_report.py plot --metrics RUN/metrics.jsonl --out curves.png

Needs matplotlib (``pip install -r requirements-report.txt``).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from dataloaders.rawvideo_util import thumbnail_strip
from util import UsageError, atomic_write_text

MAX_K = 50
TOP = 5  # videos shown for each caption of the gallery
WORST = 12  # captions in the gallery
METRIC_COLUMNS = (("R@1", "R1"), ("R@5", "R5"), ("R@10", "R10"), ("Median R", "MR"), ("Mean R", "MeanR"))


# ---------------------------------------------------------------------------------------------------------------------
# Numbers


def caption_ranks(sim: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """1-based rank of the right video for each caption (row): one plus the videos scored strictly higher.

    Ties count in the caption's favour; without ties this is the rank the text-to-video metrics use.
    """
    sim = np.asarray(sim, dtype=np.float64)
    right = sim[np.arange(len(truth)), truth]
    return 1 + (sim > right[:, None]).sum(axis=1)


def recall_curve(ranks: np.ndarray, max_k: int = MAX_K) -> np.ndarray:
    """Percent of captions whose right video is within the top k, for k = 1 .. max_k."""
    ks = np.arange(1, max_k + 1)
    return (ranks[None, :] <= ks[:, None]).mean(axis=1) * 100


def worst_captions(ranks: np.ndarray, n: int = WORST) -> list[int]:
    """The ``n`` captions whose right video ranks lowest, worst first (ties in caption order)."""
    return [int(i) for i in np.lexsort((np.arange(len(ranks)), -ranks))[:n]]


def top_videos(sim_row: np.ndarray, k: int = TOP) -> list[int]:
    """The ``k`` best-scored videos of one caption, best first (ties in video order)."""
    return [int(j) for j in np.lexsort((np.arange(len(sim_row)), -np.asarray(sim_row)))[:k]]


# ---------------------------------------------------------------------------------------------------------------------
# Pictures


def _png(fig: Figure) -> str:
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def plot_ranks(ranks: np.ndarray, max_k: int = MAX_K) -> str:
    """recall@k for k = 1..max_k beside the histogram of the right video's rank, as a PNG data URI."""
    fig = Figure(figsize=(10, 3.6))
    left, right = fig.subplots(1, 2)
    ks = np.arange(1, max_k + 1)
    left.plot(ks, recall_curve(ranks, max_k), marker=".", color="#2563eb")
    left.set(
        xlabel="k", ylabel="recall@k (% of captions)", title="Text-to-video recall@k", ylim=(0, 101), xlim=(1, max_k)
    )
    left.grid(alpha=0.3)
    bins = np.arange(1, max(ranks.max(), 2) + 2) - 0.5
    right.hist(ranks, bins=bins if len(bins) <= 101 else 100, color="#f97316")
    right.set(xlabel="rank of the right video (1 = best)", ylabel="captions", title="Rank histogram")
    right.grid(alpha=0.3)
    return _png(fig)


def read_jsonl(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl``; a torn record (a run killed mid-write) is left out.

    UsageError, naming the file and line, for anything else that is not one JSON object per line: a value of another
    type, text that is no record at all, bytes that are not UTF-8 (not a metrics file).
    """
    records = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise UsageError(f"{path}, line {number}: not UTF-8 text; expected a run's metrics.jsonl") from None
            try:
                record = json.loads(line) if line else {}
            except json.JSONDecodeError:
                if line.startswith("{"):  # the start of a record whose writer was killed
                    continue
                raise UsageError(f"{path}, line {number}: not JSON; expected one JSON object per line") from None
            if not isinstance(record, dict):
                raise UsageError(
                    f"{path}, line {number}: a JSON {type(record).__name__}; expected one JSON object per line"
                )
            if record:
                records.append(record)
    return records


def plot_curves(records: Sequence[dict]) -> Figure | None:
    """Training loss per logged step and text-to-video R@k per evaluation, against the optimizer step."""
    steps = [r for r in records if r.get("event") == "step"]
    # Evaluations after training epochs only: a later --do_eval into the same folder is not a point of the run.
    evals = [r for r in records if r.get("event") == "eval" and r.get("tag") != "eval"]
    if not steps and not evals:
        return None
    fig = Figure(figsize=(10, 3.6))
    loss_ax, recall_ax = fig.subplots(1, 2)
    if steps:
        loss_ax.plot([r["global_step"] for r in steps], [r["loss"] for r in steps], color="#2563eb")
    loss_ax.set(xlabel="optimizer step", ylabel="loss", title="Training loss")
    loss_ax.grid(alpha=0.3)
    for key, colour in (("R1", "#2563eb"), ("R5", "#16a34a"), ("R10", "#f97316")):
        recall_ax.plot(
            [r["global_step"] for r in evals],
            [r["text_to_video"][key] for r in evals],
            marker="o",
            color=colour,
            label=key.replace("R", "R@"),
        )
    recall_ax.set(xlabel="optimizer step", ylabel="%", title="Text-to-video recall per evaluation")
    recall_ax.grid(alpha=0.3)
    if evals:
        recall_ax.legend()
    return fig


# ---------------------------------------------------------------------------------------------------------------------
# The page


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #18181b; max-width: 1320px; }
table.metrics { border-collapse: collapse; margin: 8px 0 16px; }
table.metrics th, table.metrics td { border: 1px solid #d4d4d8; padding: 4px 10px; text-align: right; }
table.metrics th:first-child, table.metrics td:first-child { text-align: left; }
.caption { margin: 18px 0 6px; font-size: 15px; }
/* A caption's videos stay on one row: the tiles shrink together in a narrow window instead of wrapping. */
.row { display: flex; gap: 8px; }
.video { font-size: 12px; flex: 0 1 212px; min-width: 0; overflow-wrap: anywhere; padding: 3px;
         border: 3px solid transparent; border-radius: 6px; }
.video img { width: 100%; display: block; border-radius: 3px; }
/* A border, unlike an outline, takes its own space, so the green frame never lies over the label. */
.video.right { border-color: #16a34a; }
.muted { color: #71717a; }
"""


def _metric_table(metrics: dict[str, dict]) -> str:
    head = "".join(f"<th>{name}</th>" for name, _ in METRIC_COLUMNS)
    rows = "".join(
        f"<tr><td>{html.escape(direction)}</td>"
        + "".join(f"<td>{m[key]:.1f}</td>" for _, key in METRIC_COLUMNS)
        + "</tr>"
        for direction, m in metrics.items()
    )
    return f'<table class="metrics"><tr><th></th>{head}</tr>{rows}</table>'


def _video_tile(j: int, score: float, name: str, thumb: str | None, right: bool) -> str:
    picture = (
        f'<img src="{thumb}" alt="frames of {html.escape(name)}">' if thumb else '<div class="muted">(no frames)</div>'
    )
    return (
        f'<div class="video{" right" if right else ""}" data-video="{j}">{picture}<div>{html.escape(name)}'
        f'{" (right video)" if right else ""}</div><div class="muted">score {score:.2f}</div></div>'
    )


def _thumbnailer(frames: Callable[[int], np.ndarray]) -> Callable[[int], str | None]:
    """Video j's thumbnail strip as a data URL, made once per video; None when its frames cannot be read."""
    thumbs: dict[int, str | None] = {}

    def thumb(j: int) -> str | None:
        if j not in thumbs:
            try:
                f = frames(j)
                thumbs[j] = (
                    ("data:image/jpeg;base64," + base64.b64encode(thumbnail_strip(f, count=4, height=56)).decode())
                    if len(f)
                    else None
                )
            except (OSError, ValueError):
                thumbs[j] = None
        return thumbs[j]

    return thumb


def _header(title: str, details: dict[str, object] | None) -> str:
    head = (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
    )
    if details:
        head += (
            "<p class='muted'>"
            + " · ".join(f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in details.items())
            + "</p>"
        )
    return head


def _curves_section(curves: Path) -> str:
    try:
        fig = plot_curves(read_jsonl(curves))
    except UsageError as error:  # the report is still worth having without its curves
        return f"<p class='muted'>No training curves: {html.escape(str(error))}</p>"
    if fig is None:
        return ""
    return f"<h2>Training so far</h2><img id='curves' alt='training curves' src='{_png(fig)}'>"


def write_report(
    path: Path,
    sim: np.ndarray,
    truth: Sequence[int],
    captions: Sequence[str],
    video_names: Sequence[str],
    metrics: dict[str, dict],
    frames: Callable[[int], np.ndarray],
    title: str = "Evaluation report",
    details: dict[str, object] | None = None,
    curves: Path | None = None,
    worst: int = WORST,
    top: int = TOP,
) -> None:
    """Write the report of a [captions, videos] similarity matrix to ``path`` (atomically).

    ``truth[i]`` is caption i's right video, ``metrics`` the rows of the metric table (direction → the metric dict
    the log shows), ``frames(j)`` video j's uint8 frames [n, 3, H, W] as the model saw them (raising OSError or
    ValueError, or returning none, when they cannot be read), ``curves`` a run's ``metrics.jsonl``.
    """
    sim, truth = np.asarray(sim), np.asarray(truth, dtype=np.int64)
    ranks = caption_ranks(sim, truth)
    parts = [_header(title, details)]
    parts.append(
        f"<h2>Metrics</h2><p class='muted'>{sim.shape[0]} captions, {sim.shape[1]} videos</p>" + _metric_table(metrics)
    )
    parts.append(
        f"<h2>Text-to-video ranks</h2><img id='rank-plots' alt='recall@k and rank histogram' src='{plot_ranks(ranks)}'>"
    )
    if curves is not None and Path(curves).is_file() and (section := _curves_section(Path(curves))):
        parts.append(section)
    parts.append(
        f"<h2>The {min(worst, len(ranks))} worst-ranked captions</h2><p class='muted'>Each caption's right "
        f"video (green) and the top {top} it retrieved instead.</p>"
    )
    thumb = _thumbnailer(frames)
    for i in worst_captions(ranks, worst):
        t = int(truth[i])
        tiles = [_video_tile(t, float(sim[i, t]), video_names[t], thumb(t), right=True)]
        tiles += [
            _video_tile(j, float(sim[i, j]), video_names[j], thumb(j), right=False) for j in top_videos(sim[i], top)
        ]
        parts.append(
            f'<div class="entry" data-caption="{i}" data-rank="{ranks[i]}"><div class="caption">'
            f"<b>rank {ranks[i]}</b> · {html.escape(captions[i])}</div>"
            f'<div class="row">{"".join(tiles)}</div></div>'
        )
    parts.append("</body></html>")
    atomic_write_text("\n".join(parts), path)


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="training curves of a run as a PNG")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("plot", help="metrics.jsonl -> PNG of the loss and the recall per evaluation")
    p.add_argument("--metrics", required=True, help="a run's metrics.jsonl (in its --output_dir)")
    p.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    if not Path(args.metrics).is_file():
        print(f"eval_report.py plot: error: --metrics {args.metrics} not found", file=sys.stderr)
        return 2
    try:
        fig = plot_curves(read_jsonl(Path(args.metrics)))
    except UsageError as error:
        print(f"eval_report.py plot: error: {error}", file=sys.stderr)
        return 2
    if fig is None:
        print(f"eval_report.py plot: error: {args.metrics} holds no step or eval record", file=sys.stderr)
        return 2
    fig.savefig(args.out, dpi=100, bbox_inches="tight")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
