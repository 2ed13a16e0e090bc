"""preprocess/check_dataset.py: exit status and report on a good and on broken layouts."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_lying_avi, write_video

from preprocess import check_dataset

ROOT = Path(__file__).resolve().parents[1]


def msvd_layout(root: Path) -> Path:
    """Three train videos (2 captions each), one val, two test; clips of 3 s and 2 s at 10 fps."""
    long_clip = write_video(root / "src" / "long.avi", n_frames=30, fps=10, size=(40, 32))
    short_clip = write_video(root / "src" / "short.avi", n_frames=20, fps=10, size=(40, 32), seed=1)
    splits = {"train": ["a", "b", "c"], "val": ["d"], "test": ["e", "f"]}
    captions = {}
    for subset, ids in splits.items():
        (root / f"{subset}_list.txt").write_text("\n".join(ids) + "\n")
        for i, v in enumerate(ids):
            captions[v] = [["a", "caption", v], ["another", v]]
            (root / "videos").mkdir(exist_ok=True)
            os.symlink(long_clip if i % 2 == 0 else short_clip, root / "videos" / f"{v}.avi")
    (root / "raw-captions.pkl").write_bytes(pickle.dumps(captions))
    return root


def run(root: Path, capsys, *extra: str):
    code = check_dataset.main(
        [
            "--datatype",
            "msvd",
            "--data_path",
            str(root),
            "--features_path",
            str(root / "videos"),
            "--max_frames",
            "4",
            "--image_resolution",
            "32",
            "--num_workers",
            "0",
            *extra,
        ]
    )
    return code, capsys.readouterr()


def test_good_layout_passes(tmp_path, capsys):
    code, out = run(msvd_layout(tmp_path), capsys)
    report = out.out
    assert code == 0, report
    assert "train: 6 samples (captions), 3 videos" in report
    assert "val  : 2 samples (captions), 1 videos" in report
    assert "test : 4 samples (captions), 2 videos" in report
    assert "Videos: 6 found, 0 missing, 0 undecodable" in report
    assert "Duration (s): min 2.00  median 3.00  mean 2.67  max 3.00" in report
    assert "FPS:          min 10.00  median 10.00  mean 10.00  max 10.00" in report
    assert "Result: OK" in report


def test_missing_and_undecodable_videos_fail(tmp_path, capsys):
    root = msvd_layout(tmp_path)
    os.remove(root / "videos" / "b.avi")
    os.remove(root / "videos" / "e.avi")
    (root / "videos" / "e.mp4").write_bytes(b"\x00\x01 not a video" * 10)
    code, out = run(root, capsys, "--num_workers", "2")
    report = out.out
    assert code == 1
    assert "train: 4 samples (captions), 2 videos present, 1 missing" in report
    assert "Videos: 5 found, 1 missing, 1 undecodable" in report
    assert f"missing (no file under {root / 'videos'}): b" in report
    assert "undecodable (no frame read): " + str(root / "videos" / "e.mp4") in report
    assert "Result: problems found" in report


def test_malformed_annotation_fails_naming_the_file(tmp_path, capsys):
    root = msvd_layout(tmp_path)
    (root / "raw-captions.pkl").write_bytes(pickle.dumps({"a": "not a list"}))
    code, out = run(root, capsys)
    assert code == 1
    assert "train: annotation error: " + str(root / "raw-captions.pkl") + ", key 'a'" in out.out


def test_runs_as_a_script_from_the_repository_root(tmp_path):
    root = msvd_layout(tmp_path)
    done = subprocess.run(
        [
            sys.executable,
            "preprocess/check_dataset.py",
            "--datatype",
            "msvd",
            "--data_path",
            str(root),
            "--features_path",
            str(root / "nowhere"),
            "--num_workers",
            "0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert "not a directory" in done.stdout and "--features_path" in done.stdout


def test_file_name_that_is_not_utf8_is_probed_not_a_crash(tmp_path):
    clip = write_video(tmp_path / "clip.avi", n_frames=30, fps=10, size=(40, 32))
    odd = os.fsdecode(os.fsencode(str(tmp_path)) + b"/odd\xff.avi")  # cv2 segfaults on this name as a str
    os.symlink(clip, odd)
    check_dataset._init_worker(1, 32, 4, 0)
    result = check_dataset.probe((odd, None, None))
    # seconds 0..3 inclusive at one frame each: frames 0, 10, 20; frame 30 does not exist
    assert result == {"fps": 10.0, "duration": 3.0, "error": None, "n_frames": 3}


def test_header_only_csv_is_an_annotation_error(tmp_path, capsys):
    (tmp_path / "videos").mkdir()
    (tmp_path / "val.csv").write_text("key,vid_key,video_id,sentence\n")
    code = check_dataset.main(
        [
            "--datatype",
            "msrvtt",
            "--val_csv",
            str(tmp_path / "val.csv"),
            "--train_csv",
            str(tmp_path / "val.csv"),
            "--data_path",
            str(tmp_path / "none.json"),
            "--features_path",
            str(tmp_path / "videos"),
            "--num_workers",
            "0",
        ]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert (
        f"val  : annotation error: {tmp_path / 'val.csv'}, line 2: expected at least one row "
        f"after the header, got 'no rows'" in out
    )


def test_impossible_header_is_listed_undecodable_a_folder_and_a_dangling_symlink_missing(tmp_path, capsys):
    root = msvd_layout(tmp_path)
    os.remove(root / "videos" / "a.avi")
    write_lying_avi(root / "videos" / "a.avi", 8, 2**31)  # indexing its header's count once took 8.4 GB
    os.remove(root / "videos" / "b.avi")
    (root / "videos" / "b.avi").mkdir()
    os.remove(root / "videos" / "c.avi")
    os.symlink(root / "gone.avi", root / "videos" / "c.avi")
    code, out = run(root, capsys)
    assert code == 1 and "Traceback" not in out.out + out.err
    videos = root / "videos"
    # A folder or a dangling symlink is no video file: the data set's scan counts it as missing.
    assert "Videos: 4 found, 2 missing, 1 undecodable" in out.out
    assert f"missing (no file under {videos}): b, c" in out.out
    assert (
        f"{videos / 'a.avi'} (UnreadableVideoError: {videos / 'a.avi'}: the header claims 2147483648 frames, more "
        "than the 16777216 accepted; the file is damaged or not a video)" in out.out
    )
    assert "Duration (s): min 2.00  median 3.00  mean 2.67  max 3.00" in out.out  # the three good videos only


@pytest.mark.parametrize(
    "flag, value, least",
    [
        ("--max_frames", "0", 1),
        ("--feature_framerate", "-1", 0),
        ("--image_resolution", "0", 1),
        ("--max_words", "2", 3),
    ],
)
def test_out_of_range_argument_is_one_argument_error(tmp_path, capsys, flag, value, least):
    root = msvd_layout(tmp_path)
    with pytest.raises(SystemExit) as stop:
        run(root, capsys, flag, value)
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err.splitlines()[-1].endswith(f": error: argument {flag}: must be at least {least}, got {value}")
    assert "Traceback" not in err and "undecodable" not in capsys.readouterr().out
