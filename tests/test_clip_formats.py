"""CLIP weights from transformers and open_clip: embeddings equal the libraries' own, refusals name what differs."""

from __future__ import annotations

import json

import pytest
import torch

from modules.clip_formats import (
    from_hf,
    read_clip_weights,
    read_exported,
    read_hf_clip,
    read_open_clip,
    to_hf,
    write_exported,
)
from modules.module_clip import build_model
from util import UsageError

transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")

# Small shapes: widths are multiples of 64 with width // 64 heads, as OpenAI's CLIP has them.
SMALL_TEXT = dict(hidden_size=128, intermediate_size=512, num_attention_heads=2, num_hidden_layers=2)
SMALL_TEXT.update(vocab_size=100, max_position_embeddings=16, bos_token_id=98, eos_token_id=99, pad_token_id=0)
SMALL_VISION = dict(hidden_size=128, intermediate_size=512, num_attention_heads=2, num_hidden_layers=2)
SMALL_VISION.update(image_size=32, patch_size=16)
TOL = 1e-5


def perturb(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Noise on every parameter: zero biases and unit LayerNorms would hide a bias or norm mapped to the wrong key."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return module.eval()


def tokens(vocab: int, length: int) -> torch.Tensor:
    """Two captions: start id, words below it, the end id (the largest id, once), zero padding."""
    start, end = vocab - 2, vocab - 1
    rows = [[start, 5, 17, 3, end], [start, 40, end]]
    return torch.tensor([r + [0] * (length - len(r)) for r in rows])


def features(out) -> torch.Tensor:
    """transformers' get_*_features returns a tensor or (newer versions) an output whose pooler_output is it."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def ours(state: dict) -> torch.nn.Module:
    """``build_model`` (strict load) casts to OpenAI's fp16 set; the fp32 values are loaded back to compare at 1e-5."""
    model = build_model(state).float()
    model.load_state_dict(state)
    return model


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < TOL


def clip_model(text: dict, vision: dict, projection_dim: int) -> torch.nn.Module:
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    return perturb(transformers.CLIPModel(config))


def check_hf_clip_model(model, folder, vocab: int, length: int, size: int) -> None:
    model.save_pretrained(folder)
    clip = ours(read_clip_weights(folder))
    image, text = torch.randn(1, 3, size, size), tokens(vocab, length)
    with torch.no_grad():
        assert_close(clip.encode_image(image), features(model.get_image_features(pixel_values=image)))
        assert_close(clip.encode_text(text), features(model.get_text_features(input_ids=text)))
    assert clip.logit_scale.item() == pytest.approx(model.logit_scale.item())


def test_hf_clip_model_small(tmp_path):
    torch.manual_seed(0)
    check_hf_clip_model(clip_model(SMALL_TEXT, SMALL_VISION, 64), tmp_path, 100, 16, 32)


# ViT-B/32's widths, heads, patch, resolution, vocabulary and context, with 2 of its 12 blocks per tower: the blocks
# only repeat, and all 12 make the test a minute long on two cores.
B32_BLOCKS = 2


def test_hf_clip_model_vit_b32_shapes(tmp_path):
    """transformers' defaults are ViT-B/32's shapes; one image, two captions."""
    torch.manual_seed(0)
    model = clip_model({"num_hidden_layers": B32_BLOCKS}, {"num_hidden_layers": B32_BLOCKS}, 512)
    assert model.config.vision_config.patch_size == 32 and model.config.vision_config.hidden_size == 768
    check_hf_clip_model(model, tmp_path, 49408, 77, 224)


def test_hf_pair_folder(tmp_path):
    """A folder holding a CLIPTextModelWithProjection folder and a CLIPVisionModelWithProjection folder."""
    torch.manual_seed(0)
    text_model = perturb(
        transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**SMALL_TEXT, projection_dim=64))
    )
    vision_model = perturb(
        transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**SMALL_VISION, projection_dim=64)), 1
    )
    text_model.save_pretrained(tmp_path / "text_encoder")
    vision_model.save_pretrained(tmp_path / "visual_encoder")
    state = read_hf_clip(tmp_path)
    assert state["logit_scale"].exp().item() == pytest.approx(100.0)
    clip = ours(state)
    image, text = torch.randn(2, 3, 32, 32), tokens(100, 16)
    with torch.no_grad():
        assert_close(clip.encode_image(image), vision_model(pixel_values=image).image_embeds)
        assert_close(clip.encode_text(text), text_model(input_ids=text).text_embeds)


