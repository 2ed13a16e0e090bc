"""CLIP weights in the formats people have, as OpenAI-keyed state dicts; and the exported CLIP4Clip folder.

Read: a Hugging Face ``transformers`` CLIP folder (a ``CLIPModel``, or a folder holding the
``CLIPTextModelWithProjection`` / ``CLIPVisionModelWithProjection`` pair), an open_clip checkpoint, a safetensors
file. Write: a CLIP4Clip checkpoint as ``model.safetensors`` + ``config.json``, and its CLIP towers as a
``CLIPModel`` folder. The key mapping is written from the libraries' documented names; neither library is imported,
and nothing in a file is executed (safetensors, or ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from modules.clip_archive import is_torchscript_archive
from util import UsageError, atomic_path, read_state_dict

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

# OpenAI block suffix → transformers layer suffix, for everything but the fused q/k/v projection.
_BLOCK_RENAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
_TEXT_RENAMES = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_VISION_RENAMES = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic: transformers' spelling
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
# OpenAI keeps the projections as (width, embed) matrices applied on the right; transformers as Linear weights.
_PROJECTIONS = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}
_TOWERS = {
    "text": ("transformer.resblocks", "text_model.encoder.layers"),
    "vision": ("visual.transformer.resblocks", "vision_model.encoder.layers"),
}
# Buffers some transformers versions saved; they hold 0..n-1 and carry no weights.
_HF_BUFFERS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")

# What a transformers config omits is its class default; CLIP4Clip's CLIP needs exactly these values.
_HF_BOTH = dict(hidden_act="quick_gelu", layer_norm_eps=1e-5)
_HF_DEFAULTS = {
    "text": dict(
        _HF_BOTH, hidden_size=512, intermediate_size=2048, num_attention_heads=8, vocab_size=49408, eos_token_id=49407
    ),
    "vision": dict(_HF_BOTH, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_channels=3),
}
_HF_TYPES = {"clip": "CLIPModel", "clip_text_model": "text", "clip_vision_model": "vision"}
# A CLIPTextModelWithProjection / CLIPVisionModelWithProjection pair has no logit scale; OpenAI's checkpoints, which
# CLIP4Clip fine-tunes, all carry 100.
_PAIR_LOGIT_SCALE = math.log(100.0)

EXPORT_FORMAT = "clip4clip"
EXPORT_VERSION = 1


def _block_count(keys: Any, prefix: str) -> int:
    return len({k[len(prefix) + 1 :].split(".")[0] for k in keys if k.startswith(prefix + ".")})


def _hf_table(text_layers: int, vision_layers: int) -> dict[str, str]:
    """OpenAI key → transformers key for every one-to-one tensor (projections and fused q/k/v are separate)."""
    table = {**_TEXT_RENAMES, **_VISION_RENAMES, "logit_scale": "logit_scale"}
    for tower, layers in (("text", text_layers), ("vision", vision_layers)):
        ours, theirs = _TOWERS[tower]
        for i in range(layers):
            for a, b in _BLOCK_RENAMES.items():
                for leaf in ("weight", "bias"):
                    table[f"{ours}.{i}.{a}.{leaf}"] = f"{theirs}.{i}.{b}.{leaf}"
    return table


def openai_keys(text_layers: int, vision_layers: int) -> set[str]:
    """Every key of an OpenAI ViT CLIP state dict with these block counts."""
    fused = {
        f"{ours}.{i}.attn.in_proj_{leaf}"
        for tower, layers in (("text", text_layers), ("vision", vision_layers))
        for ours in (_TOWERS[tower][0],)
        for i in range(layers)
        for leaf in ("weight", "bias")
    }
    return set(_hf_table(text_layers, vision_layers)) | set(_PROJECTIONS) | fused


def from_hf(hf: Mapping[str, torch.Tensor], where: str) -> StateDict:
    """A transformers CLIP state dict → OpenAI keys. Unknown or missing keys are a UsageError naming ``where``."""
    text_layers = _block_count(hf, _TOWERS["text"][1])
    vision_layers = _block_count(hf, _TOWERS["vision"][1])
    hf = {k: v for k, v in hf.items() if k not in _HF_BUFFERS}
    out: StateDict = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in hf:
            raise UsageError(f"{where}: missing weight {key!r}; expected a transformers CLIP (ViT) with projections")
        used.add(key)
        return hf[key]

    for ours, theirs in _hf_table(text_layers, vision_layers).items():
        out[ours] = take(theirs)
    for ours, theirs in _PROJECTIONS.items():
        out[ours] = take(theirs).t().contiguous()
    for tower, layers in (("text", text_layers), ("vision", vision_layers)):
        ours, theirs = _TOWERS[tower]
        for i in range(layers):
            for leaf in ("weight", "bias"):
                parts = [take(f"{theirs}.{i}.self_attn.{p}_proj.{leaf}") for p in "qkv"]
                out[f"{ours}.{i}.attn.in_proj_{leaf}"] = torch.cat(parts)
    extra = sorted(set(hf) - used)
    if extra:
        raise UsageError(f"{where}: weight {extra[0]!r} has no place in OpenAI's CLIP (a different architecture)")
    return out


def to_hf(state: Mapping[str, torch.Tensor]) -> StateDict:
    """An OpenAI-keyed ViT CLIP state dict → transformers ``CLIPModel`` keys (fp32)."""
    text_layers = _block_count(state, _TOWERS["text"][0])
    vision_layers = _block_count(state, _TOWERS["vision"][0])
    out = {theirs: state[ours] for ours, theirs in _hf_table(text_layers, vision_layers).items()}
    out.update({theirs: state[ours].t() for ours, theirs in _PROJECTIONS.items()})
    for tower, layers in (("text", text_layers), ("vision", vision_layers)):
        ours, theirs = _TOWERS[tower]
        for i in range(layers):
            for leaf in ("weight", "bias"):
                fused = state[f"{ours}.{i}.attn.in_proj_{leaf}"]
                for name, part in zip("qkv", fused.chunk(3)):
                    out[f"{theirs}.{i}.self_attn.{name}_proj.{leaf}"] = part
    return {k: v.float().contiguous() for k, v in out.items()}


def _hf_tower(state: Mapping[str, torch.Tensor], common: dict, tower: str, width: int) -> dict:
    """The fields a transformers text or vision config shares, read off the tower's first block and block count."""
    prefix = _TOWERS[tower][0]
    return dict(
        common,
        model_type=f"clip_{tower}_model",
        hidden_size=width,
        intermediate_size=state[f"{prefix}.0.mlp.c_fc.weight"].shape[0],
        num_attention_heads=width // 64,
        num_hidden_layers=_block_count(state, prefix),
    )


