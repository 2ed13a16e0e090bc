"""LSMDC: tab-separated annotation files, one sample per line, whole clips."""

from __future__ import annotations

import os

from dataloaders.dataset_util import VideoTextDataset, annotation_error, find_videos, read_lines
from dataloaders.sampling import VideoSampling, sampling_of

ANNOTATION_FILES = {
    "train": "LSMDC16_annos_training.csv",
    "val": "LSMDC16_annos_val.csv",
    "test": "LSMDC16_challenge_1000_publictect.csv",
}
FIELDS = "clip_id, start_aligned, end_aligned, start_extracted, end_extracted, sentence"


class LSMDC_DataLoader(VideoTextDataset):
    """One sample per annotation line (a clip id can carry several sentences), in file order."""

    def __init__(
        self,
        subset: str,
        data_path: str,
        features_path: str,
        tokenizer,
        max_words: int = 30,
        sampling: VideoSampling | None = None,
        *,
        frame_cache: str | None = None,
        skip_missing: bool = False,
        uint8_frames: bool = False,
        **loose_sampling: float,
    ):
        if subset not in ANNOTATION_FILES:
            raise ValueError(f"LSMDC subset must be one of {tuple(ANNOTATION_FILES)}, got {subset!r}")
        super().__init__(
            tokenizer,
            features_path,
            max_words,
            sampling_of(type(self).__name__, sampling, loose_sampling),
            frame_cache,
            skip_missing,
            training=subset == "train",
            uint8_frames=uint8_frames,
        )
        self.data_path = data_path
        self.subset = subset
        path = os.path.join(data_path, ANNOTATION_FILES[subset])
        pairs = []
        for line, text in enumerate(read_lines(path), 1):
            fields = text.strip().split("\t")
            if len(fields) != 6:
                raise annotation_error(
                    path, f"line {line}", f"6 tab-separated fields ({FIELDS})", f"{len(fields)} field(s)"
                )
            pairs.append((fields[0], fields[5]))
        clip_ids = list(dict.fromkeys(clip_id for clip_id, _sentence in pairs))

        self.video_dict = find_videos(features_path, clip_ids)
        kept = set(self._keep_present(clip_ids, path))
        self._pairs = [(clip_id, sentence, None, None) for clip_id, sentence in pairs if clip_id in kept]
