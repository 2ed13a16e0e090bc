"""Everything that needs a GPU, in one command that prints one table.

Each step is a separate program run through its command line, with a timeout of its own; a step that fails or
runs out of time is marked in the table and the next one starts. The table is rewritten after every step into
``<out>/table.txt`` (so a run cut short still leaves what it measured) and each step's whole output lands in
``<out>/logs/<step>.log``. Checkpoints and data go to a temporary folder, never under ``<out>``.

    python bench/gpu_check.py --out bench/out/gpu_check               # CUDA: at most 8 minutes (--budget 470 s)
    python bench/gpu_check.py --device cpu --out /tmp/gpu_check_cpu   # the same steps at toy sizes on CPU

The exit status is 0 when every step that ran passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
FAILURES = ("failed", "timeout", "missing", "not run")
GOALS_MIN = (30, 10)  # the training-time goals the recipe's projection is held against


@dataclass(frozen=True)
class Sizes:
    """What differs between the CUDA run and the CPU toy run: flags and timeouts; the steps are the same."""

    device: str
    env: dict[str, str]
    dataset: tuple[str, ...]
    train: tuple[str, ...]
    tests: tuple[str, ...] | None  # None: skipped, for the reason in skip_reasons
    throughput: tuple[str, ...]
    unipt: tuple[str, ...] | None
    eval: tuple[str, ...] | None
    optimizer: tuple[str, ...]
    timeout_s: dict[str, float]
    skip_reasons: dict[str, str] = field(default_factory=dict)


CUDA = Sizes(
    device="cuda",
    env={"CLIP4CLIP_TEST_KEEP_GPU": "1"},
    dataset=("--num_train", "48", "--num_test", "16"),
    train=(
        *("--max_words", "20", "--max_frames", "4", "--batch_size", "16", "--batch_size_val", "16"),
        *("--num_thread_reader", "2"),
    ),
    tests=("-m", "cuda", "tests"),
    throughput=("--device", "cuda", "--steps", "8", "--warmup", "3"),
    unipt=("--device", "cuda", "--batch", "32", "--frames", "12"),
    eval=("--device", "cuda", "--orig_text_batches", "4"),
    optimizer=("--device", "cuda"),
    timeout_s={"device": 60, "dataset": 30, "train": 60, "tests": 120, "throughput": 200, "unipt": 90, "eval": 90},
)

CPU = Sizes(
    device="cpu",
    env={"CUDA_VISIBLE_DEVICES": ""},  # a CPU run on a GPU machine stays on the CPU
    dataset=("--num_train", "4", "--num_test", "4", "--size", "32", "--fps", "2", "--seconds", "2"),
    train=(
        *("--max_words", "8", "--max_frames", "2", "--batch_size", "4", "--batch_size_val", "4"),
        *("--num_thread_reader", "0"),  # no worker process to start for 4 videos
    ),
    tests=None,
    throughput=(
        *("--device", "cpu", "--clip", "tiny-random-ViT/16", "--batch", "2", "--frames", "2", "--workers", "0"),
        *("--steps", "1", "--warmup", "0", "--seconds", "1", "--no_compile"),
    ),
    unipt=None,
    eval=None,
    optimizer=("--device", "cpu", "--toy", "--rounds", "1"),
    timeout_s={"device": 120, "dataset": 60, "train": 240, "throughput": 240, "optimizer": 120},
    skip_reasons={
        "tests": "CPU mode: the suite itself runs the cuda-marked tests on the CPU",
        "unipt": "CPU mode: no toy size (ViT-B/32 shapes are fixed; minutes on CPU)",
        "eval": "CPU mode: no toy size (27,763 x 670 is fixed)",
    },
)


# ---- checks: a step's output (and files) -> (passed, one-line summary) ----------------------------------------------


def last_line(text: str) -> str:
    """The last non-empty line (with progress bars' carriage returns resolved), for a failure's reason."""
    lines = [line.rsplit("\r", 1)[-1].strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    return lines[-1][:160] if lines else "(no output)"


def check_device(device: str, text: str) -> tuple[bool, str]:
    """CUDA mode needs CUDA; the summary names the card and the versions."""
    return device != "cuda" or "cuda_available=True" in text, last_line(text)


def check_dataset(flags: tuple[str, ...], text: str) -> tuple[bool, str]:
    return "msrvtt_features_path" in text, "msrvtt " + " ".join(flags)


def check_tests(text: str) -> tuple[bool, str]:
    """pytest's closing line; a run that selected nothing is a failure (the cuda marker lost its tests)."""
    summary = last_line(text).strip("= ")
    return bool(re.search(r"\d+ passed", summary)), summary


def check_train(run_dir: Path, text: str) -> tuple[bool, str]:
    """Every logged loss finite and the epoch's retrieval metrics written."""
    records_file, metrics_file = run_dir / "metrics.jsonl", run_dir / "metrics_epoch0.json"
    if not records_file.is_file() or not metrics_file.is_file():
        return False, f"no {records_file.name} or {metrics_file.name} in {run_dir}"
    records = [json.loads(line) for line in records_file.read_text().splitlines() if line.strip()]
    steps = [r["loss"] for r in records if r["event"] == "step"]
    losses = steps + [r["train_loss"] for r in records if r["event"] == "epoch"]
    if not steps:
        return False, "no step loss logged"
    if not all(math.isfinite(x) for x in losses):
        return False, f"non-finite loss: {losses}"
    metrics = json.loads(metrics_file.read_text())
    t2v, v2t = metrics["text_to_video"]["R1"], metrics["video_to_text"]["R1"]
    summary = f"{len(steps)} steps, loss {steps[0]:.3f} -> {steps[-1]:.3f} (finite); R@1 t2v {t2v:.1f} v2t {v2t:.1f}"
    memory = re.findall(r"Memory utilization: ([0-9.]+) GB", text)
    return True, summary + (f"; peak {memory[-1]} GB" if memory else "")


def check_throughput(text: str) -> tuple[bool, str]:
    """Whole-loop rate, the model-step rates, and the recipe's projected time against each goal."""
    whole = re.search(r"whole loop .*?: ([0-9.e+]+) clips/s; loader ([0-9.e+]+)", text)
    recipe = re.search(r"projected MSR-VTT recipe \(([0-9,]+) pairs x (\d+) epochs", text)
    if not whole or not recipe:
        return False, "no whole-loop or projection line: " + last_line(text)
    rate, loader = float(whole[1]), float(whole[2])
    clips = int(recipe[1].replace(",", "")) * int(recipe[2])
    parts = [f"whole {rate:.4g} clips/s (loader {loader:.4g})"]
    model = re.search(r"^\s+clips/s((?:\s+[0-9.e+-]+)+)", text, re.M)
    header = re.search(r"^model step alone \(s\)\s+(.*)$", text, re.M)
    if model and header:
        names, rates = header[1].split(), model[1].split()
        parts.append("model " + ", ".join(f"{n} {r}" for n, r in zip(names, rates)))
    minutes = clips / rate / 60
    goals = ", ".join(
        f"{g}-min goal {clips / (g * 60):.0f} clips/s ({clips / (g * 60) / rate:.2g}x this)" for g in GOALS_MIN
    )
    parts.append(f"recipe {minutes:.0f} min; {goals}")
    return True, "; ".join(parts)


def check_unipt(text: str) -> tuple[bool, str]:
    """UniPT/full step time and total peak memory, beside the paper's 13.6 vs 48.8 GB (0.28x)."""
    rows = {}
    for name in ("step time (s)", "peak memory, total (MiB)", "step memory above rest (MiB)"):
        m = re.search(re.escape(name) + r"\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)", text)
        if not m:
            return False, f"no '{name}' row: " + last_line(text)
        rows[name] = m.groups()
    time_full, time_unipt, time_ratio = rows["step time (s)"]
    peak_full, peak_unipt, peak_ratio = rows["peak memory, total (MiB)"]
    step_ratio = rows["step memory above rest (MiB)"][2]
    return True, (
        f"step {time_full} -> {time_unipt} s ({time_ratio}x); peak {float(peak_full) / 1024:.1f} -> "
        f"{float(peak_unipt) / 1024:.1f} GiB ({peak_ratio}x; paper 48.8 -> 13.6 GB, 0.28x); step memory {step_ratio}x"
    )


def check_eval(text: str) -> tuple[bool, str]:
    """Per head: ours in seconds and the speed-up over the original's loop."""
    rows = re.findall(r"^(\w+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)x", text, re.M)
    if not rows:
        return False, "no result rows: " + last_line(text)
    return True, "; ".join(f"{head} {ours} s ({speedup}x)" for head, ours, _, speedup in rows)


def check_optimizer(text: str) -> tuple[bool, str]:
    """The first optimizer row (ours) in full, as the bench prints it."""
    header = re.search(r"^\s+ms\s+(.*)$", text, re.M)
    row = re.search(r"^(BertAdam \(now\))\s+(.*)$", text, re.M)
    if not header or not row:
        return True, last_line(text)  # the bench is new: its format may move, its log has it all
    return True, f"{row[1]}: " + ", ".join(f"{n} {v}" for n, v in zip(["ms", *header[1].split()], row[2].split()))


# ---- the steps --------------------------------------------------------------------------------------------------------

DEVICE_PROBE = (
    "import torch; ok = torch.cuda.is_available(); "
    "print('cuda_available=%s' % ok); "
    "print('%s, torch %s, CUDA %s' % (torch.cuda.get_device_name(0) if ok else 'cpu', torch.__version__, "
    "torch.version.cuda))"
)


@dataclass(frozen=True)
class Step:
    """One program to run and how to judge its output."""

    name: str
    argv: tuple[str, ...]
    timeout_s: float
    check: Callable[[str], tuple[bool, str]]
    script: str = ""  # relative to the checkout; absent -> 'missing'
    needs: Path | None = None  # written by an earlier step; absent -> 'not-run'
    skip: str = ""  # why this mode leaves the step out


@dataclass(frozen=True)
class Result:
    name: str
    status: str  # ok, failed, timeout, missing, not-run, skipped
    seconds: float
    summary: str


def train_steps(sizes: Sizes, work: Path) -> list[Step]:
    """The demo's synthetic data, 1 epoch, tiny CLIP: full then UniPT (from full/auto's checkpoint), two precisions."""
    msrvtt = work / "data" / "msrvtt"
    common = (
        *("main_task_retrieval.py", "--do_train", "--datatype", "msrvtt", "--features_path", str(msrvtt / "videos")),
        *("--train_csv", str(msrvtt / "MSRVTT_train.9k.csv"), "--val_csv", str(msrvtt / "MSRVTT_JSFUSION_test.csv")),
        *("--data_path", str(msrvtt / "MSRVTT_data.json"), "--pretrained_clip_name", "tiny-random-ViT/16"),
        *("--feature_framerate", "1", "--slice_framepos", "2", "--loose_type", "--sim_header", "meanP"),
        *("--epochs", "1", "--lr", "1e-3", "--seed", "0", "--n_display", "1", *sizes.train),
    )
    start = work / "train_full_auto" / "pytorch_model.bin.0"
    steps = []
    for tuning in ("full", "unipt"):
        for precision in ("auto", "bf16"):
            run = work / f"train_{tuning}_{precision}"
            init = ("--init_model", str(start)) if tuning == "unipt" else ()
            argv = (PY, *common, "--tuning", tuning, "--precision", precision, "--output_dir", str(run), *init)
            steps.append(
                Step(
                    f"train {tuning}/{precision}",
                    argv,
                    sizes.timeout_s["train"],
                    partial(check_train, run),
                    script="main_task_retrieval.py",
                    needs=start if init else None,
                )
            )
    return steps


def bench_step(sizes: Sizes, key: str, script: str, flags: tuple[str, ...] | None, check) -> Step:
    """``python bench/<script> <flags>``; ``flags`` None: skipped in this mode."""
    argv = (PY, f"bench/{script}", *flags) if flags is not None else ()
    skip = sizes.skip_reasons.get(key, "") if flags is None else ""
    return Step(script, argv, sizes.timeout_s.get(key, 60), check, script=f"bench/{script}", skip=skip)


def plan(sizes: Sizes, work: Path) -> list[Step]:
    """Every step in order: correctness first, then the benches, the one already measured on an H100 last (the
    budget cuts from the end)."""
    data = ("preprocess/make_synthetic_dataset.py", "--output_dir", str(work / "data"), "--datasets", "msrvtt")
    tests_argv = (PY, "-m", "pytest", "-q", *sizes.tests) if sizes.tests is not None else ()
    return [
        Step("device", (PY, "-c", DEVICE_PROBE), sizes.timeout_s["device"], partial(check_device, sizes.device)),
        Step(
            "dataset",
            (PY, *data, *sizes.dataset),
            sizes.timeout_s["dataset"],
            partial(check_dataset, sizes.dataset),
            script=data[0],
        ),
        *train_steps(sizes, work),
        Step(
            "tests -m cuda",
            tests_argv,
            sizes.timeout_s.get("tests", 60),
            check_tests,
            skip=sizes.skip_reasons.get("tests", "") if sizes.tests is None else "",
        ),
        bench_step(sizes, "throughput", "bench_train_throughput.py", sizes.throughput, check_throughput),
        bench_step(sizes, "unipt", "bench_unipt_step.py", sizes.unipt, check_unipt),
        bench_step(sizes, "optimizer", "bench_optimizer.py", sizes.optimizer, check_optimizer),
        bench_step(sizes, "eval", "bench_eval.py", sizes.eval, check_eval),
    ]


# ---- running and reporting --------------------------------------------------------------------------------------------


def run_step(step: Step, log: Path, env: dict[str, str], deadline: float) -> Result:
    """Run one step into its log, killed (with everything it started in its session) at its timeout."""
    if step.skip:
        return Result(step.name, "skipped", 0.0, step.skip)
    if step.script and not (ROOT / step.script).is_file():
        return Result(step.name, "missing", 0.0, f"{step.script} is not in this checkout")
    if step.needs is not None and not step.needs.is_file():
        return Result(step.name, "not-run", 0.0, f"needs {step.needs}, which an earlier step did not write")
    left = deadline - time.monotonic()
    if left < 5:  # too little for any program that imports torch
        return Result(step.name, "not-run", 0.0, "the run's time budget is spent")
    timeout = min(step.timeout_s, left)
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            step.argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    seconds = time.monotonic() - start
    text = log.read_text(errors="replace")
    try:
        passed, summary = step.check(text)
    except (KeyError, ValueError, IndexError) as exc:  # the program wrote something other than what it documents
        passed, summary = False, f"unreadable output ({type(exc).__name__}: {exc})"
    if code is None:  # what it printed before the kill may still hold figures
        return Result(step.name, "timeout", seconds, f"killed after {timeout:.0f} s; " + summary)
    if code != 0:
        return Result(step.name, "failed", seconds, f"exit {code}: {last_line(text)}")
    return Result(step.name, "ok" if passed else "failed", seconds, summary)


def format_table(title: str, results: list[Result], pending: list[Step]) -> str:
    """One row per step (pending ones too), then the count per status."""
    width = max(len(s) for s in ["step", *(r.name for r in results), *(s.name for s in pending)])
    lines = [title, f"{'step':<{width}}  {'status':<8} {'seconds':>8}  summary"]
    lines += [f"{r.name:<{width}}  {r.status:<8} {r.seconds:>8.1f}  {r.summary}" for r in results]
    lines += [f"{s.name:<{width}}  {'pending':<8} {'':>8}" for s in pending]
    counts = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    verdict = "FAILED" if any(r.status in FAILURES for r in results) else "passed"
    lines.append(f"{verdict}: " + ", ".join(f"{n} {status}" for status, n in counts.items()))
    return "\n".join(lines) + "\n"


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for table.txt and logs/ (no checkpoints land here)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: the same steps at toy sizes")
    parser.add_argument("--budget", type=float, default=470, help="seconds for all steps together (default 470)")
    args = parser.parse_args(argv)
    sizes = CUDA if args.device == "cuda" else CPU
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **sizes.env}
    title = f"gpu_check --device {args.device}, {time.strftime('%Y-%m-%d %H:%M')}, budget {args.budget:.0f} s"
    deadline = time.monotonic() + args.budget
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        steps = plan(sizes, Path(work))
        for i, step in enumerate(steps):
            print(f"[{i + 1}/{len(steps)}] {step.name}", flush=True)
            results.append(run_step(step, out / "logs" / f"{slug(step.name)}.log", env, deadline))
            (out / "table.txt").write_text(format_table(title, results, steps[i + 1 :]))
    print(format_table(title, results, []), end="")
    return 1 if any(r.status in FAILURES for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
