"""Which frames of a video a model sees: one frozen value shared by the data sets, the run config and the index."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from errors import UsageError

FRAME_ORDERS = {0: "in order", 1: "reversed", 2: "shuffled"}
SLICE_POSITIONS = {0: "head", 1: "tail", 2: "uniform"}


@dataclass(frozen=True)
class VideoSampling:
    """How a video becomes at most ``max_frames`` frames of ``image_resolution`` pixels.

    ``feature_framerate`` frames are taken per second; a longer video keeps its first (``slice_framepos`` 0), last
    (1) or uniformly spread (2) frames; ``frame_order`` 0 keeps them in order, 1 reverses and 2 shuffles them.
    """

    max_frames: int = 100
    feature_framerate: int = 1
    slice_framepos: int = 0
    image_resolution: int = 224
    frame_order: int = 0

    def __post_init__(self) -> None:
        for name in ("max_frames", "feature_framerate", "image_resolution"):
            value = getattr(self, name)
            if value < 1:
                raise UsageError(f"--{name} must be >= 1, got {value}")
        if self.feature_framerate != int(self.feature_framerate):
            raise UsageError(
                f"--feature_framerate must be a whole number of frames per second, got {self.feature_framerate}"
            )
        # The original's data sets default to a float 1.0; frames are counted in whole numbers, and the index and
        # the run config compare and serialise this value, so 1.0 and 1 must be the same sampling.
        object.__setattr__(self, "feature_framerate", int(self.feature_framerate))
        _require_choice("frame_order", self.frame_order, FRAME_ORDERS)
        _require_choice("slice_framepos", self.slice_framepos, SLICE_POSITIONS)


def _require_choice(name: str, value: int, choices: Mapping[int, str]) -> None:
    if value not in choices:
        named = ", ".join(f"{k} ({v})" for k, v in choices.items())
        raise UsageError(f"--{name} must be one of {named}, got {value}")


SAMPLING_KEYWORDS = tuple(f.name for f in dataclasses.fields(VideoSampling))


def sampling_of(owner: str, sampling: VideoSampling | None, loose: Mapping[str, Any]) -> VideoSampling:
    """The sampling a data set reads with: ``sampling`` itself, or one built from the original's loose keywords
    (``max_frames=``, ``feature_framerate=``, ...), which scripts written against the original still pass.

    Both at once is refused: which of the two should win would be a guess."""
    unknown = sorted(set(loose) - set(SAMPLING_KEYWORDS))
    if unknown:
        raise TypeError(f"{owner}() got unexpected keyword arguments {unknown}")
    if sampling is None:
        return VideoSampling(**loose)
    if loose:
        raise TypeError(f"{owner}() takes either sampling= or the keywords {sorted(loose)}, not both")
    return sampling
