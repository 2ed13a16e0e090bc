"""LSMDC: tab-separated annotation files, one sample per line, whole clips."""

from __future__ import annotations

import os

from dataloaders.dataset_util import SplitDataset, annotation_error, find_videos, read_lines

ANNOTATION_FILES = {
    "train": "LSMDC16_annos_training.csv",
    "val": "LSMDC16_annos_val.csv",
    "test": "LSMDC16_challenge_1000_publictect.csv",
}
FIELDS = "clip_id, start_aligned, end_aligned, start_extracted, end_extracted, sentence"


class LSMDC_DataLoader(SplitDataset):
    """One sample per annotation line (a clip id can carry several sentences), in file order."""

    NAME = "LSMDC"
    SUBSETS = tuple(ANNOTATION_FILES)

    def read_annotations(self, subset: str, data_path: str, features_path: str) -> None:
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
