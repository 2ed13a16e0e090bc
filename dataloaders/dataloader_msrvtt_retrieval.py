"""MSR-VTT: the JSFusion 1k-A test (one caption per video) and the 7k/9k training splits."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable

from dataloaders.dataset_util import (
    Pair,
    VideoTextDataset,
    annotation_error,
    find_videos_flat,
    read_csv,
    read_json,
    require_keys,
    require_str,
    warn_repeated,
)
from dataloaders.sampling import VideoSampling

VIDEO_EXTENSIONS = (".mp4", ".webm")  # <id>.mp4, or <id>.webm when the mp4 is absent


class MSRVTT_DataLoader(VideoTextDataset):
    """MSR-VTT evaluation: one sample per CSV row (``video_id``, ``sentence``), a 1000×1000 single-sentence test."""

    def __init__(
        self,
        csv_path: str,
        features_path: str,
        tokenizer,
        max_words: int = 30,
        sampling: VideoSampling | None = None,
        **options,
    ):
        super().__init__(tokenizer, features_path, max_words, sampling, training=False, **options)
        self.data = read_csv(csv_path, ("video_id", "sentence"))
        warn_repeated(
            self.data["video_id"],
            csv_path,
            "each row is scored as a video of its own, so its copies tie with the right answer (counted as the "
            "original counts ties)",
        )
        video_ids = list(dict.fromkeys(self.data["video_id"]))
        self.video_dict = find_videos_flat(features_path, video_ids, VIDEO_EXTENSIONS)
        kept = set(self._keep_present(video_ids, csv_path))
        if len(kept) < len(video_ids):
            self.data = self.data[self.data["video_id"].isin(kept)].reset_index(drop=True)
        self._pairs = [(v, s, None, None) for v, s in zip(self.data["video_id"], self.data["sentence"])]


class MSRVTT_TrainDataLoader(VideoTextDataset):
    """MSR-VTT training: CSV video ids with captions from ``MSRVTT_data.json``.

    ``unfold_sentences`` gives one sample per caption of a listed video, in JSON order; otherwise one sample per CSV
    row, whose caption is drawn with ``random.randint`` each time the item is read.
    """

    def __init__(
        self,
        csv_path: str,
        json_path: str,
        features_path: str,
        tokenizer,
        max_words: int = 30,
        sampling: VideoSampling | None = None,
        *,
        unfold_sentences: bool = False,
        **options,
    ):
        super().__init__(tokenizer, features_path, max_words, sampling, training=True, **options)
        self.csv = read_csv(csv_path, ("video_id",))
        self.data = read_json(json_path)
        self.unfold_sentences = unfold_sentences
        sentences = _read_sentences(self.data, json_path)

        video_ids = list(dict.fromkeys(self.csv["video_id"]))
        self.video_dict = find_videos_flat(features_path, video_ids, VIDEO_EXTENSIONS)
        kept = set(self._keep_present(video_ids, csv_path))

        self.sentences: dict[str, list[str]] = defaultdict(list)
        if unfold_sentences:
            # a set, not the original's list: the same samples in linear time
            self._pairs = [(v, c, None, None) for v, c in sentences if v in kept]
        else:
            for video_id, caption in sentences:
                self.sentences[video_id].append(caption)
            for line, video_id in enumerate(self.csv["video_id"], 2):
                if video_id in kept and not self.sentences.get(video_id):
                    raise annotation_error(
                        json_path,
                        "sentences",
                        f"at least one caption for video {video_id!r} (listed in {csv_path}, line {line})",
                    )
        if len(kept) < len(video_ids):
            self.csv = self.csv[self.csv["video_id"].isin(kept)].reset_index(drop=True)
        # the ids as a plain list, resolved once: a pandas column costs more per item than reading cached frames
        self._csv_ids: list[str] = list(self.csv["video_id"])
        self.sample_len = len(self._pairs) if unfold_sentences else len(self._csv_ids)

    def __len__(self) -> int:
        return self.sample_len

    def _pair(self, idx: int) -> Pair:
        if self.unfold_sentences:
            return self._pairs[idx]
        video_id = self._csv_ids[idx]
        captions = self.sentences[video_id]
        return video_id, captions[random.randint(0, len(captions) - 1)], None, None

    def all_pairs(self) -> Iterable[Pair]:
        if self.unfold_sentences:
            return self._pairs
        return [(v, self.sentences[v][0], None, None) for v in self._csv_ids]


def _read_sentences(data, json_path: str) -> list[tuple]:
    """(video id, caption) for each entry of ``MSRVTT_data.json``'s ``sentences``, in file order."""
    require_keys(data, ("sentences",), json_path, "top level")
    if not isinstance(data["sentences"], list):
        raise annotation_error(json_path, "key 'sentences'", "a list of {video_id, caption}", data["sentences"])
    pairs = []
    for i, item in enumerate(data["sentences"]):
        where = f"sentences[{i}]"
        require_keys(item, ("video_id", "caption"), json_path, where)
        pairs.append(
            (
                require_str(item["video_id"], json_path, where + ".video_id"),
                require_str(item["caption"], json_path, where + ".caption"),
            )
        )
    return pairs
