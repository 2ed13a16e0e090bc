"""preprocess/compress_video.py on tiny generated videos: size, rate, audio, skipping, collisions, failures."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest

from preprocess import compress_video as cv

FFMPEG = cv.find_ffmpeg()


@pytest.fixture(autouse=True)
def sigint_as_a_terminal_gives_it():
    """SIGINT handled in this process, hence default in the children it starts (a handler does not survive exec).

    A suite started with SIGINT ignored (nohup, a background job) would pass SIG_IGN on to the children, and the
    Ctrl-C tests would wait for an interruption that never comes.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def make_clip(path: Path, width: int, height: int, seconds: float = 1.0, fps: int = 10) -> Path:
    """A test-pattern video with a sine audio track (yuv444p, so odd sizes encode too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            FFMPEG,
            "-nostdin",
            "-hide_banner",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            f"testsrc=size={width}x{height}:rate={fps}:duration={seconds}",
            "-f",
            "lavfi",
            "-i",
            f"sine=frequency=440:duration={seconds}",
            "-shortest",
            "-pix_fmt",
            "yuv444p",
            str(path),
        ],
        check=True,
    )
    return path


def stream_lines(path: Path) -> list:
    """The 'Stream #...' lines ffmpeg prints for ``path`` (ffprobe is not shipped with imageio-ffmpeg)."""
    proc = subprocess.run([FFMPEG, "-hide_banner", "-i", str(path)], capture_output=True, text=True)
    return [line for line in proc.stderr.splitlines() if "Stream #" in line]


def video_props(path: Path):
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened(), path
    props = (cap.get(cv2.CAP_PROP_FPS), int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    ok, _ = cap.read()
    cap.release()
    assert ok, f"cannot decode {path}"
    return props


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """Three clips (landscape, portrait, odd-sized) and a corrupt file, compressed once for the module."""
    root = tmp_path_factory.mktemp("compress")
    src = root / "in"
    make_clip(src / "landscape.mp4", 80, 48)
    make_clip(src / "deeper" / "portrait.mp4", 48, 80)
    make_clip(src / "deeper" / "more" / "odd.mp4", 71, 53)
    (src / "corrupt.mp4").write_bytes(b"this is not a video")
    out = root / "out"
    code = cv.main(["--input_root", str(src), "--output_root", str(out), "--num_workers", "2"])
    return src, out, code


def test_every_file_lands_flat_in_the_output(compressed):
    _, out, _ = compressed
    assert sorted(p.name for p in out.iterdir()) == [
        cv.FAILED_MANIFEST,
        "corrupt.mp4",
        "landscape.mp4",
        "odd.mp4",
        "portrait.mp4",
    ]


@pytest.mark.parametrize(
    "name, width, height",
    [
        # landscape: height 224, width = even number at or below 224*a
        ("landscape.mp4", 372, 224),  # 224 * 80/48 = 373.3
        ("odd.mp4", 300, 224),  # 224 * 71/53 = 300.08
        # portrait: width 224, height = even number at or below 224/a (the original squashed it to 224*a = 134)
        ("portrait.mp4", 224, 372),  # 224 * 80/48 = 373.3
    ],
)
def test_size_rate_and_no_audio(compressed, name, width, height):
    src_root, out, _ = compressed
    fps, w, h = video_props(out / name)
    assert (w, h) == (width, height)
    assert fps == pytest.approx(3.0)
    assert min(w, h) == 224 and w % 2 == 0 and h % 2 == 0
    (src,) = src_root.rglob(name)
    assert any("Audio:" in line for line in stream_lines(src)), "the input should carry audio"
    streams = stream_lines(out / name)
    assert len(streams) == 1 and "Video:" in streams[0]


def test_corrupt_input_is_counted_and_copied(compressed):
    src, out, code = compressed
    assert code == 1
    assert (out / "corrupt.mp4").read_bytes() == (src / "corrupt.mp4").read_bytes()


def test_summary_counts_and_names_the_failure(tmp_path, capsys):
    src = tmp_path / "in"
    make_clip(src / "good.mp4", 32, 32, seconds=0.5)
    (src / "bad.mp4").write_bytes(b"junk")
    code = cv.main(["--input_root", str(src), "--output_root", str(tmp_path / "out"), "--num_workers", "1"])
    text = capsys.readouterr()
    assert code == 1
    assert "2 files: 1 compressed, 0 skipped (output existed), 1 failed and copied unchanged" in text.out
    failed = [line for line in text.out.splitlines() if line.startswith("  failed:")]
    assert len(failed) == 1 and str(src / "bad.mp4") in failed[0] and "Invalid data" in failed[0]
    assert f"ffmpeg failed on {src / 'bad.mp4'}" in text.out + text.err

    # A re-run does not count the copy as done: it reports the failure again and exits 1.
    code = cv.main(["--input_root", str(src), "--output_root", str(tmp_path / "out"), "--num_workers", "1"])
    text = capsys.readouterr()
    assert code == 1
    assert "2 files: 0 compressed, 1 skipped (output existed), 1 failed and copied unchanged" in text.out
    assert "Invalid data" in text.out and "(recorded by an earlier run)" in text.out
    # Deleting the copy has it redone; replacing it by hand ends the record.
    (tmp_path / "out" / "bad.mp4").write_bytes(b"fixed by hand")
    assert cv.main(["--input_root", str(src), "--output_root", str(tmp_path / "out"), "--num_workers", "1"]) == 0
    assert not (tmp_path / "out" / cv.FAILED_MANIFEST).exists()


def test_existing_outputs_are_skipped(tmp_path):
    src = tmp_path / "in"
    make_clip(src / "a.mp4", 32, 32, seconds=0.5)
    make_clip(src / "b.mp4", 32, 32, seconds=0.5)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.mp4").write_bytes(b"already here")
    (out / "b.mp4").write_bytes(b"")  # empty: redone
    mtime = (out / "a.mp4").stat().st_mtime_ns
    outcomes = cv.compress_all(src, out, num_workers=2)
    assert {o.dst.name: o.status for o in outcomes} == {"a.mp4": "skipped", "b.mp4": "compressed"}
    assert (out / "a.mp4").read_bytes() == b"already here"
    assert (out / "a.mp4").stat().st_mtime_ns == mtime
    assert video_props(out / "b.mp4")[1:] == (224, 224)
    # A second run has nothing left to do.
    assert {o.status for o in cv.compress_all(src, out, num_workers=2)} == {"skipped"}
    assert sorted(p.name for p in out.iterdir()) == ["a.mp4", "b.mp4"]  # no temporary files left


def test_name_collision_is_an_error_before_anything_is_written(tmp_path, capsys):
    src = tmp_path / "in"
    for sub in ("x", "y"):
        (src / sub).mkdir(parents=True)
        (src / sub / "same.mp4").write_bytes(b"whatever")
    (src / "unique.mp4").write_bytes(b"whatever")
    out = tmp_path / "out"
    with pytest.raises(cv.NameCollisionError, match="same.mp4") as info:
        cv.plan_outputs(src, out)
    assert str(src / "x" / "same.mp4") in str(info.value) and str(src / "y" / "same.mp4") in str(info.value)
    assert cv.main(["--input_root", str(src), "--output_root", str(out)]) == 2
    assert "same.mp4" in capsys.readouterr().err
    assert not out.exists()


def test_input_and_output_must_differ(tmp_path):
    with pytest.raises(ValueError, match="must differ"):
        cv.plan_outputs(tmp_path, tmp_path / ".")


def test_output_folder_inside_input_is_not_walked(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"x")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.mp4").write_bytes(b"x")  # an earlier run's output, same name
    assert cv.plan_outputs(tmp_path, tmp_path / "out") == [(tmp_path / "a.mp4", tmp_path / "out" / "a.mp4")]


def test_ffmpeg_command():
    cmd = cv.build_ffmpeg_command("ffmpeg", Path("in/a.mp4"), Path("out/a.mp4"))
    assert cmd[0] == "ffmpeg" and cmd[-1] == "out/a.mp4"
    assert cmd[cmd.index("-i") + 1] == "in/a.mp4"
    assert cmd[cmd.index("-r") + 1] == "3"
    assert cmd[cmd.index("-map") + 1] == "0:v" and "-an" in cmd
    assert cmd[cmd.index("-filter:v") + 1] == (
        "scale='if(gt(a,1),trunc(oh*a/2)*2,224)':'if(gt(a,1),224,trunc(ow/a/2)*2)'"
    )


def test_script_runs_from_the_repo_root(tmp_path):
    root = Path(__file__).resolve().parents[1]
    make_clip(tmp_path / "in" / "c.mp4", 40, 30, seconds=0.5)
    proc = subprocess.run(
        [
            sys.executable,
            "preprocess/compress_video.py",
            "--input_root",
            str(tmp_path / "in"),
            "--output_root",
            str(tmp_path / "out"),
            "--num_workers",
            "1",
        ],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "1 files: 1 compressed, 0 skipped (output existed), 0 failed and copied unchanged" in proc.stdout
    assert video_props(tmp_path / "out" / "c.mp4")[1:] == (298, 224)  # 224 * 4/3 = 298.7


def test_ctrl_c_stops_removes_partial_output_and_a_rerun_finishes(tmp_path):
    """Ctrl-C reaches the whole process group, ffmpeg included; the run exits 130 and copies nothing."""
    root = Path(__file__).resolve().parents[1]
    src, out, fake = tmp_path / "in", tmp_path / "out", tmp_path / "bin"
    make_clip(src / "a.mp4", 32, 32, seconds=0.5)
    make_clip(src / "b.mp4", 32, 32, seconds=0.5)
    fake.mkdir()
    # An ffmpeg that writes part of its output, then takes long enough to be interrupted.
    (fake / "ffmpeg").write_text('#!/bin/sh\nfor last; do :; done\necho partial > "$last"\nexec sleep 60\n')
    (fake / "ffmpeg").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "preprocess/compress_video.py",
            "--input_root",
            str(src),
            "--output_root",
            str(out),
            "--num_workers",
            "2",
        ],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while len(list(out.glob(".*.tmp.mp4"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert list(out.iterdir()) == []  # no partial output, no copied source, no failure record

    outcomes = cv.compress_all(src, out, num_workers=2)
    assert {o.dst.name: o.status for o in outcomes} == {"a.mp4": "compressed", "b.mp4": "compressed"}
    assert sorted(p.name for p in out.iterdir()) == ["a.mp4", "b.mp4"]


def test_ffmpeg_killed_by_a_signal_is_not_a_failure(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    make_clip(src / "a.mp4", 32, 32, seconds=0.5)
    out.mkdir()
    killed = tmp_path / "ffmpeg-killed"
    killed.write_text("#!/bin/sh\nkill -INT $$\nsleep 1\n")
    killed.chmod(0o755)
    with pytest.raises(cv.Interrupted):
        cv.compress_all(src, out, num_workers=1, ffmpeg=str(killed))
    assert list(out.iterdir()) == []


def _run(src: Path, out: Path) -> int:
    return cv.main(["--input_root", str(src), "--output_root", str(out), "--num_workers", "1"])


def test_an_input_named_like_the_old_record_is_an_output_like_any_other(tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / ".failed.json").write_text("an input, not a record")
    (src / "bad.mp4").write_bytes(b"junk")
    for _ in range(2):  # the rerun used to delete this output, taking it for the record
        assert _run(src, out) == 1
        assert (out / ".failed.json").read_text() == "an input, not a record"
        assert sorted(p.name for p in out.iterdir()) == [cv.FAILED_MANIFEST, ".failed.json", "bad.mp4"]
    assert "2 failed and copied unchanged" in capsys.readouterr().out


def test_an_input_named_like_the_record_is_refused_before_anything_is_written(tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / cv.FAILED_MANIFEST).write_text("{}")
    assert _run(src, out) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: {src / cv.FAILED_MANIFEST}: {cv.FAILED_MANIFEST} is the name of this tool's failure record in {out}; "
        "rename this input"
    )
    assert not out.exists()


def test_an_old_record_is_read_and_replaced(tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "bad.mp4").write_bytes(b"junk")
    assert _run(src, out) == 1
    (out / cv.FAILED_MANIFEST).rename(out / ".failed.json")  # as an earlier version left it
    capsys.readouterr()
    assert _run(src, out) == 1
    assert "(recorded by an earlier run)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [cv.FAILED_MANIFEST, "bad.mp4"]


def test_output_root_that_is_a_file_is_one_error(tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    make_clip(src / "a.mp4", 32, 32, seconds=0.5)
    out.write_text("keep me")
    assert _run(src, out) == 2
    err = capsys.readouterr().err
    assert err == f"error: --output_root {out}: expected a folder (or a path to create), found a file\n"
    assert out.read_text() == "keep me"


def test_read_only_output_root_is_one_error(tmp_path, capsys, monkeypatch):
    src, out = tmp_path / "in", tmp_path / "out"
    make_clip(src / "a.mp4", 32, 32, seconds=0.5)
    out.mkdir()

    def read_only(*a, **k):  # chmod does not stop root, who runs some CI: the mount's answer, simulated
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(cv.tempfile, "TemporaryFile", read_only)
    assert _run(src, out) == 2
    assert capsys.readouterr().err == f"error: --output_root {out}: cannot write there (Read-only file system)\n"
    assert list(out.iterdir()) == []


def test_symlink_loop_input_is_reported_and_the_run_goes_on(tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    make_clip(src / "a.mp4", 32, 32, seconds=0.5)
    (src / "loop.mp4").symlink_to("loop.mp4")
    assert _run(src, out) == 1
    text = capsys.readouterr()
    assert "2 files: 1 compressed, 0 skipped (output existed), 0 failed and copied unchanged, 1 unreadable" in text.out
    assert f"  failed: {src / 'loop.mp4'}: not a file (a symlink loop or a dangling symlink)" in text.out
    assert "Traceback" not in text.err
    assert sorted(p.name for p in out.iterdir()) == ["a.mp4"]  # nothing written for it, nothing recorded
