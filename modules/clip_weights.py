"""From a ``--pretrained_clip_name`` value to a CLIP state dict: a known name, a tiny random name, or a weight file.

Nothing is downloaded: the user puts OpenAI's file in ``modules/`` (see README, "CLIP weights").
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from modules.clip_archive import is_torchscript_archive, read_torchscript_archive
from modules.clip_names import OPENAI_FILE_NAMES, OPENAI_MODEL_URLS, TINY_MODELS, available_models
from modules.tiny_clip import tiny_state_dict
from util import UsageError

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
    if os.path.isfile(name):
        return load_state_dict_file(name)
    raise UsageError(
        f"CLIP model {name!r} is neither a known name nor an existing file; known names: "
        f"{', '.join(available_models())} (CLIP4Clip needs a ViT CLIP); nothing is downloaded automatically, "
        f"for ViT-B/32 run: wget -P {WEIGHTS_DIR} {OPENAI_MODEL_URLS['ViT-B/32']}"
    )


def weight_file_format(path: Path) -> str:
    """Which reader a weight file needs: ``torchscript`` (OpenAI's archive) or ``torch.save``."""
    return "torchscript" if is_torchscript_archive(path) else "torch.save"


def _read_torch_save(path: Path) -> object:
    """A ``torch.save`` file's object (``weights_only``), unwrapped from a ``{"state_dict": ...}`` or
    ``{"model": ...}`` checkpoint."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    return obj


_READERS: dict[str, Callable[[Path], object]] = {
    "torchscript": read_torchscript_archive,
    "torch.save": _read_torch_save,
}


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error).strip() else type(error).__name__


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a CLIP weight file in any format :func:`weight_file_format` tells apart; an unreadable file, or one
    that holds no state dict, is a :class:`UsageError` naming it."""
    path = Path(path)
    try:
        obj = _READERS[weight_file_format(path)](path)
    except Exception as error:  # whatever a damaged file raises, the user needs the same one line
        raise UsageError(
            f"cannot read CLIP weights from {path} ({_first_line(error)}): expected OpenAI's "
            f"TorchScript archive or a torch.save state dict; the file may be truncated or corrupt, "
            f"download it again (see README, 'CLIP weights')"
        ) from None
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UsageError(
            f"{path} does not hold a CLIP state dict (a mapping of names to tensors); got {type(obj).__name__}"
        )
    return dict(obj)
