"""bench/demo_seeds.py --dry_run: it tabulates finished runs and names the missing ones, running nothing."""

import json
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import demo_seeds  # noqa: E402


def finish(out, head: str, seed: int, test_r1: float, order_r1: float) -> None:
    run = demo_seeds.run_folder(out, head, seed)
    (run / "order").mkdir(parents=True)
    (run / "metrics_epoch1.json").write_text(json.dumps({"text_to_video": {"R1": test_r1}}))
    (run / "order" / "metrics_eval.json").write_text(json.dumps({"text_to_video": {"R1": order_r1}}))


def test_dry_run_tabulates_finished_runs_only(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EPOCHS", "2")
    finish(tmp_path, "meanP", 1, 10.0, 4.0)
    finish(tmp_path, "meanP", 2, 20.0, 6.0)
    figures = demo_seeds.main(
        ["--out", str(tmp_path), "--seeds", "1", "2", "--heads", "meanP", "seqTransf", "--dry_run"]
    )
    out = capsys.readouterr().out
    assert figures == {"meanP": [(1, 10.0, 4.0), (2, 20.0, 6.0)], "seqTransf": []}
    assert out.count("not run yet (--dry_run)") == 2
    # mean 15, sample std sqrt(((10-15)^2 + (20-15)^2) / 1) = 7.07; order-dependent: mean 5, std 1.41
    assert "| meanP | 2 | 15.0 +- 7.1 | 5.0 +- 1.4 |" in out
    assert "| seqTransf |" not in out
    assert not list(tmp_path.glob("*.log"))  # no demo.sh ran
