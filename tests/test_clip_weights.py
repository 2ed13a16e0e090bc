"""CLIP weights: names and files to state dicts, OpenAI's TorchScript archives read without running their code."""

from __future__ import annotations

import pickle
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_clip_state_dict
from torch import nn

from modules import clip_weights
from modules.clip_archive import read_torchscript_archive
from modules.clip_weights import clip_weight_shapes, load_clip_state_dict, load_state_dict_file, weight_file_format
from modules.module_clip import CLIP, build_model, clip_config_from_state_dict
from util import UsageError

REPO = Path(__file__).resolve().parents[1]


def make_texts(lengths: list[int]) -> torch.Tensor:
    """(len(lengths), 77) ids: start token, words, end token (the largest id) at position length-1, zero padding."""
    ids = torch.zeros(len(lengths), 77, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.arange(1, n + 1)
        ids[row, 0], ids[row, n - 1] = 49406, 49407
    return ids


def images(n: int, size: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


class _Holder(nn.Module):
    """A bare module tree, so a scripted archive carries tensors under OpenAI's dotted names."""


def save_torchscript(state_dict: dict[str, torch.Tensor], path: Path) -> Path:
    root = _Holder()
    for key, value in state_dict.items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if not hasattr(module, name):
                module.add_module(name, _Holder())
            module = getattr(module, name)
        module.register_buffer(leaf, value.clone())
    with warnings.catch_warnings():  # torch.jit.script is deprecated, but OpenAI's files are TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(root).save(str(path))
        assert torch.jit.load(str(path)).state_dict().keys() == state_dict.keys()
    return path


class _Hostile(nn.Module):
    """A module whose TorchScript ``__setstate__`` prints a marker when ``torch.jit.load`` restores it."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.arange(6, dtype=torch.float32).view(3, 2))
        self.register_buffer("scale", torch.tensor([0.5, -2.0], dtype=torch.float16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()

    @torch.jit.export
    def __getstate__(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "scale": self.scale}

    @torch.jit.export
    def __setstate__(self, state: dict[str, torch.Tensor]) -> None:
        print("HOSTILE-SETSTATE-RAN")
        self.weight = state["weight"]
        self.scale = state["scale"]
        self.training = False


class _HostileHolder(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = _Hostile()
        self.proj = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + self.proj(x)


def test_torchscript_archive_is_read_without_running_its_code(tmp_path, capfd):
    torch.manual_seed(0)
    holder = _HostileHolder()
    path = tmp_path / "hostile.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(holder).save(str(path))
        torch.jit.load(str(path))
    assert "HOSTILE-SETSTATE-RAN" in capfd.readouterr().out  # the archive really runs code under torch.jit.load

    loaded = read_torchscript_archive(path)
    with pytest.raises(UsageError, match="hostile.pt: a TorchScript archive, but not OpenAI's ViT CLIP"):
        load_state_dict_file(path)
    assert "HOSTILE-SETSTATE-RAN" not in capfd.readouterr().out
    expected = {
        "inner.weight": holder.inner.weight,
        "inner.scale": holder.inner.scale,
        "proj.weight": holder.proj.weight,
        "proj.bias": holder.proj.bias,
    }
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value.detach())


def test_torchscript_archive_refers_only_to_tensors(tmp_path):
    path = tmp_path / "jit.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(_HostileHolder()).save(str(path))
    # Rewrite data.pkl so it names os.system: the reader refuses it instead of looking it up.
    with zipfile.ZipFile(path) as archive:
        entries = {n: archive.read(n) for n in archive.namelist()}
    data_pkl = next(n for n in entries if n.endswith("/data.pkl"))
    entries[data_pkl] = pickle.dumps(__import__("os").system, protocol=2)
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    with pytest.raises(UsageError, match="jit.pt .*refers to (posix|nt).system"):
        load_state_dict_file(path)


def test_torchscript_and_plain_files_load_identically(tmp_path):
    sd = make_clip_state_dict(jit_extras=True, seed=3)
    jit_file = save_torchscript(sd, tmp_path / "jit.pt")
    plain_file = tmp_path / "plain.pt"
    torch.save(sd, plain_file)
    wrapped_file = tmp_path / "wrapped.pt"
    torch.save({"state_dict": sd, "epoch": 3}, wrapped_file)

    loaded = [CLIP.get_config(str(f)) for f in (jit_file, plain_file, wrapped_file)]
    weights = {k for k in sd if k not in ("input_resolution", "context_length", "vocab_size")}
    assert loaded[0].keys() == sd.keys()  # the archive as torch.jit.load gives it
    for d in loaded:
        assert d.keys() - weights <= {"input_resolution", "context_length", "vocab_size"} and weights <= d.keys()
        assert all(torch.equal(d[k], sd[k]) for k in weights)

    ids = make_texts([5, 9])
    image = images(2, 32)
    outputs = []
    for d in loaded:
        model = build_model(d)
        assert not model.training and model.dtype == torch.float16
        with torch.no_grad():
            outputs.append((model.encode_image(image), model.encode_text(ids)))
    assert "input_resolution" in loaded[0]  # build_model leaves the caller's dict intact
    for image_features, text_features in outputs[1:]:
        assert torch.equal(image_features, outputs[0][0]) and torch.equal(text_features, outputs[0][1])
    assert outputs[0][0].dtype == torch.float16 and torch.isfinite(outputs[0][0]).all()


def test_name_and_file_errors_are_one_usage_line(tmp_path, monkeypatch, tiny_clip_file):
    monkeypatch.setattr(clip_weights, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(UsageError) as err:
        CLIP.get_config("ViT-B/32")
    message = str(err.value)
    assert str(tmp_path / "ViT-B-32.pt") in message
    assert f"wget -P {tmp_path} https://openaipublic.azureedge.net/clip/models/40d3657" in message

    with pytest.raises(UsageError) as err:
        load_clip_state_dict("ViT-L/14")
    assert "\n" not in str(err.value)
    for name in ("ViT-B/32", "ViT-B/16", "tiny-random-ViT/16"):
        assert name in str(err.value)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a weights file" * 10)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(tiny_clip_file.read_bytes()[:100_000])
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    jit_truncated = tmp_path / "jit-truncated.pt"
    jit_truncated.write_bytes(save_torchscript(make_clip_state_dict(), tmp_path / "jit.pt").read_bytes()[:50_000])
    for bad in (garbage, truncated, empty, jit_truncated):
        with pytest.raises(UsageError, match="cannot read CLIP weights from .*" + bad.name):
            CLIP.get_config(str(bad))

    not_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_dict)
    with pytest.raises(UsageError, match="list.pt: expected a state dict"):
        CLIP.get_config(str(not_dict))


def test_weight_file_format_tells_torchscript_from_torch_save(tmp_path):
    sd = make_clip_state_dict(seed=4)
    plain = tmp_path / "plain.pt"
    torch.save(sd, plain)
    assert weight_file_format(save_torchscript(sd, tmp_path / "jit.pt")) == "torchscript"
    assert weight_file_format(plain) == "torch.save"  # a zip too, but without TorchScript code
    legacy = tmp_path / "legacy.pt"
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)
    assert weight_file_format(legacy) == "torch.save"


def test_known_name_reads_its_file_from_weights_dir(tmp_path, monkeypatch, tiny_clip_state_dict):
    monkeypatch.setattr(clip_weights, "WEIGHTS_DIR", tmp_path)
    torch.save(tiny_clip_state_dict, tmp_path / "ViT-B-16.pt")
    loaded = CLIP.get_config("ViT-B/16")
    assert loaded.keys() == tiny_clip_state_dict.keys()
    assert all(torch.equal(loaded[k], tiny_clip_state_dict[k]) for k in loaded)


# ---------------------------------------------------------------------------------------------------------------------
# which CLIP a CLIP4Clip checkpoint is built on


def _tiny_checkpoint(scale: float = 1.0) -> dict[str, torch.Tensor]:
    """A CLIP4Clip-style checkpoint holding every weight of the tiny CLIP (scaled, so its values are its own)."""
    from modules.tiny_clip import tiny_state_dict

    return {"clip." + k: v * scale for k, v in tiny_state_dict("tiny-random-ViT/16").items()}


def _unreadable(name: str):
    raise AssertionError(f"read {name}")


def test_self_contained_checkpoint_is_built_on_its_own_clip(monkeypatch, caplog):
    checkpoint = _tiny_checkpoint(scale=2.0)
    monkeypatch.setattr(clip_weights, "load_clip_state_dict", _unreadable)  # the named CLIP is never read
    clip = clip_weights.clip_for_checkpoint("ViT-B/32", checkpoint, "ckpt.bin")
    assert clip.keys() == {k[len("clip.") :] for k in checkpoint}
    assert all(torch.equal(clip[k[len("clip.") :]], v) for k, v in checkpoint.items())
    assert "ckpt.bin holds its own CLIP, not ViT-B/32 (another architecture)" in caplog.text
    caplog.clear()
    clip_weights.clip_for_checkpoint("tiny-random-ViT/16", checkpoint, "ckpt.bin")
    assert caplog.text == ""  # the same architecture: nothing to say


def test_new_head_copies_come_from_the_named_clip_when_it_fits():
    from modules.tiny_clip import tiny_state_dict

    checkpoint = _tiny_checkpoint(scale=2.0)
    clip = clip_weights.clip_for_checkpoint("tiny-random-ViT/16", checkpoint, "ckpt", copies_from_clip=True)
    pristine = tiny_state_dict("tiny-random-ViT/16")
    assert all(torch.equal(clip[k], pristine[k]) for k in pristine)  # as the original: the CLIP file's text tower
    own = clip_weights.clip_for_checkpoint("ViT-B/32", checkpoint, "ckpt", copies_from_clip=True)
    assert torch.equal(own["positional_embedding"], checkpoint["clip.positional_embedding"])


def test_checkpoint_lacking_clip_weights_names_what_it_lacks(monkeypatch, tmp_path):
    monkeypatch.setattr(clip_weights, "WEIGHTS_DIR", tmp_path)  # ViT-B/32's file is absent
    with pytest.raises(UsageError) as none:
        clip_weights.clip_for_checkpoint("ViT-B/32", {"image_adapter.w": torch.zeros(1)}, "--init_model a.bin")
    assert str(none.value).startswith("--init_model a.bin holds no complete CLIP (none at all); pass --pretrained_clip")
    assert "ViT-B/32 not found" in str(none.value) and "\n" not in str(none.value)
    partial = _tiny_checkpoint()
    del partial["clip.ln_final.bias"], partial["clip.text_projection"]
    with pytest.raises(UsageError, match=r"only some: it lacks ln_final.bias, text_projection\)"):
        clip_weights.clip_for_checkpoint("ViT-B/32", partial, "--init_model a.bin")
    filled = clip_weights.clip_for_checkpoint("tiny-random-ViT/16", partial, "--init_model a.bin")
    assert "text_projection" in filled  # the named CLIP supplies what the checkpoint lacks


def test_self_contained_checkpoint_needs_no_clip_file_for_its_image_size(tmp_path):
    path = tmp_path / "ckpt.bin"
    torch.save({**_tiny_checkpoint(), "transformerClip.w": torch.zeros(1)}, path)
    assert clip_weights.checkpoint_image_resolution(path) == 64
    torch.save({"image_adapter.w": torch.zeros(1)}, path)
    assert clip_weights.checkpoint_image_resolution(path) is None


# ---------------------------------------------------------------------------------------------------------------------
# the formats people have, through the command lines


def _write_open_clip(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """open_clip's training checkpoint layout: DDP prefix, model name, epoch."""
    torch.save(
        {"epoch": 1, "name": "ViT-B-16-quickgelu", "state_dict": {"module." + k: v for k, v in state.items()}}, path
    )
    return path


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    _run("preprocess/make_synthetic_dataset.py", "--output_dir", str(out), "--datasets", "msrvtt", "--seed", "0",
         "--num_train", "8", "--num_test", "4", "--num_val", "2")  # fmt: skip
    return out / "msrvtt"


@pytest.mark.parametrize("fmt", ["transformers", "open_clip"])
def test_clip_of_another_format_trains_and_indexes(tmp_path, tiny_data, fmt):
    from modules.clip_formats import write_hf_clip
    from modules.tiny_clip import tiny_state_dict

    tiny = tiny_state_dict("tiny-random-ViT/16")
    if fmt == "transformers":
        write_hf_clip(tmp_path / "hf", tiny)
        clip = tmp_path / "hf"
    else:
        clip = _write_open_clip(tmp_path / "open_clip.pt", tiny)
    m = tiny_data
    _run(
        "main_task_retrieval.py", "--do_train", "--epochs", "1", "--batch_size", "8",
        "--train_csv", str(m / "MSRVTT_train.9k.csv"), "--val_csv", str(m / "MSRVTT_JSFUSION_test.csv"),
        "--data_path", str(m / "MSRVTT_data.json"), "--features_path", str(m / "videos"), "--num_thread_reader", "0",
        "--pretrained_clip_name", str(clip), "--max_words", "16", "--max_frames", "2", "--batch_size_val", "16", "--loose_type",
        "--output_dir", str(tmp_path / "run"),
    )  # fmt: skip
    assert (tmp_path / "run/pytorch_model.bin.0").is_file()
    for index, name in (("ours", str(clip)), ("named", "tiny-random-ViT/16")):
        _run("retrieve.py", "index", "--videos", str(m / "videos"), "--index", str(tmp_path / index),
             "--pretrained_clip_name", name, "--max_frames", "2", "--num_workers", "0")  # fmt: skip
    # The converted weights are the tiny CLIP's: the same embeddings as the named model, to fp32 rounding.
    ours, named = (np.load(next((tmp_path / index).glob("embeddings-*.npy"))) for index in ("ours", "named"))
    np.testing.assert_allclose(ours, named, atol=1e-5)


def test_a_torchscript_archive_that_is_not_a_clip_names_the_file(tmp_path):
    path = save_torchscript({"encoder.weight": torch.ones(2, 2), "encoder.bias": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(
        UsageError, match=rf"CLIP weights {tmp_path}/other\.pt: a TorchScript archive, but not OpenAI's"
    ):
        load_state_dict_file(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_clip_weights_holding_nan_or_inf_are_refused_naming_the_file(bad, tmp_path):
    sd = make_clip_state_dict()
    sd["visual.proj"] = sd["visual.proj"].clone()
    sd["visual.proj"][0, 0] = bad
    for path in (save_torchscript(sd, tmp_path / "jit.pt"), tmp_path / "plain.pt"):
        torch.save(sd, tmp_path / "plain.pt")
        with pytest.raises(UsageError, match=rf"CLIP weights {path}: weights hold NaN or Inf values \(visual\.proj\)"):
            load_state_dict_file(path)


def test_shapes_of_an_openai_archive_are_read_without_its_data(tmp_path, monkeypatch):
    """The frame size is known at start-up from the archive's directory alone; the data is read once, later."""
    sd = make_clip_state_dict(jit_extras=True, seed=4)
    path = save_torchscript(sd, tmp_path / "jit.pt")
    full = load_state_dict_file(path)
    data_reads = []
    real_read = zipfile.ZipFile.read
    monkeypatch.setattr(
        zipfile.ZipFile, "read", lambda self, name, *a: data_reads.append(name) or real_read(self, name, *a)
    )
    shapes = clip_weight_shapes(path)
    assert not [n for n in data_reads if "/data/" in n]  # only data.pkl (and the byte order) were read
    assert shapes.keys() == full.keys()
    assert all(shapes[k].shape == full[k].shape and shapes[k].device.type == "meta" for k in full)
    assert clip_config_from_state_dict(shapes) == clip_config_from_state_dict(full)
    # A storage whose stored size is wrong is refused without reading it, with the full read's message.
    with zipfile.ZipFile(path) as archive:
        entries = {n: real_read(archive, n) for n in archive.namelist()}
    key = next(n for n in entries if "/data/" in n and len(entries[n]) > 4)
    entries[key] = entries[key][:-4]
    broken = tmp_path / "broken.pt"
    with zipfile.ZipFile(broken, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    with pytest.raises(UsageError, match="broken.pt .*holds .* bytes, expected"):
        clip_weight_shapes(broken)
