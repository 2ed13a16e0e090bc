"""engine/runlock.py: one run per output folder; the lock goes with its process, a killed run's file is taken over."""

import subprocess
import sys
from pathlib import Path

import pytest

from engine.runlock import LOCK_NAME, run_lock
from errors import UsageError

ROOT = Path(__file__).resolve().parents[1]


def test_second_holder_is_refused_naming_the_folder_and_the_first(tmp_path):
    with run_lock(str(tmp_path)) as stale:
        assert stale is None
        holder = (tmp_path / LOCK_NAME).read_text()
        assert holder.startswith("pid ")
        with pytest.raises(UsageError, match=rf"--output_dir {tmp_path}: another run \({holder.strip()}\)"):
            with run_lock(str(tmp_path)):
                pass
    assert not (tmp_path / LOCK_NAME).exists()  # released and removed
    with run_lock(str(tmp_path)) as stale:  # free again
        assert stale is None


def test_released_when_the_block_raises(tmp_path):
    with pytest.raises(KeyError):
        with run_lock(str(tmp_path)):
            raise KeyError("bug")
    with run_lock(str(tmp_path)) as stale:
        assert stale is None


def test_lock_of_a_killed_process_is_taken_over_saying_whose(tmp_path):
    child = (
        "import os, sys; from engine.runlock import run_lock\n"
        f"with run_lock({str(tmp_path)!r}):\n    os.kill(os.getpid(), 9)\n"
    )
    assert subprocess.run([sys.executable, "-c", child], cwd=ROOT).returncode == -9
    left = (tmp_path / LOCK_NAME).read_text().strip()
    assert left.startswith("pid ")
    with run_lock(str(tmp_path)) as stale:
        assert stale == left
