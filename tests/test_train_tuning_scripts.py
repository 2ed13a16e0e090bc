"""train_msrvtt_tuning.sh / train_msvd_tuning.sh: the video folder each reads, with torchrun replaced by a stub that
prints its arguments."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    stub = tmp_path / "bin" / "torchrun"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    stub.chmod(0o755)
    environ = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}", **env}
    return subprocess.run(["bash", str(ROOT / script)], env=environ, capture_output=True, text=True)


def features_path(out: str) -> str:
    args = out.splitlines()
    return args[args.index("--features_path") + 1]


@pytest.mark.parametrize(
    "script, archive", [("train_msrvtt_tuning.sh", "MSRVTT_Videos"), ("train_msvd_tuning.sh", "MSVD_Videos")]
)
def test_the_video_folder_is_the_compressed_one_else_the_readmes_layout(tmp_path, script, archive):
    data = tmp_path / "data"
    (data / archive).mkdir(parents=True)
    done = run_script(script, tmp_path, DATA_PATH=str(data))
    assert done.returncode == 0 and features_path(done.stdout) == f"{data}/{archive}", done.stderr
    (data / "Compress_Videos").mkdir()
    assert features_path(run_script(script, tmp_path, DATA_PATH=str(data)).stdout) == f"{data}/Compress_Videos"
    assert features_path(run_script(script, tmp_path, DATA_PATH=str(data), VIDEO_DIR=str(tmp_path)).stdout) == str(
        tmp_path
    )

    done = run_script(script, tmp_path, DATA_PATH=str(tmp_path / "none"))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (
        f"{script}: error: no video folder {tmp_path}/none/{archive} (expected {tmp_path}/none/Compress_Videos or "
        f"{tmp_path}/none/{archive}; set DATA_PATH or VIDEO_DIR)\n"
    )
