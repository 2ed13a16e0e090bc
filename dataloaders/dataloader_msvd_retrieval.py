"""MSVD: train/val/test id lists and ``raw-captions.pkl``; every caption of every listed video is a sample."""

from __future__ import annotations

import logging
import os

from dataloaders.dataset_util import (
    SplitDataset,
    annotation_error,
    find_videos,
    load_raw_captions,
    read_id_list,
    warn_repeated,
)

logger = logging.getLogger(__name__)

SUBSETS = ("train", "val", "test")


class MSVD_DataLoader(SplitDataset):
    """Multi-sentence retrieval: ``cut_off_points[i]`` is the number of samples up to and including video i."""

    NAME = "MSVD"
    SUBSETS = SUBSETS

    def read_annotations(self, subset: str, data_path: str, features_path: str) -> None:
        list_path = os.path.join(data_path, f"{subset}_list.txt")
        caption_path = os.path.join(data_path, "raw-captions.pkl")
        listed = read_id_list(list_path)
        captions = load_raw_captions(caption_path)
        for line, video_id in listed:
            if video_id not in captions:
                raise annotation_error(
                    caption_path, f"key {video_id!r}", f"captions for every video of {list_path} (line {line} lists it)"
                )
        video_ids = [video_id for _line, video_id in listed]
        warn_repeated(video_ids, list_path, "each listing adds the video and its captions again, as the original does")

        self.video_dict = find_videos(features_path, video_ids)
        video_ids = self._keep_present(video_ids, list_path)

        self.cut_off_points = []
        for video_id in video_ids:
            self._pairs.extend((video_id, " ".join(words), None, None) for words in captions[video_id])
            self.cut_off_points.append(len(self._pairs))

        self.multi_sentence_per_video = True  # evaluation groups the captions of a video with cut_off_points
        if subset in ("val", "test"):
            self.sentence_num = len(self._pairs)
            self.video_num = len(video_ids)
            logger.info(f"For {subset}, sentence number: {self.sentence_num}")
            logger.info(f"For {subset}, video number: {self.video_num}")
        logger.info(f"Video number: {len(self.video_dict)}")
        logger.info(f"Total Paire: {len(self._pairs)}")

    def caption_ends(self) -> list[int]:
        return list(self.cut_off_points)
