"""The command blocks of README.md and docs/search.md that use the demo's outputs run as printed.

Each block naming ``demo_output/`` is run from a folder holding a tiny stand-in for what ``bash demo.sh`` leaves
there (a few synthetic videos and a meanP checkpoint of the tiny CLIP, which holds every CLIP weight), with only
``python`` and the scripts' paths pointed at this checkout. The blocks that make the demo itself are ``demo.sh``'s
(tests/test_demo.py runs it); the docs' other blocks use no demo output.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from modules.modeling import CLIP4Clip, CLIP4ClipConfig

REPO = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/search.md")
DEMO_VIDEOS = "demo_output/data_seed0_train1000_test100/msrvtt/videos"
DEMO_CHECKPOINT = "demo_output/run_meanP/pytorch_model.bin.9"


def demo_blocks() -> list[tuple[str, str]]:
    """(file, command) for every fenced block of the docs that names demo_output/, continuation lines joined."""
    found = []
    for doc in DOCS:
        for block in re.findall(r"```[a-z]*\n(.*?)```", (REPO / doc).read_text(encoding="utf-8"), re.S):
            if "demo_output/" in block:
                found.append((doc, block.replace("\\\n", " ").strip()))
    return found


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory) -> Path:
    """What the docs' commands read of demo.sh's output, tiny."""
    root = tmp_path_factory.mktemp("docs")
    data = root / "data"
    subprocess.run(
        [sys.executable, str(REPO / "preprocess/make_synthetic_dataset.py"), "--output_dir", str(data)]
        + ["--datasets", "msrvtt", "--num_train", "2", "--num_test", "4", "--seed", "0"],
        check=True,
        capture_output=True,
    )
    videos = root / DEMO_VIDEOS
    videos.parent.mkdir(parents=True)
    (data / "msrvtt/videos").rename(videos)
    config = CLIP4ClipConfig(pretrained_clip_name="tiny-random-ViT/16", max_frames=4, max_words=20)
    torch.manual_seed(0)
    model = CLIP4Clip.from_config(config)
    (root / DEMO_CHECKPOINT).parent.mkdir(parents=True)
    torch.save(model.state_dict(), root / DEMO_CHECKPOINT)
    return root


def as_run_here(command: str) -> list[str]:
    words = command.split()
    assert words[0] == "python", command
    return [sys.executable, str(REPO / words[1]), *words[2:]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_until_answered(argv: list[str], cwd: Path, url_path: str) -> dict:
    """Start the server, fetch ``url_path`` once it answers, stop it."""
    port = free_port()
    server = subprocess.Popen(
        [*argv, "--port", str(port)], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if server.poll() is not None:
                pytest.fail(f"serve stopped: {server.stdout.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{url_path}", timeout=5) as response:
                    return json.loads(response.read())
            except OSError:
                time.sleep(1)
        pytest.fail("serve did not answer within 240 s")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_docs_name_the_demo_outputs_this_test_builds():
    blocks = demo_blocks()
    assert [doc for doc, _ in blocks] == ["README.md"]
    assert DEMO_VIDEOS in blocks[0][1] and DEMO_CHECKPOINT in blocks[0][1]


def test_readme_search_page_command_runs_as_printed(demo_folder):
    pytest.importorskip("fastapi")
    (doc, command), *_ = demo_blocks()
    argv = as_run_here(command)
    assert "--pretrained_clip_name" not in argv  # the checkpoint holds its CLIP: no file needed
    answer = serve_until_answered(argv, demo_folder, "/api/search?q=a%20red%20circle&k=3")
    assert len(answer["results"]) == 3
    assert (demo_folder / "demo_index").is_dir()
    # The follow-up the README gives inline, on the index the page built.
    listing = subprocess.run(
        [sys.executable, str(REPO / "retrieve.py"), "search", "--index", "demo_index", "--video", "3", "--json"],
        cwd=demo_folder,
        capture_output=True,
        text=True,
    )
    assert listing.returncode == 0, listing.stderr[-2000:]
    results = json.loads(listing.stdout)["results"]
    assert results and 3 not in [r["id"] for r in results]  # the query video itself is left out


def test_what_the_docs_commands_write_in_a_checkout_is_ignored():
    written = ["demo_index/manifest.json", "demo_output/run_meanP/pytorch_model.bin.9", "data/synthetic_index/x"]
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", *written], cwd=REPO, capture_output=True, text=True
    ).stdout.split()
    assert ignored == written
