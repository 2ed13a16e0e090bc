"""The run when the environment fails it: unreadable data, full disks, read-only folders, damaged files. Each ends
in one line naming the file or folder, an exit code, and the files written before it intact."""

from pathlib import Path

import pytest
import torch
from conftest import make_clip_state_dict
from test_main_task_retrieval import msvd_args

import main_task_retrieval as mtr


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from preprocess.make_synthetic_dataset import make_dataset

    root = tmp_path_factory.mktemp("faults")
    paths = make_dataset(root / "data", seed=0, num_train=4, num_val=2, num_test=2, size=32, fps=2, seconds=2)
    clip = root / "tiny-clip.pt"
    torch.save(make_clip_state_dict(), clip)
    return root, paths, clip


def one_line_error(capsys, *parts):
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err, err
    # The progress bar shares stderr; the error is the one line after it.
    err = err.strip().rsplit("\n", 1)[-1].rsplit("\r", 1)[-1]
    assert err.startswith("main_task_retrieval.py: error:"), err
    for part in parts:
        assert part in err, err
    return err


def train_ids(paths) -> list[str]:
    return (Path(paths["msvd_data_path"]) / "train_list.txt").read_text().split()


def test_every_training_video_undecodable_is_one_line_naming_the_folder(setup, capsys, tmp_path):
    _, paths, clip = setup
    videos = tmp_path / "videos"
    videos.mkdir()
    train = set(train_ids(paths))
    for video in Path(paths["msvd_features_path"]).iterdir():
        if video.stem in train:
            (videos / video.name).write_bytes(b"not a video at all")
        else:
            (videos / video.name).symlink_to(video)
    args = msvd_args(paths, clip, tmp_path / "out", "--do_train", "--epochs", "1", "--num_thread_reader", "1")
    args[args.index("--features_path") + 1] = str(videos)
    args[args.index("--num_thread_reader") + 1] = "1"  # the error comes back through a DataLoader worker
    assert mtr.main(args) == 1
    one_line_error(capsys, "samples in a row had no decodable frame", f"the videos under {videos}")
    assert not list((tmp_path / "out").glob("pytorch_*"))
