"""ActivityNet Captions: a video's sentences joined into one paragraph, read over the whole video."""

from __future__ import annotations

import logging
import math
import os

from dataloaders.dataset_util import (
    SplitDataset,
    annotation_error,
    clip_window,
    find_videos,
    read_json,
    require_keys,
    require_str,
)

logger = logging.getLogger(__name__)

ID_FILES = {"train": "train_ids.json", "val": "val_ids.json"}
CAPTION_FILES = {"train": "train.json", "val": "val_1.json"}


class ActivityNet_DataLoader(SplitDataset):
    """One sample per id of ``{subset}_ids.json`` that has captions and a video; ids are ``v_<file stem>``."""

    NAME = "ActivityNet"
    SUBSETS = tuple(ID_FILES)

    def read_annotations(self, subset: str, data_path: str, features_path: str) -> None:
        ids_path = os.path.join(data_path, ID_FILES[subset])
        captions_path = os.path.join(data_path, CAPTION_FILES[subset])

        logger.info(f"Loading json: {ids_path}")
        pseudo_ids = _read_ids(ids_path)
        paragraphs = _read_paragraphs(captions_path)
        logger.info(f"video id list: {len(pseudo_ids)}")
        logger.info(f"pseudo caption dict: {len(paragraphs)}")

        without_captions = [p for p in pseudo_ids if p not in paragraphs]
        if without_captions:
            logger.warning(
                f"{len(without_captions)} ids of {ids_path} have no entry in {captions_path}; skipped as "
                f"in the original (first: {without_captions[0]})"
            )
        video_ids = [p[2:] for p in pseudo_ids if p in paragraphs]  # "v_<stem>" → "<stem>"
        self.video_dict = find_videos(features_path, video_ids)
        logger.info(f"video dict: {len(self.video_dict)}")
        kept = set(self._keep_present(video_ids, ids_path))

        for pseudo_id in pseudo_ids:
            if pseudo_id in paragraphs and pseudo_id[2:] in kept:
                text, duration = paragraphs[pseudo_id]
                start, end = clip_window(0, math.ceil(duration))
                self._pairs.append((pseudo_id[2:], text, start, end))


def _read_ids(path: str) -> list:
    """The ids in file order, each once (the original prints ``reduplicate.`` for a repeat)."""
    data = read_json(path)
    if not isinstance(data, list):
        raise annotation_error(path, "top level", 'a list of video ids ("v_...")', type(data).__name__)
    ids, seen = [], set()
    for i, pseudo_id in enumerate(data):
        require_str(pseudo_id, path, f"item {i}")
        if pseudo_id in seen:
            logger.info("reduplicate.")
            continue
        seen.add(pseudo_id)
        ids.append(pseudo_id)
    return ids


def _read_paragraphs(path: str) -> dict:
    """{id: (sentences joined with single spaces, duration in seconds)}."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise annotation_error(
            path, "top level", "an object {id: {duration, timestamps, sentences}}", type(data).__name__
        )
    paragraphs = {}
    for pseudo_id, entry in data.items():
        where = f"key {pseudo_id!r}"
        require_keys(entry, ("duration", "sentences"), path, where)
        sentences = entry["sentences"]
        if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
            raise annotation_error(path, where + ".sentences", "a list of strings", sentences)
        try:
            duration = float(entry["duration"])
        except (TypeError, ValueError):
            raise annotation_error(path, where + ".duration", "a number of seconds", entry["duration"]) from None
        if not math.isfinite(duration):
            raise annotation_error(path, where + ".duration", "a finite number of seconds", entry["duration"])
        paragraphs[pseudo_id] = (" ".join(sentences), duration)
    return paragraphs
