"""bench/gpu_check.py: its CPU mode end to end (every step listed with a status), the runner's timeout, failure and
skip handling, and the checks that read each program's output."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402

STEPS = [
    "device",
    "dataset",
    "train full/auto",
    "train full/bf16",
    "train unipt/auto",
    "train unipt/bf16",
    "tests -m cuda",
    "bench_train_throughput.py",
    "bench_unipt_step.py",
    "bench_optimizer.py",
    "bench_eval.py",
]
ENV = dict(os.environ)
STATUSES = {"ok", "failed", "timeout", "missing", "not-run", "skipped"}


def parse_table(text: str) -> tuple[dict[str, tuple[str, str]], str]:
    """{step: (status, summary)} and the verdict line, read back from the printed columns."""
    lines = text.splitlines()
    header = lines[1]
    status_at, seconds_end, summary_at = header.index("status"), header.index("seconds") + 7, header.index("summary")
    rows = {}
    for line in lines[2:-1]:
        name, status = line[:status_at].strip(), line[status_at:seconds_end].split()[0]
        rows[name] = (status, line[summary_at:])
    return rows, lines[-1]


def test_cpu_mode_runs_every_step_and_the_table_says_how_each_went(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    table = (out / "table.txt").read_text()
    assert proc.stdout.endswith(table), proc.stdout[-2000:] + proc.stderr[-2000:]
    rows, verdict = parse_table(table)
    assert list(rows) == STEPS
    assert {status for status, _ in rows.values()} <= STATUSES
    for name in ("device", "dataset", "train full/auto", "train full/bf16", "train unipt/auto", "train unipt/bf16"):
        assert rows[name][0] == "ok", (name, rows[name], (out / "logs" / f"{gpu_check.slug(name)}.log").read_text())
    assert rows["device"][1].startswith("cpu, torch ")
    for name in ("train full/auto", "train unipt/bf16"):
        assert "1 steps" in rows[name][1] and "(finite); R@1 t2v" in rows[name][1]
    assert (
        rows["bench_train_throughput.py"][0] == "ok"
        and "30-min goal 500 clips/s" in rows["bench_train_throughput.py"][1]
    )
    for name in ("tests -m cuda", "bench_unipt_step.py", "bench_eval.py"):
        assert rows[name][0] == "skipped" and rows[name][1].startswith("CPU mode: ")
    has_optimizer_bench = (ROOT / "bench" / "bench_optimizer.py").is_file()
    assert rows["bench_optimizer.py"][0] == ("ok" if has_optimizer_bench else "missing")
    for name, (status, _) in rows.items():
        log = out / "logs" / f"{gpu_check.slug(name)}.log"
        assert log.is_file() == (status == "ok"), name
    failed = [name for name, (status, _) in rows.items() if status in gpu_check.FAILURES]
    assert proc.returncode == (1 if failed else 0)
    assert verdict.startswith("FAILED: " if failed else "passed: ")


def test_a_step_past_its_timeout_is_killed_with_what_it_started(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time; "
        f"p = subprocess.Popen(['sleep', '60']); open({str(pid_file)!r}, 'w').write(str(p.pid)); "
        "print('started', flush=True); time.sleep(60)"
    )
    step = gpu_check.Step("sleeper", (sys.executable, "-c", code), 3, gpu_check.check_tests)
    start = time.monotonic()
    result = gpu_check.run_step(step, tmp_path / "sleeper.log", ENV, time.monotonic() + 100)
    assert time.monotonic() - start < 30
    assert result.status == "timeout" and result.summary == "killed after 3 s; started"
    grandchild = Path(f"/proc/{pid_file.read_text()}/stat")
    time.sleep(0.2)
    assert not grandchild.exists() or grandchild.read_text().split(")")[-1].split()[0] in ("Z", "X")


def test_the_deadline_shortens_a_timeout_and_a_spent_budget_runs_nothing(tmp_path):
    step = gpu_check.Step("sleeper", (sys.executable, "-c", "import time; time.sleep(60)"), 60, gpu_check.check_tests)
    result = gpu_check.run_step(step, tmp_path / "a.log", ENV, time.monotonic() + 8)
    assert result.status == "timeout" and result.summary.startswith("killed after ") and 5 < result.seconds < 9
    result = gpu_check.run_step(step, tmp_path / "b.log", ENV, time.monotonic() + 4)
    assert result == gpu_check.Result("sleeper", "not-run", 0.0, "the run's time budget is spent")


def test_failed_missing_skipped_and_blocked_steps(tmp_path):
    deadline = time.monotonic() + 100
    boom = gpu_check.Step(
        "boom", (sys.executable, "-c", "print('x'); raise SystemExit('boom')"), 30, gpu_check.check_tests
    )
    result = gpu_check.run_step(boom, tmp_path / "boom.log", ENV, deadline)
    assert (result.status, result.summary) == ("failed", "exit 1: boom")
    absent = gpu_check.Step("opt", ("x",), 30, gpu_check.check_tests, script="bench/no_such_bench.py")
    assert gpu_check.run_step(absent, tmp_path / "o.log", ENV, deadline).status == "missing"
    blocked = gpu_check.Step("u", ("x",), 30, gpu_check.check_tests, needs=tmp_path / "pytorch_model.bin.0")
    result = gpu_check.run_step(blocked, tmp_path / "u.log", ENV, deadline)
    assert result.status == "not-run" and "pytorch_model.bin.0" in result.summary
    skipped = gpu_check.Step("s", (), 30, gpu_check.check_tests, skip="CPU mode: no toy size")
    assert gpu_check.run_step(skipped, tmp_path / "s.log", ENV, deadline).summary == "CPU mode: no toy size"
    assert not (tmp_path / "o.log").exists() and not (tmp_path / "u.log").exists()


def write_run(folder: Path, losses: list[float], train_loss: float) -> Path:
    folder.mkdir()
    records = [{"event": "step", "epoch": 1, "step": i + 1, "loss": x} for i, x in enumerate(losses)]
    records.append({"event": "epoch", "epoch": 1, "train_loss": train_loss})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    metrics = {"text_to_video": {"R1": 12.5, "R5": 50.0}, "video_to_text": {"R1": 6.25, "R5": 25.0}}
    (folder / "metrics_epoch0.json").write_text(json.dumps(metrics))
    return folder


def test_check_train_wants_finite_losses_and_metrics(tmp_path):
    good = write_run(tmp_path / "good", [4.5, 3.25, 2.0], 3.25)
    assert gpu_check.check_train(good, "x\nMemory utilization: 1.234 GB\n") == (
        True,
        "3 steps, loss 4.500 -> 2.000 (finite); R@1 t2v 12.5 v2t 6.2; peak 1.234 GB",
    )
    bad = write_run(tmp_path / "bad", [4.5, math.nan], math.nan)
    passed, summary = gpu_check.check_train(bad, "")
    assert not passed and summary.startswith("non-finite loss: [4.5, nan, nan]")
    passed, summary = gpu_check.check_train(tmp_path / "absent", "")
    assert not passed and "metrics.jsonl" in summary


THROUGHPUT = """
model step alone (s)         before        now    compile  now/before
  host->device                0.001      0.001      0.001        1.00
  clips/s                       200        300        400        1.50

