"""DiDeMo: a video's descriptions joined into one paragraph, read over seconds [0, 31]."""

from __future__ import annotations

import os

from dataloaders.dataset_util import (
    SplitDataset,
    annotation_error,
    clip_window,
    find_videos,
    read_id_list,
    read_json,
    require_keys,
    require_str,
)

SUBSETS = ("train", "val", "test")
# Annotators saw at most 30 s of each video; the original reads [0, 31] instead of the annotated moments.
WINDOW = clip_window(0, 31)


class DiDeMo_DataLoader(SplitDataset):
    """One sample per video, in order of first appearance in ``{subset}_data.json``; the id is the file name."""

    swallow_read_errors = True  # as the original: a read error leaves zero frames (training replaces the sample)

    NAME = "DiDeMo"
    SUBSETS = SUBSETS

    def read_annotations(self, subset: str, data_path: str, features_path: str) -> None:
        list_path = os.path.join(data_path, f"{subset}_list.txt")
        json_path = os.path.join(data_path, f"{subset}_data.json")
        listed = {video_id for _line, video_id in read_id_list(list_path)}

        data = read_json(json_path)
        if not isinstance(data, list):
            raise annotation_error(json_path, "top level", "a list of {description, times, video}", type(data).__name__)
        descriptions: dict[str, list[str]] = {}
        for i, item in enumerate(data):
            require_keys(item, ("description", "video"), json_path, f"item {i}")
            video = require_str(item["video"], json_path, f"item {i}.video")
            description = require_str(item["description"], json_path, f"item {i}.description")
            if video in listed:
                descriptions.setdefault(video, []).append(description)

        video_ids = list(descriptions)
        self.video_dict = find_videos(features_path, video_ids, by_stem=False)
        kept = self._keep_present(video_ids, json_path)
        self._pairs = [(video_id, " ".join(descriptions[video_id])) + WINDOW for video_id in kept]