def test_hf_pytorch_model_bin(tmp_path):
    """The older transformers file name, read with weights_only."""
    model = clip_model(SMALL_TEXT, SMALL_VISION, 64)
    model.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    expected = from_hf(model.state_dict(), "x")
    got = read_clip_weights(tmp_path)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_hf_mapping_round_trip(tiny_clip_state_dict):
    state = {k: v for k, v in tiny_clip_state_dict.items()}
    back = from_hf(to_hf(state), "x")
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k].float()) for k in state)


@pytest.mark.parametrize(
    "tower, change, message",
    [
        ("text_config", {"hidden_act": "gelu"}, "hidden_act is 'gelu'"),
        ("vision_config", {"hidden_act": "gelu"}, "hidden_act is 'gelu'"),
        ("text_config", {"eos_token_id": 2}, None),  # transformers' legacy argmax pooling: accepted
        ("text_config", {"eos_token_id": 7}, "eos_token_id is 7"),
        ("vision_config", {"layer_norm_eps": 1e-6}, "layer_norm_eps"),
        ("text_config", {"num_attention_heads": 4}, "4 heads for width 128"),
        ("vision_config", {"intermediate_size": 256}, "intermediate_size is 256"),
    ],
)
def test_hf_config_refusals(tmp_path, tower, change, message):
    clip_model(SMALL_TEXT, SMALL_VISION, 64).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[tower].update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    if message is None:
        assert "visual.proj" in read_clip_weights(tmp_path)
        return
    with pytest.raises(UsageError, match=message) as error:
        read_clip_weights(tmp_path)
    assert str(tmp_path) in str(error.value) and "\n" not in str(error.value)


def test_hf_refuses_other_model_type_and_extra_weights(tmp_path):
    clip_model(SMALL_TEXT, SMALL_VISION, 64).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "siglip"}))
    with pytest.raises(UsageError, match="model_type 'siglip'"):
        read_clip_weights(tmp_path)
    hf = to_hf(build_model_state(tmp_path, config))
    with pytest.raises(UsageError, match="'vision_model.head.weight' has no place"):
        from_hf({**hf, "vision_model.head.weight": torch.zeros(1)}, "x")
    del hf["visual_projection.weight"]
    with pytest.raises(UsageError, match="missing weight 'visual_projection.weight'"):
        from_hf(hf, "x")


def build_model_state(folder, config) -> dict:
    (folder / "config.json").write_text(json.dumps(config))
    return read_clip_weights(folder)


def test_pair_folder_needs_both_towers(tmp_path):
    text_model = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**SMALL_TEXT, projection_dim=64))
    text_model.save_pretrained(tmp_path / "text")
    with pytest.raises(UsageError, match="one CLIPVisionModelWithProjection folder .* found 0"):
        read_clip_weights(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# open_clip


def open_clip_small(**vision_extra) -> torch.nn.Module:
    vision = dict(layers=2, width=128, head_width=64, patch_size=16, image_size=32, **vision_extra)
    text = dict(context_length=16, vocab_size=100, width=128, heads=2, layers=2)
    torch.manual_seed(0)
    return perturb(open_clip.CLIP(embed_dim=64, vision_cfg=vision, text_cfg=text, quick_gelu=True))


def check_open_clip(model, path, vocab: int, length: int, size: int) -> None:
    clip = ours(read_clip_weights(path))
    image, text = torch.randn(1, 3, size, size), tokens(vocab, length)
    with torch.no_grad():
        assert_close(clip.encode_image(image), model.encode_image(image))
        assert_close(clip.encode_text(text), model.encode_text(text))


def test_open_clip_training_checkpoint(tmp_path):
    """open_clip's training file: {"epoch", "name", "state_dict"} with DDP's 'module.' prefix."""
    model = open_clip_small()
    state = {"module." + k: v for k, v in model.state_dict().items()}
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "name": "2024_01_01-model_ViT-B-16-quickgelu-lr_0.0005", "state_dict": state}, path)
    check_open_clip(model, path, 100, 16, 32)