def hf_config(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The ``CLIPModel`` config.json of an OpenAI-keyed ViT CLIP state dict, read off its shapes."""
    vision_width = state["visual.conv1.weight"].shape[0]
    patch = state["visual.conv1.weight"].shape[-1]
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    vocab, text_width = state["token_embedding.weight"].shape
    embed = state["text_projection"].shape[1]
    common = dict(hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=embed)
    text = dict(
        _hf_tower(state, common, "text", text_width),
        max_position_embeddings=state["positional_embedding"].shape[0],
        vocab_size=vocab,
        # The end token is the highest id, so pooling at its first occurrence is OpenAI's argmax pooling.
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=1,
    )
    vision = dict(
        _hf_tower(state, common, "vision", vision_width),
        image_size=patch * grid,
        patch_size=patch,
        num_channels=3,
    )
    return dict(
        architectures=["CLIPModel"],
        model_type="clip",
        projection_dim=embed,
        logit_scale_init_value=float(state["logit_scale"]),
        text_config=text,
        vision_config=vision,
        dtype="float32",
    )


def _check_hf_tower(config: Mapping[str, Any], tower: str, where: str) -> None:
    """Refuse a transformers tower config that OpenAI's CLIP cannot represent."""
    value = {**_HF_DEFAULTS[tower], **config}
    if value["hidden_act"] != "quick_gelu":
        raise UsageError(f"{where}: {tower} hidden_act is {value['hidden_act']!r}; CLIP4Clip's CLIP uses quick_gelu")
    if value["layer_norm_eps"] != 1e-5:
        raise UsageError(f"{where}: {tower} layer_norm_eps is {value['layer_norm_eps']}; CLIP4Clip's CLIP uses 1e-5")
    if value["num_attention_heads"] * 64 != value["hidden_size"]:
        raise UsageError(
            f"{where}: {tower} has {value['num_attention_heads']} heads for width {value['hidden_size']}; "
            f"CLIP4Clip's CLIP uses width // 64 heads"
        )
    if value["intermediate_size"] != 4 * value["hidden_size"]:
        raise UsageError(
            f"{where}: {tower} intermediate_size is {value['intermediate_size']} for width {value['hidden_size']}; "
            f"CLIP4Clip's CLIP uses 4 x width"
        )
    if tower == "vision" and value["num_channels"] != 3:
        raise UsageError(f"{where}: vision num_channels is {value['num_channels']}; expected 3 (RGB)")
    if tower == "text" and value["eos_token_id"] not in (2, value["vocab_size"] - 1):
        # transformers pools at argmax for the legacy id 2, else at the first eos_token_id; only the highest id
        # makes that first occurrence the argmax CLIP4Clip pools at.
        raise UsageError(
            f"{where}: text eos_token_id is {value['eos_token_id']}; CLIP4Clip pools at the highest token id "
            f"({value['vocab_size'] - 1}), so the end token must be that id"
        )


def _hf_kind(folder: Path) -> str | None:
    """'CLIPModel', 'text' or 'vision' for a transformers CLIP folder, None when ``folder`` is not one."""
    config = folder / "config.json"
    if not config.is_file():
        return None
    model_type = _read_json(config).get("model_type")
    if model_type not in _HF_TYPES:
        raise UsageError(f"{config}: model_type {model_type!r} is not a CLIP ViT; expected one of {list(_HF_TYPES)}")
    return _HF_TYPES[model_type]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"{path}: cannot read JSON ({error})") from None
    if not isinstance(value, dict):
        raise UsageError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _hf_weights(folder: Path) -> StateDict:
    """The tensors of a transformers folder: ``model.safetensors``, else ``pytorch_model.bin`` (weights only)."""
    if (folder / "model.safetensors").is_file():
        return read_safetensors(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").is_file():
        return _torch_load(folder / "pytorch_model.bin")
    raise UsageError(f"{folder}: has config.json but neither model.safetensors nor pytorch_model.bin")


def _tower_folders(folder: Path) -> dict[str, Path]:
    """The text and vision folders of a pair: ``folder`` itself and its direct sub-folders, by config model_type."""
    found: dict[str, list[Path]] = {"text": [], "vision": []}
    for candidate in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        kind = _hf_kind(candidate)
        if kind in found:
            found[kind].append(candidate)
    for kind, paths in found.items():
        if len(paths) != 1:
            raise UsageError(
                f"{folder}: expected one CLIP{kind.title()}ModelWithProjection folder (itself or a direct "
                f"sub-folder), found {len(paths)}"
            )
    return {kind: paths[0] for kind, paths in found.items()}


def is_hf_clip_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder that :func:`read_hf_clip` reads (its own or a sub-folder's config.json)."""
    path = Path(path)
    return path.is_dir() and any((p / "config.json").is_file() for p in [path, *path.iterdir()] if p.is_dir())


def read_hf_clip(path: str | Path) -> StateDict:
    """An OpenAI-keyed CLIP state dict from a transformers ``CLIPModel`` folder or a text/vision pair folder."""
    folder = Path(path)
    if _hf_kind(folder) == "CLIPModel":
        config = _read_json(folder / "config.json")
        for tower in ("text", "vision"):
            _check_hf_tower(config.get(f"{tower}_config") or {}, tower, str(folder / "config.json"))
        return from_hf(_hf_weights(folder), str(folder))
    towers = _tower_folders(folder)
    merged: StateDict = {"logit_scale": torch.tensor(_PAIR_LOGIT_SCALE)}
    for kind, tower_folder in towers.items():
        _check_hf_tower(_read_json(tower_folder / "config.json"), kind, str(tower_folder / "config.json"))
        merged.update(_hf_weights(tower_folder))
    return from_hf(merged, str(folder))


def read_safetensors(path: str | Path) -> StateDict:
    try:
        return load_file(str(path), device="cpu")
    except (OSError, SafetensorError) as error:
        raise UsageError(f"{path}: cannot read safetensors ({error})") from None


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # whatever a damaged or hostile file raises, the user needs the same one line
        first = str(error).splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(
            f"cannot read CLIP weights from {path} ({first}): expected a torch.save file (read with weights only); "
            f"it may be truncated or corrupt"
        ) from None


# Keys by which open_clip variants that OpenAI's CLIP cannot represent show themselves.
_OPEN_CLIP_MARKERS = {
    "visual.attn_pool.": "an attentional pooler",
    "visual.trunk.": "a timm image tower",
    "text.": "a non-OpenAI text tower (CustomTextCLIP)",
    ".ls_1.": "layer scale",
    ".ln_attn.": "extra attention layer norms",
    ".mlp.ln.": "extra MLP layer norms",
    "cls_emb": "a text class token",
    "text_projection.weight": "a linear text projection",
    "logit_bias": "a sigmoid (SigLIP) logit bias",
}
# open_clip's causal-mask buffer (CLIP4Clip's CLIP builds its own) and the scalars OpenAI's TorchScript archives carry.
_NOT_WEIGHTS = ("attn_mask", "input_resolution", "context_length", "vocab_size")
_VIT_NAME = re.compile(r"vit-[a-z]+-\d+", re.IGNORECASE)


def _check_open_clip_name(path: Path, names: list[str]) -> None:
    """Refuse a checkpoint whose model name says open_clip built it with nn.GELU (names without '-quickgelu')."""
    for name in names:
        if "quickgelu" in name.lower():
            return
        if _VIT_NAME.search(name):
            raise UsageError(
                f"{path}: names model {name!r}, which open_clip builds with GELU; CLIP4Clip's CLIP uses QuickGELU "
                f"(open_clip's '-quickgelu' models). If it was in fact trained from OpenAI's weights (QuickGELU), "
                f"save its state_dict alone with torch.save and pass that file"
            )
    logger.warning("%s: open_clip checkpoint names no model; assuming QuickGELU (OpenAI's activation)", path)


def _open_clip_state(path: Path, obj: Mapping[str, Any]) -> StateDict:
    """Unwrap open_clip's training checkpoint ({"state_dict", "epoch", "name", ...}) and DDP's 'module.' prefix."""
    if isinstance(obj.get("state_dict"), Mapping) and ("epoch" in obj or "name" in obj):
        _check_open_clip_name(path, [str(obj.get("name", "")), path.name])
    for wrapper in ("state_dict", "model"):
        if isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if len(state) != len(obj):
        raise UsageError(f"{path}: expected a state dict (name → tensor); some entries are not tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _check_openai_layout(path: Path, state: Mapping[str, torch.Tensor]) -> StateDict:
    """Refuse what OpenAI's ViT CLIP cannot represent; drop the entries that are not weights."""
    for key in state:
        for marker, what in _OPEN_CLIP_MARKERS.items():
            if key.startswith(marker) or (marker.startswith(".") and marker in key) or key == marker:
                raise UsageError(f"{path}: has {what} (key {key!r}), which CLIP4Clip's CLIP cannot represent")
    state = {k: v for k, v in state.items() if k not in _NOT_WEIGHTS}
    expected = openai_keys(_block_count(state, _TOWERS["text"][0]), _block_count(state, _TOWERS["vision"][0]))
    extra, missing = sorted(set(state) - expected), sorted(expected - set(state))
    if extra:
        raise UsageError(f"{path}: key {extra[0]!r} is not part of OpenAI's ViT CLIP (a different architecture)")
    if missing:
        raise UsageError(f"{path}: missing key {missing[0]!r} of OpenAI's ViT CLIP")
    for key, value in state.items():
        if key.endswith(".mlp.c_fc.weight") and value.shape[0] != 4 * value.shape[1]:
            raise UsageError(f"{path}: {key} has shape {tuple(value.shape)}; CLIP4Clip's CLIP has MLPs 4 x width wide")
    return dict(state)


def read_open_clip(path: str | Path) -> StateDict:
    """An OpenAI-keyed state dict from an open_clip ViT checkpoint (torch.save or safetensors)."""
    path = Path(path)
    obj = read_safetensors(path) if path.suffix == ".safetensors" else _torch_load(path)
    if not isinstance(obj, Mapping):
        raise UsageError(f"{path}: expected a state dict or open_clip checkpoint, got {type(obj).__name__}")
    return _check_openai_layout(path, _open_clip_state(path, obj))


def read_clip_weights(path: str | Path) -> StateDict | None:
    """OpenAI-keyed CLIP weights from a transformers folder, an open_clip checkpoint, a safetensors file or a plain
    state dict; None when ``path`` is no existing file or folder, or is a TorchScript archive (OpenAI's ``.pt``)."""
    path = Path(path)
    if path.is_dir():
        if not is_hf_clip_folder(path):
            raise UsageError(f"{path}: a folder, but no config.json of a transformers CLIP in it or its sub-folders")
        return read_hf_clip(path)
    if not path.is_file() or is_torchscript_archive(path):
        return None
    return read_open_clip(path)


def write_exported(folder: str | Path, state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> None:
    """Write a CLIP4Clip state dict as ``folder/model.safetensors`` and ``config`` as ``folder/config.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    document = {"format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, **config}
    # Nested: config.json, which marks the folder complete, is renamed last.
    with atomic_path(folder / "config.json") as config_tmp, atomic_path(folder / "model.safetensors") as weights_tmp:
        save_file({k: v.detach().contiguous() for k, v in state_dict.items()}, str(weights_tmp), {"format": "pt"})
        config_tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def is_exported_folder(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and _read_json(path / "config.json").get("format") == EXPORT_FORMAT


def read_exported(folder: str | Path) -> tuple[StateDict, dict[str, Any]]:
    """The state dict and config of a folder written by :func:`write_exported`; no pickle is involved."""
    folder = Path(folder)
    config = _read_json(folder / "config.json")
    if config.get("format") != EXPORT_FORMAT:
        raise UsageError(f"{folder / 'config.json'}: 'format' is {config.get('format')!r}, expected {EXPORT_FORMAT!r}")
    if config.get("format_version") != EXPORT_VERSION:
        raise UsageError(
            f"{folder / 'config.json'}: format_version {config.get('format_version')!r}, this code reads {EXPORT_VERSION}"
        )
    return read_safetensors(folder / "model.safetensors"), config


def read_checkpoint(path: str | Path, flag: str) -> StateDict:
    """A CLIP4Clip checkpoint's state dict: a folder :func:`write_exported` wrote, or a torch.save file."""
    if Path(path).is_dir():
        if not is_exported_folder(path):
            raise UsageError(
                f"{flag} {path}: a folder, but not one export_model.py wrote (config.json, format clip4clip)"
            )
        return read_exported(path)[0]
    return read_state_dict(path, flag)


def write_hf_clip(folder: str | Path, clip_state_dict: Mapping[str, torch.Tensor]) -> None:
    """Write OpenAI-keyed ViT CLIP weights as a transformers ``CLIPModel`` folder (model.safetensors + config.json)."""
    if "visual.conv2.weight" in clip_state_dict:
        raise UsageError("the CLIP uses 3d patches (visual.conv2), which a transformers CLIPModel cannot represent")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "config.json") as config_tmp, atomic_path(folder / "model.safetensors") as weights_tmp:
        save_file(to_hf(clip_state_dict), str(weights_tmp), {"format": "pt"})
        config_tmp.write_text(json.dumps(hf_config(clip_state_dict), indent=2) + "\n", encoding="utf-8")