whole loop (frame cache, uint8): 250 clips/s; loader 900, model 300; whole/min(loader, model) = 0.83
projected MSR-VTT recipe (180,000 pairs x 5 epochs, this batch size): 1 h at 250 clips/s (goal 30 min: 500 clips/s)
"""


def test_check_throughput_holds_the_projection_against_both_goals():
    # 900,000 clips at 250 clips/s: 3,600 s = 60 min; the goals need 900,000 / 1,800 = 500 and / 600 = 1,500 clips/s.
    passed, summary = gpu_check.check_throughput(THROUGHPUT)
    assert passed
    assert summary == (
        "whole 250 clips/s (loader 900); model before 200, now 300, compile 400, now/before 1.50; recipe 60 min; "
        "30-min goal 500 clips/s (2x this), 10-min goal 1500 clips/s (6x this)"
    )
    assert gpu_check.check_throughput("Traceback ...\nRuntimeError: CUDA out of memory")[0] is False


UNIPT = """
                                      full       unipt   ratio   target
step time (s)                         0.50        0.14    0.28  <= 0.60
step memory above rest (MiB)       8192.00     1024.00    0.12  <= 0.35
peak memory, total (MiB)          49971.20    13926.40    0.28
"""


def test_check_unipt_reports_time_and_peak_beside_the_paper():
    # 49,971.2 MiB / 1024 = 48.8 GiB; 13,926.4 / 1024 = 13.6 GiB.
    assert gpu_check.check_unipt(UNIPT) == (
        True,
        "step 0.50 -> 0.14 s (0.28x); peak 48.8 -> 13.6 GiB (0.28x; paper 48.8 -> 13.6 GB, 0.28x); step memory 0.12x",
    )
    assert gpu_check.check_unipt(UNIPT.replace("step time", "stage time"))[0] is False


def test_check_eval_optimizer_and_tests_read_their_rows():
    evaluated = (
        "head  ours s  orig s  speed-up\nmeanP  0.49  49.0  99.0x  161  142\nseqLSTM  0.43  190.0  442.0x  1  2\n"
    )
    assert gpu_check.check_eval(evaluated) == (True, "meanP 0.49 s (99.0x); seqLSTM 0.43 s (442.0x)")
    optimizer = "          ms  now/this  this/fused\nBertAdam (now)   12.5  1.00  1.80\n"
    assert gpu_check.check_optimizer(optimizer) == (True, "BertAdam (now): ms 12.5, now/this 1.00, this/fused 1.80")
    assert gpu_check.check_tests("....\n=== 4 passed, 422 deselected in 61.20s ===\n") == (
        True,
        "4 passed, 422 deselected in 61.20s",
    )
    assert gpu_check.check_tests("\n422 deselected in 9.10s\n")[0] is False


@pytest.mark.parametrize("status, verdict", [("ok", "passed: 2 ok"), ("timeout", "FAILED: 1 ok, 1 timeout")])
def test_format_table_ends_with_the_verdict(status, verdict):
    results = [gpu_check.Result("a", "ok", 1.0, "fine"), gpu_check.Result("b", status, 2.0, "x")]
    assert gpu_check.format_table("title", results, []).splitlines()[-1] == verdict