def test_open_clip_vit_b32_quickgelu_shapes(tmp_path):
    torch.manual_seed(0)
    config = open_clip.get_model_config("ViT-B-32-quickgelu")
    config["vision_cfg"]["layers"] = config["text_cfg"]["layers"] = B32_BLOCKS
    assert config["vision_cfg"]["patch_size"] == 32 and config["quick_gelu"]
    model = perturb(open_clip.CLIP(**config))
    path = tmp_path / "vit-b-32-quickgelu.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    check_open_clip(model, path, 49408, 77, 224)


def test_open_clip_refuses_gelu_model_name(tmp_path):
    path = tmp_path / "epoch_3.pt"
    torch.save(
        {"epoch": 3, "name": "2024_01_01-model_ViT-B-32-lr_0.0005", "state_dict": open_clip_small().state_dict()}, path
    )
    with pytest.raises(UsageError, match="names model .*ViT-B-32.*GELU"):
        read_open_clip(path)


def test_open_clip_refuses_layer_scale_and_extra_keys(tmp_path):
    path = tmp_path / "ls.pt"
    torch.save(open_clip_small(ls_init_value=0.1).state_dict(), path)
    with pytest.raises(UsageError, match="layer scale"):
        read_open_clip(path)
    state = dict(open_clip_small().state_dict())
    state["visual.conv1.bias"] = torch.zeros(128)
    torch.save(state, path)
    with pytest.raises(UsageError, match="'visual.conv1.bias' is not part of OpenAI's ViT CLIP"):
        read_open_clip(path)


def test_torchscript_and_missing_paths_are_left_to_the_caller(tmp_path):
    assert read_clip_weights(tmp_path / "absent.pt") is None
    assert read_clip_weights("ViT-B/32") is None
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    scripted.save(str(tmp_path / "jit.pt"))
    assert read_clip_weights(tmp_path / "jit.pt") is None


def test_unreadable_file_is_one_line(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(UsageError, match="cannot read CLIP weights from .*broken.pt"):
        read_clip_weights(path)


# ---------------------------------------------------------------------------------------------------------------------
# the exported folder


def test_exported_folder_round_trip(tmp_path):
    state = {"clip.logit_scale": torch.tensor(4.6), "transformerClip.w": torch.randn(3, 2).half().t()}
    write_exported(tmp_path, state, {"model": {"sim_header": "seqTransf"}})
    got, config = read_exported(tmp_path)
    assert config == {"format": "clip4clip", "format_version": 1, "model": {"sim_header": "seqTransf"}}
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)
    assert got["transformerClip.w"].dtype == torch.float16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_read_exported_refuses_other_folders(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(UsageError, match="'format' is None, expected 'clip4clip'"):
        read_exported(tmp_path)


def test_plain_state_dict_with_archive_scalars(tmp_path, tiny_clip_state_dict):
    """A torch.save of OpenAI's weights, under a "model" wrapper, with the archive's scalar entries: those are dropped."""
    path = tmp_path / "clip.pt"
    torch.save({"model": {**tiny_clip_state_dict, "context_length": torch.tensor(77)}}, path)
    got = read_clip_weights(path)
    assert got.keys() == tiny_clip_state_dict.keys()
    assert all(torch.equal(got[k], tiny_clip_state_dict[k]) for k in got)
