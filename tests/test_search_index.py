"""search/index.py: the index files, their checks, and the incremental bookkeeping."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from search.index import COMMIT_LOCK, FileStat, Index, load_index, plan_update, save_index, scan_videos
from search.settings import DEFAULT_SAMPLING, IndexSettings, ModelSpec
from util import UsageError


# --------------------------------------------------------------------------------------------------- index files
def _index(n: int, dim: int = 4, seed: int = 0) -> Index:
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, dim)).astype(np.float32)
    videos = [{"path": f"v{i}.mp4", "size": 10 + i, "mtime_ns": 100 + i, "frames": 3} for i in range(n)]
    model = ModelSpec(None, "ViT-B/32", "meanP", "2d", "0" * 64)
    return Index(IndexSettings("/videos", model, DEFAULT_SAMPLING), videos, [], emb)


def test_index_files_are_plain_json_and_npy_and_replaced_whole(tmp_path):
    first = _index(3)
    save_index(tmp_path, first)
    second = _index(5, seed=1)
    second.unreadable = [{"path": "bad.mp4", "size": 1, "mtime_ns": 2, "error": "no frame could be decoded"}]
    save_index(tmp_path, second)

    names = sorted(p.name for p in tmp_path.iterdir() if p.name != COMMIT_LOCK)
    assert len(names) == 2 and names[1] == "index.json" and names[0].startswith("embeddings-")  # old file, no tmp
    manifest = json.loads((tmp_path / "index.json").read_text())
    assert manifest["embeddings"] == names[0] and manifest["unreadable"] == second.unreadable
    np.testing.assert_array_equal(np.load(tmp_path / names[0], allow_pickle=False), second.embeddings)
    loaded = load_index(tmp_path, mmap=True)
    assert loaded.videos == second.videos and loaded.settings == second.settings
    np.testing.assert_array_equal(loaded.embeddings, second.embeddings)


def test_load_index_errors_name_the_file(tmp_path):
    with pytest.raises(UsageError, match="index.json not found"):
        load_index(tmp_path)
    save_index(tmp_path, _index(3))
    manifest = json.loads((tmp_path / "index.json").read_text())
    manifest["videos"].pop()
    (tmp_path / "index.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match=r"embeddings-.*\.npy: expected float32 of shape \(2, D\)"):
        load_index(tmp_path)
    (tmp_path / "index.json").write_text("{")
    with pytest.raises(UsageError, match="index.json: not valid JSON"):
        load_index(tmp_path)


def _damage(directory: Path, change) -> None:
    manifest = json.loads((directory / "index.json").read_text())
    change(manifest)
    (directory / "index.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m["settings"].pop("sampling"), r"settings: expected 'sampling' of type dict, found missing"),
        (lambda m: m["settings"]["model"].pop("fingerprint"), r"settings\.model: expected 'fingerprint' of type str"),
        (
            lambda m: m["settings"]["sampling"].update(max_frames="4"),
            r"settings\.sampling: expected 'max_frames' of type "
            r"int, found '4'",
        ),
        (lambda m: m["videos"][1].pop("path"), r"videos\[1\]: expected 'path' of type str, found missing"),
        (lambda m: m["videos"].__setitem__(0, "v0.mp4"), r"videos\[0\]: expected an object with"),
        (lambda m: m["unreadable"].append({"path": "x.mp4"}), r"unreadable\[0\]: expected 'size' of type int"),
        (lambda m: m.update(embeddings="../elsewhere.npy"), r"embeddings: expected a file name in the index directory"),
        (lambda m: m.update(settings=[]), r"settings: expected an object"),
        (
            lambda m: m["videos"][2].update(path="../../../etc/passwd"),
            r"videos\[2\]: path '\.\./\.\./\.\./etc/passwd' is not",
        ),
        (lambda m: m["videos"][0].update(path="/etc/shadow"), r"videos\[0\]: path '/etc/shadow' is not a relative"),
        (lambda m: m["videos"][1].update(path="a/../../b.mp4"), r"videos\[1\]: path 'a/\.\./\.\./b\.mp4' is not"),
        (lambda m: m["videos"][1].update(path=""), r"videos\[1\]: path '' is not a relative path inside"),
        (
            lambda m: m["unreadable"].append({"path": "/x.mp4", "size": 1, "mtime_ns": 1, "error": "e"}),
            r"unreadable\[0\]: path '/x",
        ),
        (lambda m: m["videos"][0].update(real="rel/a.mp4"), r"videos\[0\]: expected 'real' to be an absolute path"),
    ],
)
def test_damaged_manifest_is_one_line_naming_the_file_and_field(tmp_path, change, message):
    save_index(tmp_path, _index(3))
    _damage(tmp_path, change)
    with pytest.raises(UsageError, match=r"index\.json: " + message) as err:
        load_index(tmp_path)
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not a readable .npy array"),
        (b"\x93NUMPY garbage", "not a readable .npy array"),
    ],
)
def test_damaged_embeddings_file_is_named(tmp_path, content, message):
    save_index(tmp_path, _index(3))
    emb = next(tmp_path.glob("embeddings-*.npy"))
    emb.write_bytes(content)
    with pytest.raises(UsageError, match=emb.name + ": " + message):
        load_index(tmp_path, mmap=True)
    np.save(emb, np.zeros((3, 4, 1), dtype=np.float32))
    with pytest.raises(
        UsageError,
        match=emb.name + r": expected float32 of shape \(3, D\), found float32 "
        r"\(3, 4, 1\)",
    ):
        load_index(tmp_path)


def test_plan_update_keeps_unchanged_encodes_new_and_changed_drops_removed():
    old = _index(3)  # v0 (10, 100), v1 (11, 101), v2 (12, 102)
    old.unreadable = [
        {"path": "bad.mp4", "size": 5, "mtime_ns": 5, "error": "x"},
        {"path": "fixed.mp4", "size": 5, "mtime_ns": 5, "error": "x"},
        {"path": "gone.mp4", "size": 5, "mtime_ns": 5, "error": "x"},
    ]
    old.videos[3:] = [{"path": "v3.mp4", "size": 13, "mtime_ns": 103, "frames": 3, "real": "/data/v3.mp4"}]
    old.embeddings = np.zeros((4, 4), dtype=np.float32)
    stats = {
        "bad.mp4": (5, 5),
        "fixed.mp4": (6, 9),
        "new.mp4": (1, 1),
        "v0.mp4": (10, 100),  # no real path recorded (an older index): kept on size and time
        "v1.mp4": (11, 999),
        "v2.mp4": (99, 102),
        "v3.mp4": (13, 103),  # a symlink swapped for one to another file of the same size and time
    }
    found = {path: FileStat(*stat, f"/data/{path}") for path, stat in stats.items()}
    found["v3.mp4"] = FileStat(13, 103, "/etc/v3.mp4")
    plan = plan_update(old, found)
    assert plan.keep == [0]
    assert plan.encode == ["fixed.mp4", "new.mp4", "v1.mp4", "v2.mp4", "v3.mp4"]
    assert plan.removed == ["gone.mp4"]
    assert [u["path"] for u in plan.still_unreadable] == ["bad.mp4"]
    assert plan_update(None, found).encode == sorted(found)


def test_scan_videos_is_recursive_and_skips_other_files(tmp_path):
    for rel in ("a.mp4", "sub/deeper/B.MKV", "sub/notes.txt", "c.webm"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"12345")
    (tmp_path / "dangling.mp4").symlink_to(tmp_path / "nowhere.mp4")
    (tmp_path / "loop.mp4").symlink_to(tmp_path / "loop.mp4")
    data = tmp_path.parent / f"{tmp_path.name}-drive"
    data.mkdir()
    (data / "real.mp4").write_bytes(b"123")
    (tmp_path / "linked.mp4").symlink_to(data / "real.mp4")  # a folder of links to a data drive
    found, errors = scan_videos(tmp_path)
    assert list(found) == ["a.mp4", "c.webm", "linked.mp4", "sub/deeper/B.MKV"]
    st = (tmp_path / "a.mp4").stat()
    assert found["a.mp4"] == (5, st.st_mtime_ns, str((tmp_path / "a.mp4").resolve()))
    assert found["linked.mp4"].real == str((data / "real.mp4").resolve()) and found["linked.mp4"].size == 3
    assert list(errors) == ["dangling.mp4", "loop.mp4"] and "FileNotFoundError" in errors["dangling.mp4"]


def test_a_format_1_manifest_reads_into_typed_settings_and_writes_back_unchanged(tmp_path):
    """An index.json as the first release wrote it (format 1) keeps working, and is rewritten the same way."""
    settings = {
        "videos_root": "/data/videos",
        "model": {
            "init_model": "/ckpt/pytorch_model.bin.1",
            "pretrained_clip_name": "ViT-B/32",
            "sim_header": "seqTransf",
            "linear_patch": "2d",
            "fingerprint": "ab" * 32,
        },
        "sampling": {"max_frames": 8, "feature_framerate": 2, "slice_framepos": 0},
    }
    videos = [{"path": "a.mp4", "size": 3, "mtime_ns": 4, "frames": 8}]
    np.save(tmp_path / "embeddings-0123456789ab.npy", np.eye(1, 4, dtype=np.float32))
    manifest = {"format": 1, "embeddings": "embeddings-0123456789ab.npy", "settings": settings, "videos": videos}
    (tmp_path / "index.json").write_text(json.dumps({**manifest, "unreadable": []}, indent=1))
    index = load_index(tmp_path)
    assert index.settings.model == ModelSpec("/ckpt/pytorch_model.bin.1", "ViT-B/32", "seqTransf", "2d", "ab" * 32)
    assert (index.settings.sampling.max_frames, index.settings.sampling.feature_framerate) == (8, 2)
    assert index.settings.sampling.slice_framepos == 0 and index.root == Path("/data/videos")
    save_index(tmp_path, index)
    assert json.loads((tmp_path / "index.json").read_text())["settings"] == settings


def test_non_finite_embeddings_are_refused_naming_the_rows(tmp_path):
    index = _index(4)
    index.embeddings[1, 2] = np.nan
    index.embeddings[3, 0] = np.inf
    save_index(tmp_path, index)
    with pytest.raises(
        UsageError, match=r"embeddings-.*\.npy: rows 1 \('v1\.mp4'\), 3 \('v3\.mp4'\) hold non-finite"
    ) as err:
        load_index(tmp_path, mmap=True)
    assert len(str(err.value).splitlines()) == 1
