"""util.py: logger formats, launcher detection, seeding and RNG state round trips, atomic writes."""

import logging
import os
import random
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

import util


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_logger_file_format_and_replacement(tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    logger = util.get_logger(first)
    assert logger.name == "logger" and logger.level == logging.DEBUG
    logger.info("hello %d", 1)
    logger = util.get_logger(second)  # a second run in the same process writes only its own file
    logger.debug("world")
    for handler in logging.getLogger().handlers:
        handler.flush()
    a, b = first.read_text(), second.read_text()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}:INFO: hello 1\n", a)
    assert "world" not in a
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}:DEBUG: world\n", b)
    util.get_logger(None)
    assert not any(getattr(h, "clip4clip_log_file", False) for h in logging.getLogger().handlers)


def test_no_launcher_is_one_process_without_group(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = util.init_distributed(local_rank_flag=3)
    assert (info.rank, info.local_rank, info.world_size, info.initialized) == (0, 0, 1, False)
    assert info.device == torch.device("cpu")
    assert not dist.is_initialized()
    assert util.get_world_size() == 1 and util.is_main_process()
    assert util.all_gather_objects({"x": 1}) == [{"x": 1}]
    assert util.gather_objects(5) == [5]
    assert util.broadcast_object("a") == "a"


def test_launcher_env_gives_a_gloo_group(monkeypatch):
    # The legacy launcher sets RANK/WORLD_SIZE but passes the local rank as --local_rank.
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    try:
        info = util.init_distributed(local_rank_flag=0)
        assert info.initialized and dist.is_initialized() and dist.get_backend() == "gloo"
        assert (info.rank, info.world_size) == (0, 1)
        assert util.all_gather_objects([1, 2]) == [[1, 2]]
    finally:
        util.cleanup_distributed()
    assert not dist.is_initialized()


def _draw():
    return random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3)


def test_seed_and_rng_state_round_trip_through_weights_only_file(tmp_path):
    util.set_seed(7)
    first = _draw()
    util.set_seed(7)
    assert _draw()[:3] == first[:3]
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark

    np.random.randn()  # leaves a cached gaussian in numpy's state
    state = util.get_rng_state()
    path = tmp_path / "rng.bin"
    torch.save({"rng": state}, path)
    expected = _draw()
    _draw()
    util.set_rng_state(torch.load(path, weights_only=True)["rng"])
    again = _draw()
    assert again[:3] == expected[:3] and torch.equal(again[3], expected[3])


def test_preserved_rng_leaves_streams_untouched():
    util.set_seed(1)
    with util.preserved_rng():
        _draw()
        _draw()
    inside_skipped = _draw()
    util.set_seed(1)
    plain = _draw()
    assert inside_skipped[:3] == plain[:3] and torch.equal(inside_skipped[3], plain[3])


def _atomic_torch_save(obj, path):
    with util.atomic_path(path) as tmp:
        torch.save(obj, tmp)


def test_atomic_save_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "pytorch_model.bin.0"
    _atomic_torch_save({"w": torch.ones(2)}, path)
    _atomic_torch_save({"w": torch.zeros(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.zeros(2))
    util.atomic_write_text("{}\n", tmp_path / "m.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "pytorch_model.bin.0"]


def test_atomic_save_failure_keeps_previous_file(tmp_path):
    path = tmp_path / "pytorch_opt.bin.0"
    _atomic_torch_save({"epoch": 0}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _atomic_torch_save({"bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"epoch": 0}
    assert [p.name for p in tmp_path.iterdir()] == ["pytorch_opt.bin.0"]


def test_nested_atomic_paths_commit_together_or_not_at_all(tmp_path):
    model, opt = tmp_path / "pytorch_model.bin.1", tmp_path / "pytorch_opt.bin.1"
    with pytest.raises(OSError, match="disk full"):
        with util.atomic_path(model) as model_tmp, util.atomic_path(opt) as opt_tmp:
            model_tmp.write_bytes(b"model")
            opt_tmp.write_bytes(b"half")
            raise OSError(28, "disk full")
    assert list(tmp_path.iterdir()) == []
    with util.atomic_path(model) as model_tmp, util.atomic_path(opt) as opt_tmp:
        assert model_tmp.parent == tmp_path and model_tmp.name.startswith(".pytorch_model.bin.1.")
        model_tmp.write_bytes(b"model")
        opt_tmp.write_bytes(b"opt")
        assert not model.exists() and not opt.exists()  # nothing is visible before the block ends
    assert (model.read_bytes(), opt.read_bytes()) == (b"model", b"opt")
    assert util.temporary_path(tmp_path / "a.mp4").suffix == ".mp4"  # ffmpeg picks the container from it


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".pytorch_model.bin.0.{dead_pid}.0123abcd.tmp.0"
    live = tmp_path / f".pytorch_opt.bin.0.{os.getpid()}.0123abcd.tmp.0"
    mine = tmp_path / ".hidden.tmp"  # not one of ours: no pid and token
    for path in (stale, live, mine):
        path.write_bytes(b"x")
    assert util.remove_stale_temporaries(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, mine.name])


class _Opaque:
    """Any class: weights_only refuses to rebuild it."""


def test_torch_files_are_read_without_code_and_bad_ones_named_in_one_line(tmp_path):
    good = tmp_path / "good.bin"
    torch.save({"w": torch.arange(3.0)}, good)
    assert torch.equal(util.read_state_dict(good, "--init_model")["w"], torch.arange(3.0))
    objects, text, empty, listing = (tmp_path / n for n in ("objects.bin", "text.bin", "empty.bin", "list.bin"))
    torch.save({"w": _Opaque()}, objects)
    text.write_text("hello")
    empty.write_bytes(b"")
    torch.save([torch.zeros(1)], listing)
    cases = [
        (objects, "holds Python objects besides tensors"),
        (text, "not a torch.save file, or a truncated one"),
        (empty, "not a torch.save file, or a truncated one: EOFError"),
        (tmp_path / "missing.bin", "no such file"),
        (listing, "expected a state dict (name → tensor), got list"),
    ]
    for path, message in cases:
        with pytest.raises(util.UsageError) as info:
            util.read_state_dict(path, "--init_model")
        assert str(info.value).startswith(f"--init_model {path}: ") and message in str(info.value)
        assert "\n" not in str(info.value) and "weights_only=False" not in str(info.value)


def test_append_line_adds_whole_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    util.append_line('{"a": 1}', path)
    util.append_line('{"b": "é"}\n', path)  # a trailing newline is not doubled
    assert path.read_text(encoding="utf-8") == '{"a": 1}\n{"b": "é"}\n'


def test_any_rank_is_the_flag_itself_in_one_process():
    assert util.any_rank(True) is True and util.any_rank(False) is False
