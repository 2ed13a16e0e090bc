"""What an index was built with, as typed frozen values; light to import (no torch), so the command line can use
the defaults in its help texts."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dataloaders.sampling import VideoSampling

DEFAULT_CLIP = "ViT-B/32"
DEFAULT_SAMPLING = VideoSampling(max_frames=12, feature_framerate=1, slice_framepos=2)
# The similarity heads of ``modules.modeling`` (importing it would load torch before the flags are parsed).
SIM_HEADERS = ("meanP", "seqLSTM", "seqTransf", "tightTransf")
SAMPLING_KEYS = ("max_frames", "feature_framerate", "slice_framepos")


@dataclass(frozen=True)
class Weights:
    """Weight files named on the command line; None keeps what the index stored."""

    init_model: str | None = None
    pretrained_clip_name: str | None = None


AS_STORED = Weights()  # no weight files named: the ones the index stored


@dataclass(frozen=True)
class ModelSpec:
    """The model part of an index: the weights and the head. The temporal layer count and the tuning follow from
    the checkpoint, which the fingerprint pins. Head and patch are None until the checkpoint has been read."""

    init_model: str | None = None
    pretrained_clip_name: str = DEFAULT_CLIP
    sim_header: str | None = None
    linear_patch: str | None = None
    fingerprint: str | None = None

    def with_weights(self, weights: Weights) -> ModelSpec:
        """This spec with the weight files given; a file is stored by absolute path so the index works from
        anywhere."""
        spec = self
        if weights.init_model:
            spec = replace(spec, init_model=str(Path(weights.init_model).resolve()))
        name = weights.pretrained_clip_name
        if name:
            spec = replace(spec, pretrained_clip_name=str(Path(name).resolve()) if Path(name).exists() else name)
        return spec

    def describe(self) -> str:
        return self.init_model or self.pretrained_clip_name

    def to_json(self) -> dict[str, Any]:
        return {
            "init_model": self.init_model,
            "pretrained_clip_name": self.pretrained_clip_name,
            "sim_header": self.sim_header,
            "linear_patch": self.linear_patch,
            "fingerprint": self.fingerprint,
        }


@dataclass(frozen=True)
class IndexSettings:
    """Everything an index's rows were encoded with; rows encoded otherwise cannot be compared with them."""

    videos_root: str
    model: ModelSpec
    sampling: VideoSampling

    @property
    def root(self) -> Path:
        return Path(self.videos_root)

    def to_json(self) -> dict[str, Any]:
        """Index format 1: the frame size and order are not stored (the model's input size, in order)."""
        sampling = {key: getattr(self.sampling, key) for key in SAMPLING_KEYS}
        return {"videos_root": self.videos_root, "model": self.model.to_json(), "sampling": sampling}

    @classmethod
    def from_json(cls, settings: dict[str, Any]) -> IndexSettings:
        """The settings of a manifest whose fields have been checked (``search.index`` does)."""
        model = ModelSpec(**{key: settings["model"][key] for key in ModelSpec.__dataclass_fields__})
        sampling = replace(DEFAULT_SAMPLING, **{key: settings["sampling"][key] for key in SAMPLING_KEYS})
        return cls(settings["videos_root"], model, sampling)
