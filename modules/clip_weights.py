"""From a ``--pretrained_clip_name`` value to a CLIP state dict: a known name, a tiny random name, a weight file in
any format :mod:`modules.clip_formats` reads, or a transformers folder; and which CLIP a CLIP4Clip checkpoint needs.

Nothing is downloaded: the user puts OpenAI's file in ``modules/`` (see README, "CLIP weights").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from modules.clip_archive import is_torchscript_archive, read_torchscript_archive
from modules.clip_formats import openai_keys, read_checkpoint, read_clip_weights
from modules.clip_names import NAMED_ARCHITECTURES, OPENAI_FILE_NAMES, OPENAI_MODEL_URLS, TINY_MODELS, available_models
from modules.module_clip import clip_config_from_state_dict
from modules.tiny_clip import tiny_state_dict
from util import UsageError, check_finite

logger = logging.getLogger(__name__)

CLIP_PREFIX = "clip."
# Where the weight files of the known names are looked for.
WEIGHTS_DIR = Path(__file__).resolve().parent


def load_clip_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The CLIP state dict for a model name (``ViT-B/32``, ``ViT-B/16``, a tiny random name) or a file path."""
    if name in TINY_MODELS:
        return tiny_state_dict(name)
    if name in OPENAI_FILE_NAMES:
        path = WEIGHTS_DIR / OPENAI_FILE_NAMES[name]
        if not path.is_file():
            raise UsageError(
                f"CLIP weights for {name} not found at {path}; nothing is downloaded automatically, "
                f"fetch OpenAI's file with: wget -P {path.parent} {OPENAI_MODEL_URLS[name]}"
            )
        return load_state_dict_file(path)
    if os.path.exists(name):
        return load_state_dict_file(name)
    raise UsageError(
        f"CLIP model {name!r} is neither a known name nor an existing file or folder; known names: "
        f"{', '.join(available_models())} (CLIP4Clip needs a ViT CLIP); nothing is downloaded automatically, "
        f"for ViT-B/32 run: wget -P {WEIGHTS_DIR} {OPENAI_MODEL_URLS['ViT-B/32']}"
    )


def weight_file_format(path: Path) -> str:
    """Which reader a weight file needs: ``torchscript`` (OpenAI's archive) or ``torch.save``."""
    return "torchscript" if is_torchscript_archive(path) else "torch.save"


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error).strip() else type(error).__name__


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read CLIP weights from OpenAI's TorchScript archive, or from whatever :func:`read_clip_weights` reads (a
    transformers folder, an open_clip checkpoint, a safetensors file, a plain state dict); an unreadable archive
    is a :class:`UsageError` naming it."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"CLIP weights {path}: no such file or folder")
    if path.is_dir() or weight_file_format(path) != "torchscript":
        return check_finite(read_clip_weights(path), f"CLIP weights {path}")
    return check_finite(_read_openai_archive(path), f"CLIP weights {path}")


def clip_weight_shapes(path: str | Path) -> Mapping[str, torch.Tensor]:
    """CLIP weights good for their shapes only, as cheaply as the format allows: OpenAI's archive as meta tensors
    (its data is not read; the model set-up reads it), anything else as :func:`load_state_dict_file` reads it."""
    path = Path(path)
    if path.is_file() and weight_file_format(path) == "torchscript":
        return _read_openai_archive(path, shapes_only=True)
    return load_state_dict_file(path)


def _read_openai_archive(path: Path, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    try:
        state = read_torchscript_archive(path, shapes_only)
    except Exception as error:  # whatever a damaged file raises, the user needs the same one line
        raise UsageError(
            f"cannot read CLIP weights from {path} ({_first_line(error)}): expected OpenAI's "
            f"TorchScript archive; the file may be truncated or corrupt, download it again (see README, 'CLIP weights')"
        ) from None
    missing = missing_clip_weights(state)
    if missing:  # another TorchScript model: its own keys would fail later, without the file's name
        raise UsageError(
            f"CLIP weights {path}: a TorchScript archive, but not OpenAI's ViT CLIP (no {_preview(missing)})"
        )
    return state


def checkpoint_clip(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The CLIP weights a CLIP4Clip checkpoint holds, under OpenAI's keys (its ``clip.`` prefix removed)."""
    return {k[len(CLIP_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(CLIP_PREFIX)}


def _block_total(keys: Mapping[str, torch.Tensor], prefix: str) -> int:
    indices = [int(k[len(prefix) :].split(".")[0]) for k in keys if k.startswith(prefix)]
    return max(indices) + 1 if indices else 0


def missing_clip_weights(clip: Mapping[str, torch.Tensor]) -> list[str]:
    """The OpenAI ViT CLIP weights ``clip`` lacks, for the block counts its keys show (all of them when empty)."""
    expected = openai_keys(
        _block_total(clip, "transformer.resblocks."), _block_total(clip, "visual.transformer.resblocks.")
    )
    return sorted(expected - set(clip))


def _preview(keys: list[str], limit: int = 4) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def clip_for_checkpoint(
    name: str, checkpoint: Mapping[str, torch.Tensor] | None, where: str, copies_from_clip: bool = False
) -> dict[str, torch.Tensor]:
    """The CLIP a model with ``checkpoint`` loaded over it is built on: its architecture, and the weights for what
    the checkpoint lacks.

    A checkpoint holding every CLIP weight is self-contained: the CLIP named ``name`` is not read, and only said to
    differ when its architecture is known to. ``copies_from_clip`` (a new head initialised from CLIP's text tower)
    reads the named CLIP when it has the checkpoint's architecture, as the original does, else takes the
    checkpoint's own. A checkpoint lacking CLIP weights needs ``name``; when it cannot be read the error says why.
    """
    if checkpoint is None:
        return load_clip_state_dict(name)
    own = checkpoint_clip(checkpoint)
    missing = missing_clip_weights(own)
    if missing:
        try:
            return load_clip_state_dict(name)
        except UsageError as error:
            some = f"only some: it lacks {_preview(missing)}" if own else "none at all"
            raise UsageError(
                f"{where} holds no complete CLIP ({some}); pass --pretrained_clip_name with the CLIP it was "
                f"trained from. {error}"
            ) from None
    architecture = clip_config_from_state_dict(own)
    named = NAMED_ARCHITECTURES.get(name)
    if named is not None and named != architecture:
        logger.warning("%s holds its own CLIP, not %s (another architecture): using its own", where, name)
    elif copies_from_clip:
        try:
            clip = load_clip_state_dict(name)
            if clip_config_from_state_dict(clip) == architecture:
                return clip
        except (UsageError, ValueError):
            pass
        logger.info("%s: the new head's initial weights come from its own CLIP (%s is not available)", where, name)
    return own


def checkpoint_image_resolution(path: str | Path) -> int | None:
    """The frame size of the CLIP a CLIP4Clip checkpoint holds whole, or None when it does not hold it whole.

    Reads the file memory-mapped, so only the shapes are touched (the model set-up reads it again in full).
    """
    if Path(path).is_dir():
        own = checkpoint_clip(read_checkpoint(path, "--init_model"))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # not mappable (an old-format file) or unreadable: the full read says which, later
            state = read_checkpoint(path, "--init_model")
        own = checkpoint_clip(state) if isinstance(state, Mapping) else {}
    if not own or missing_clip_weights(own):
        return None
    return clip_config_from_state_dict(own)["image_resolution"]
