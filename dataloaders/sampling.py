"""Which frames of a video a model sees: one frozen value shared by the data sets, the run config and the index."""

from __future__ import annotations

from dataclasses import dataclass


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
