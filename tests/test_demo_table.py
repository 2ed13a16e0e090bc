"""preprocess/demo_table.py: the demo's closing table, from two hand-written metrics records."""

from __future__ import annotations

import json
from pathlib import Path

from preprocess.demo_table import table


def write(path: Path, num_videos: int, r1: float, r5: float, r10: float, mr: float, mean_r: float) -> Path:
    metrics = {"R1": r1, "R5": r5, "R10": r10, "MR": mr, "MeanR": mean_r}
    path.write_text(json.dumps({"sim_header": "seqTransf", "num_videos": num_videos, "text_to_video": metrics}))
    return path


def test_table_rows_and_chance(tmp_path):
    test = write(tmp_path / "test.json", 100, 41.0, 77.5, 88.25, 2.0, 6.125)
    order = write(tmp_path / "order.json", 50, 38.0, 70.0, 80.0, 3.5, 12.0)
    lines = table(test, order).splitlines()
    assert lines[0] == "" and lines[1] == "== CLIP4Clip seqTransf, text-to-video, last epoch of stage 2"
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in lines[4:]]
    # chance R@1 is 100 / videos: 1.0 for 100 videos, 2.0 for 50
    assert cells[0] == ["test (all captions)", "100", "1.0", "41.0", "77.5", "88.2", "2.0", "6.1"]
    assert cells[1] == ["test, order-dependent only", "50", "2.0", "38.0", "70.0", "80.0", "3.5", "12.0"]


def test_unipt_stage_two_is_named_in_the_title(tmp_path):
    test = write(tmp_path / "test.json", 100, 41.0, 77.5, 88.25, 2.0, 6.125)
    title = table(test, test, tuning="unipt").splitlines()[1]
    assert (
        title
        == "== CLIP4Clip seqTransf with UniPT (CLIP frozen, adapters trained), text-to-video, last epoch of stage 2"
    )
