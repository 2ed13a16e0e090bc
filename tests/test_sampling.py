"""The frozen video sampling: its own checks, and the original's loose keywords turned into one."""

from __future__ import annotations

import pytest

from dataloaders.sampling import VideoSampling, sampling_of
from errors import UsageError


def test_defaults_are_the_original_data_sets_defaults():
    assert VideoSampling() == VideoSampling(
        max_frames=100, feature_framerate=1, slice_framepos=0, image_resolution=224, frame_order=0
    )


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("max_frames", 0, "--max_frames must be >= 1, got 0"),
        ("feature_framerate", 0, "--feature_framerate must be >= 1, got 0"),
        ("image_resolution", -3, "--image_resolution must be >= 1, got -3"),
        ("feature_framerate", 1.5, "--feature_framerate must be a whole number of frames per second, got 1.5"),
        ("frame_order", 3, "--frame_order must be one of 0 (in order), 1 (reversed), 2 (shuffled), got 3"),
        ("slice_framepos", -1, "--slice_framepos must be one of 0 (head), 1 (tail), 2 (uniform), got -1"),
    ],
)
def test_a_bad_field_is_a_usage_error_naming_its_flag(field, value, message):
    with pytest.raises(UsageError) as caught:
        VideoSampling(**{field: value})
    assert str(caught.value) == message


def test_a_whole_float_frame_rate_is_the_same_sampling_as_the_int():
    # the original's data sets default to feature_framerate=1.0
    sampling = VideoSampling(feature_framerate=2.0)
    assert sampling == VideoSampling(feature_framerate=2) and type(sampling.feature_framerate) is int


def test_loose_keywords_build_the_sampling():
    loose = dict(max_frames=4, feature_framerate=1.0, image_resolution=32, frame_order=1, slice_framepos=2)
    assert sampling_of("X", None, loose) == VideoSampling(4, 1, 2, 32, 1)
    assert sampling_of("X", None, {}) == VideoSampling()


def test_the_sampling_itself_is_returned_as_given():
    sampling = VideoSampling(max_frames=3)
    assert sampling_of("X", sampling, {}) is sampling


def test_sampling_and_loose_keywords_together_are_refused():
    with pytest.raises(TypeError, match=r"X\(\) takes either sampling= or the keywords \['max_frames'\], not both"):
        sampling_of("X", VideoSampling(max_frames=3), {"max_frames": 3})


def test_an_unknown_keyword_is_refused_like_python_refuses_it():
    with pytest.raises(TypeError, match=r"X\(\) got unexpected keyword arguments \['max_frame'\]"):
        sampling_of("X", None, {"max_frame": 3})
