"""CLIP4Clip's model config: the head, its layers, patch and tuning, checked once; and what a checkpoint implies."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

from modules.module_clip import clip_config_from_state_dict
from modules.names import LINEAR_PATCHES, LOOSE_HEADERS, PRECISIONS, SIM_HEADERS, TUNINGS
from util import UsageError

# The model's messages keep the logger they had before the config had its own file.
logger = logging.getLogger("modules.modeling")

# The cross config's max_position_embeddings; the original asserts max_words + max_frames against it.
MAX_POSITION_EMBEDDINGS = 128
ADAPTER_PREFIXES = ("image_adapter.", "text_adapter.")


def resolve_precision(precision: str | None, device: Any) -> str:
    """Map the ``precision`` option to one of :data:`PRECISIONS`.

    None/'auto' is the original's fp16 CLIP weights on CUDA and fp32 on CPU (fp16 weights on CPU are slow and not
    how anyone trains). 'bf16' and 'fp16' keep fp32 weights; the driver runs the step under autocast.
    """
    if precision in (None, "auto"):
        resolved = "fp16-weights" if torch.device(device).type == "cuda" else "fp32"
        logger.info("precision auto on %s: %s", torch.device(device).type, resolved)
        return resolved
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be 'auto' or one of {PRECISIONS}, got {precision!r}")
    return precision


def _resblock_count(state_dict: Mapping[str, Any], prefix: str) -> int | None:
    """How many ``<prefix><i>.`` blocks a state dict holds, or None when it holds none."""
    indices = {int(key[len(prefix) :].split(".")[0]) for key in state_dict if key.startswith(prefix)}
    return max(indices) + 1 if indices else None


@dataclass
class CLIP4ClipConfig:
    """What a CLIP4Clip model is: the CLIP weights, the similarity head and its size, the input sizes, the precision.

    ``loose_type`` None means "as the head needs" (True for the dot-product heads, False for tightTransf). A loose
    head built with ``loose_type=False`` gets the cross encoder's modules and cannot score, as in the original.
    ``tuning`` is "full" (the original: CLIP is fine-tuned) or "unipt" (the UniPT fork: CLIP is frozen and only
    its two adapters train).
    """

    pretrained_clip_name: str = "ViT-B/32"
    sim_header: str = "meanP"
    loose_type: bool | None = None
    cross_num_hidden_layers: int = 4
    linear_patch: str = "2d"
    max_words: int = 32
    max_frames: int = 12
    precision: str = "auto"
    grad_checkpointing: bool = False
    freeze_layer_num: int = 0
    tuning: str = "full"

    def __post_init__(self) -> None:
        if self.sim_header not in SIM_HEADERS:
            raise UsageError(f"sim_header must be one of {SIM_HEADERS}, got {self.sim_header!r}")
        if self.loose_type is None:
            self.loose_type = self.sim_header in LOOSE_HEADERS
        if self.sim_header == "tightTransf" and self.loose_type:
            raise UsageError("sim_header tightTransf is a cross encoder: loose_type must be False")
        if self.linear_patch not in LINEAR_PATCHES:
            raise UsageError(f"linear_patch must be one of {LINEAR_PATCHES}, got {self.linear_patch!r}")
        if self.precision not in ("auto",) + PRECISIONS:
            raise UsageError(f"precision must be 'auto' or one of {PRECISIONS}, got {self.precision!r}")
        for name in ("cross_num_hidden_layers", "max_words", "max_frames"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not -1 <= self.freeze_layer_num <= 12:
            raise UsageError(f"freeze_layer_num must be in -1..12, got {self.freeze_layer_num}")
        if self.max_words + self.max_frames > MAX_POSITION_EMBEDDINGS:
            raise UsageError(
                f"max_words + max_frames = {self.max_words} + {self.max_frames} exceeds the cross "
                f"config's max_position_embeddings {MAX_POSITION_EMBEDDINGS}"
            )
        if self.tuning not in TUNINGS:
            raise UsageError(f"tuning must be one of {TUNINGS}, got {self.tuning!r}")
        if self.tuning == "unipt" and self.sim_header == "tightTransf":
            raise UsageError(
                "tuning unipt cannot use sim_header tightTransf: the adapters give one vector per "
                "caption, the cross encoder needs per-token outputs"
            )

    @classmethod
    def from_args(cls, args: Any) -> CLIP4ClipConfig:
        """The config of the driver's flags (or any object with the original's ``task_config`` attributes).

        Attributes the object lacks keep the defaults, so scripts written against the original keep working.
        """
        if isinstance(args, cls):
            return args
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        for name in ("precision", "tuning"):  # None: not given, the default
            if values.get(name) is None:
                values.pop(name, None)
        return cls(**values)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any], **given: Any) -> CLIP4ClipConfig:
        """The config a CLIP4Clip checkpoint implies (head, its layer count, 2d/3d patch, tuning), completed by
        ``given``.

        ``given`` also overrides what the checkpoint implies; what neither says keeps the defaults.
        """
        return cls(**{**implied_by_state_dict(state_dict), **given})

    def check_clip(self, clip_state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """CLIP's architecture (:func:`clip_config_from_state_dict`), once it is known to carry this config."""
        if "visual.proj" not in clip_state_dict:
            raise UsageError("CLIP weights have no 'visual.proj': CLIP4Clip needs a ViT CLIP (ViT-B/32, ViT-B/16)")
        clip_kwargs = clip_config_from_state_dict(clip_state_dict)
        n_positions = 1 + self.max_frames if self.sim_header == "tightTransf" else self.max_frames
        if self.sim_header in ("seqTransf", "tightTransf") and n_positions > clip_kwargs["context_length"]:
            raise UsageError(
                f"sim_header {self.sim_header} with max_frames {self.max_frames} needs {n_positions} positions, "
                f"but the position tables have CLIP's context_length {clip_kwargs['context_length']}"
            )
        return clip_kwargs


def implied_by_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The config fields a checkpoint's keys decide: the head, its layer count, the patch embedding and the tuning
    (UniPT when it holds adapter weights)."""
    implied: dict[str, Any] = {"linear_patch": "3d" if "clip.visual.conv2.weight" in state_dict else "2d"}
    if any(key.startswith("cross.") for key in state_dict):
        implied["sim_header"] = "tightTransf"
        layers = _resblock_count(state_dict, "cross.transformer.resblocks.")
    elif any(key.startswith("transformerClip.") for key in state_dict):
        implied["sim_header"] = "seqTransf"
        layers = _resblock_count(state_dict, "transformerClip.resblocks.")
    else:
        implied["sim_header"] = "seqLSTM" if any(key.startswith("lstm_visual.") for key in state_dict) else "meanP"
        layers = None
    if layers is not None:
        implied["cross_num_hidden_layers"] = layers
    implied["tuning"] = "unipt" if any(key.startswith(ADAPTER_PREFIXES) for key in state_dict) else "full"
    return implied
