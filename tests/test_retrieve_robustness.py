"""retrieve.py against hostile or careless input: tampered indexes, re-pointing, non-finite numbers, file names that
drive a terminal, symlink loops, Ctrl-C, and readers racing writers. Each case: the exit code, one line naming the
file or flag, no traceback, and what is left on disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_clip_state_dict, write_video

import retrieve
import search.build as search_build
from search.build import IndexRequest, build_index
from search.index import load_index
from search.rank import top_k
from search.settings import Weights

REPO = Path(__file__).resolve().parents[1]


def _index(videos: Path, index: Path, clip: Path, **kwargs):
    request = IndexRequest(videos, index, Weights(pretrained_clip_name=str(clip)), max_frames=2, progress=False)
    for key, value in kwargs.items():
        request = search_build.replace(request, **{key: value})
    return build_index(request)


@pytest.fixture
def small(tmp_path, tiny_clip_file):
    """Two videos indexed with the tiny CLIP."""
    videos = tmp_path / "videos"
    write_video(videos / "a.mp4", n_frames=8, fps=4, seed=1)
    write_video(videos / "b.mp4", n_frames=8, fps=4, seed=2)
    _index(videos, tmp_path / "index", tiny_clip_file)
    return videos, tmp_path / "index"


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "video/s]" not in line]
    assert "Traceback" not in err and len(lines) == 1, err  # the progress bar aside
    return lines[0]


def test_a_tampered_index_is_refused_at_load_naming_the_entry(small, capsys):
    _, index = small
    manifest = json.loads((index / "index.json").read_text())
    manifest["videos"][1]["path"] = "../../../etc/passwd"
    (index / "index.json").write_text(json.dumps(manifest))
    assert retrieve.main(["search", "--index", str(index), "--query", "a"]) == 2
    err = _one_error_line(capsys)
    assert f"{index / 'index.json'}: videos[1]: path '../../../etc/passwd' is not a relative path" in err


def test_another_folder_is_refused_unless_repointed(small, tmp_path, tiny_clip_file, capsys):
    videos, index = small
    other = tmp_path / "other"
    write_video(other / "c.mp4", n_frames=8, fps=4, seed=3)
    before = {p.name: p.read_bytes() for p in index.iterdir() if p.is_file()}
    argv = ["index", "--videos", str(other), "--index", str(index), "--num_workers", "0"]
    assert retrieve.main(argv) == 2
    err = _one_error_line(capsys)
    assert f"indexes {videos.resolve()}, not --videos {other}" in err and "--repoint" in err
    assert {p.name: p.read_bytes() for p in index.iterdir() if p.is_file()} == before  # untouched
    assert retrieve.main([*argv, "--repoint"]) == 0
    assert "(1 encoded, 0 unchanged, 2 removed)" in capsys.readouterr().out
    loaded = load_index(index)
    assert [v["path"] for v in loaded.videos] == ["c.mp4"] and loaded.root == other.resolve()


def test_non_finite_embeddings_are_refused_at_index_time_naming_the_video(small, tmp_path, monkeypatch, capsys):
    videos, index = small
    write_video(videos / "c.mp4", n_frames=8, fps=4, seed=3)
    before = (index / "index.json").read_bytes()

    def nan_embeddings(model, root, paths, *args, **kwargs):
        for path in paths:
            yield path, np.full(512, np.nan, dtype=np.float32), 2, ""

    monkeypatch.setattr(search_build, "encode_videos", nan_embeddings)
    assert retrieve.main(["index", "--videos", str(videos), "--index", str(index), "--num_workers", "0"]) == 2
    err = _one_error_line(capsys)
    assert f"{videos.resolve() / 'c.mp4'}: the model gives non-finite embedding values" in err
    assert (index / "index.json").read_bytes() == before and len(list(index.glob("embeddings-*.npy"))) == 1


def test_weights_holding_nan_index_nothing(tmp_path, capsys):
    videos = tmp_path / "videos"
    write_video(videos / "a.mp4", n_frames=8, fps=4, seed=1)
    state = make_clip_state_dict()
    state["visual.proj"] = torch.full_like(state["visual.proj"], float("nan"))
    clip = tmp_path / "nan-clip.pt"
    torch.save(state, clip)
    argv = ["index", "--videos", str(videos), "--index", str(tmp_path / "i"), "--pretrained_clip_name", str(clip)]
    assert retrieve.main([*argv, "--max_frames", "2", "--num_workers", "0"]) == 2
    err = _one_error_line(capsys)
    assert str(clip) in err or str(videos.resolve() / "a.mp4") in err  # refused when read, or its first output
    assert not (tmp_path / "i").exists()


def test_an_index_holding_non_finite_rows_is_named_at_search_and_never_ranked(small, capsys):
    _, index = small
    manifest = json.loads((index / "index.json").read_text())
    emb = np.load(index / manifest["embeddings"])
    emb[1, 0] = np.nan
    np.save(index / manifest["embeddings"], emb)
    assert retrieve.main(["search", "--index", str(index), "--query", "a", "--json"]) == 2
    assert capsys.readouterr().out == ""
    assert retrieve.main(["search", "--index", str(index), "--query", "a"]) == 2
    err = _one_error_line(capsys)
    assert "rows 1 ('b.mp4') hold non-finite values (NaN or Inf)" in err


def test_file_names_that_drive_a_terminal_are_printed_escaped(tmp_path, tiny_clip_file, capsys):
    videos = tmp_path / "videos"
    write_video(videos / "a.mp4", n_frames=8, fps=4, seed=1)
    os.link(videos / "a.mp4", videos / "x\x1b[2Jy.mp4")
    os.link(videos / "a.mp4", videos / "fake\n     1     9.999  forged.mp4")
    _index(videos, tmp_path / "index", tiny_clip_file)
    assert retrieve.main(["search", "--index", str(tmp_path / "index"), "--query", "a", "--top_k", "3"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and len(out.splitlines()) == 2 + 3
    assert "x\\x1b[2Jy.mp4" in out and "fake\\n     1     9.999  forged.mp4" in out
    assert retrieve._printable("plain é name.mp4") == "plain é name.mp4"


def test_a_symlink_loop_as_captions_video_is_one_line(small, tmp_path, capsys):
    _, index = small
    loop = tmp_path / "loop.mp4"
    loop.symlink_to(loop)
    assert retrieve.main(["captions", "--index", str(index), "--video", str(loop), "--caption", "a dog"]) == 2
    assert f"--video {loop} not found (Too many levels of symbolic links)" in _one_error_line(capsys)
    assert retrieve.main(["captions", "--index", str(index), "--video", str(tmp_path), "--caption", "a dog"]) == 2
    assert "is not a regular file" in _one_error_line(capsys)


def test_max_words_above_clips_context_is_refused_at_start(capsys):
    with pytest.raises(SystemExit) as exit_:
        retrieve.parse_args(["search", "--index", "i", "--query", "a", "--max_words", "78"])
    assert exit_.value.code == 2 and "--max_words must be at most 77" in capsys.readouterr().err
    assert retrieve.parse_args(["search", "--index", "i", "--query", "a", "--max_words", "77"]).max_words == 77


def test_ctrl_c_during_index_with_workers_is_one_line_and_leaves_no_folder(tmp_path, tiny_clip_file):
    videos = tmp_path / "videos"
    write_video(videos / "v000.mp4", n_frames=8, fps=4, seed=1)
    for i in range(1, 200):  # enough work to be interrupted in the middle
        os.link(videos / "v000.mp4", videos / f"v{i:03d}.mp4")
    index = tmp_path / "index"
    argv = ["index", "--videos", str(videos), "--index", str(index), "--pretrained_clip_name", str(tiny_clip_file)]
    argv += ["--max_frames", "2", "--num_workers", "2", "--batch_size", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-u", "retrieve.py", *argv],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, as a terminal's foreground job
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # even when pytest runs with it ignored
    )
    err = b""
    deadline = time.time() + 120
    while b"encoding:" not in err and time.time() < deadline:  # the workers are decoding
        err += os.read(proc.stderr.fileno(), 4096)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends: the main process and its workers
    out, rest = proc.communicate(timeout=120)
    lines = [
        line
        for line in (err + rest).decode().replace("\r", "\n").splitlines()
        if line.strip() and not line.startswith("encoding")
    ]
    assert proc.returncode == 130 and lines == ["retrieve.py index: interrupted"], (err + rest).decode()[-3000:]
    assert not index.exists()  # a first run interrupted leaves nothing behind


def test_readers_see_a_whole_index_while_two_writers_update_it(small, tiny_clip_file):
    """Two writers alternately add and remove a video; a reader ranks throughout: always a whole index (rows and
    names agree with one of the states written), never an error."""
    videos, index = small
    expected = {v["path"]: e.copy() for v, e in zip(load_index(index).videos, load_index(index).embeddings)}
    errors, reads = [], []
    stop = time.time() + 4

    def write(name: str, seed: int):
        try:
            while time.time() < stop:
                write_video(videos / name, n_frames=8, fps=4, seed=seed)
                _index(videos, index, tiny_clip_file)
                (videos / name).unlink()
                _index(videos, index, tiny_clip_file)
        except Exception as e:  # noqa: BLE001 - the test reports whatever went wrong
            errors.append(e)

    def read():
        while time.time() < stop:
            try:
                loaded = load_index(index, mmap=True)
                rows, _ = top_k(loaded.embeddings, np.asarray(loaded.embeddings[:1]), len(loaded.videos), 1.0)
                names = [v["path"] for v in loaded.videos]
                for path, emb in expected.items():
                    np.testing.assert_array_equal(loaded.embeddings[names.index(path)], emb)
                reads.append((tuple(names), len(rows[0])))
            except Exception as e:  # noqa: BLE001
                errors.append(e)

    threads = [threading.Thread(target=write, args=("c.mp4", 3)), threading.Thread(target=write, args=("d.mp4", 4))]
    threads.append(threading.Thread(target=read))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(reads) > 10 and all(len(names) == n for names, n in reads)
    assert {names for names, _ in reads} <= {
        ("a.mp4", "b.mp4"),
        ("a.mp4", "b.mp4", "c.mp4"),
        ("a.mp4", "b.mp4", "d.mp4"),
        ("a.mp4", "b.mp4", "c.mp4", "d.mp4"),
    }
