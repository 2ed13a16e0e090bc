"""The run when the environment fails it: unreadable data, full disks, read-only folders, damaged files. Each ends
in one line naming the file or folder, an exit code, and the files written before it intact."""

import errno
import logging
import os
from pathlib import Path

import pytest
import torch
from conftest import make_clip_state_dict
from test_main_task_retrieval import msvd_args

import main_task_retrieval as mtr
import util


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


def full_disk(error_number: int):
    return OSError(error_number, os.strerror(error_number))


def test_a_full_disk_during_evaluation_is_one_line_and_keeps_the_checkpoint(setup, capsys, caplog, monkeypatch):
    import engine.run

    root, paths, clip = setup
    out = root / "full"
    disk = {"full": False}
    evaluate = engine.run.eval_epoch

    def evaluate_on_a_full_disk(*args, **kwargs):
        disk["full"] = True
        return evaluate(*args, **kwargs)

    def flush(self):
        if disk["full"]:
            raise full_disk(errno.ENOSPC)
        logging.FileHandler.flush(self)

    def atomic_write_text(text, path):
        raise full_disk(errno.ENOSPC)

    monkeypatch.setattr(engine.run, "eval_epoch", evaluate_on_a_full_disk)
    monkeypatch.setattr(util.LogFile, "flush", flush)
    monkeypatch.setattr(util, "atomic_write_text", atomic_write_text)
    with caplog.at_level(logging.WARNING, logger="logger"):
        assert mtr.main(msvd_args(paths, clip, out, "--do_train", "--epochs", "1")) == 1
    one_line_error(capsys, f"cannot write {out}/metrics_epoch0.json (No space left on device)")
    said = [r.getMessage() for r in caplog.records if "log.txt" in r.getMessage()]
    assert said == [f"cannot write {out}/log.txt (No space left on device); the log goes on on the console only"]
    assert "Model saved to" in (out / "log.txt").read_text()  # what was logged before the disk filled
    saved = torch.load(out / "pytorch_model.bin.0", weights_only=True)
    assert all(torch.isfinite(v).all() for v in saved.values() if v.is_floating_point())
    assert not (out / "metrics_epoch0.json").exists()


def test_an_output_folder_made_read_only_during_training_is_one_line(setup, capsys, tmp_path, monkeypatch):
    _, paths, clip = setup
    out = tmp_path / "out"

    def append_line(text, path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(util, "append_line", append_line)
    assert mtr.main(msvd_args(paths, clip, out, "--do_train", "--epochs", "1")) == 1
    one_line_error(capsys, f"cannot write {out}/metrics.jsonl (Permission denied)")
    assert "Epoch: 1/1, Step: 1/" in (out / "log.txt").read_text()  # the step it was recording
    assert not list(out.glob("pytorch_*")) and not (out / "metrics.jsonl").exists()


@pytest.fixture(scope="module")
def epoch0(setup):
    """A run of one epoch: its pytorch_model.bin.0 and pytorch_opt.bin.0."""
    root, paths, clip = setup
    out = root / "epoch0"
    assert mtr.main(msvd_args(paths, clip, out, "--do_train", "--epochs", "1")) == 0
    return out


def bad_moment(state: dict) -> dict:
    moments = state["optimizer_state_dict"]["state"]
    first = next(iter(moments))
    moments[first]["next_m"] = torch.zeros(3, 5)
    return state


def one_group_less(state: dict) -> dict:
    state["optimizer_state_dict"]["param_groups"].pop()
    return state


@pytest.mark.parametrize(
    "damage, message",
    [
        (bad_moment, "its optimizer state 'next_m' has shape (3, 5) for a weight of shape"),
        (one_group_less, "its optimizer state does not fit this model"),
    ],
)
def test_an_optimizer_file_of_another_model_is_named_before_training(damage, message, epoch0, setup, capsys, tmp_path):
    _, paths, clip = setup
    opt = tmp_path / "pytorch_opt.bin.0"
    torch.save(damage(torch.load(epoch0 / "pytorch_opt.bin.0", weights_only=True)), opt)
    out = tmp_path / "out"
    resume = ["--init_model", str(epoch0 / "pytorch_model.bin.0"), "--resume_model", str(opt)]
    assert mtr.main(msvd_args(paths, clip, out, "--do_train", "--epochs", "2", *resume)) == 2
    one_line_error(capsys, f"--resume_model {opt}: {message}")
    assert "Epoch: " not in (out / "log.txt").read_text() and not list(out.glob("pytorch_*"))


def test_a_folder_or_dangling_symlink_for_a_video_is_a_missing_video(setup, capsys, tmp_path):
    _, paths, clip = setup
    videos = tmp_path / "videos"
    videos.mkdir()
    test = (Path(paths["msvd_data_path"]) / "test_list.txt").read_text().split()
    for video in Path(paths["msvd_features_path"]).iterdir():
        (videos / video.name).symlink_to(video)
    folder, dangling = (next(videos.glob(f"{video_id}.*")) for video_id in test)
    folder.unlink()
    folder.mkdir()
    dangling.unlink()
    dangling.symlink_to(tmp_path / "gone.avi")
    args = msvd_args(paths, clip, tmp_path / "out", "--do_eval")
    args[args.index("--features_path") + 1] = str(videos)
    assert mtr.main(args) == 2
    one_line_error(capsys, "2 of 2 videos listed in ", f"have no file under {videos}: {test[0]}, {test[1]}")
    assert mtr.main([*args, "--skip_missing_videos"]) == 2  # nothing is left to evaluate
    one_line_error(capsys, "nothing is left to evaluate")
