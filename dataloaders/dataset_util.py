"""What the five retrieval datasets share: caption encoding, annotation reading, video discovery and bad data.

Each dataset file only turns its annotation format into (video id, caption, window) pairs and a video id → path map;
everything else (tokens, frames, missing or undecodable videos) happens here, once.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from torch.utils.data import Dataset

from dataloaders.rawvideo_util import RawVideoExtractor, UnreadableVideoError, empty_video, kept_frames_uint8
from dataloaders.sampling import VideoSampling, sampling_of
from errors import RunError, UsageError

logger = logging.getLogger(__name__)

SPECIAL_TOKEN = {"CLS_TOKEN": "<|startoftext|>", "SEP_TOKEN": "<|endoftext|>"}
LISTED_NAMES = 10  # how many missing names an error message shows
MAX_REPLACEMENTS = 100  # consecutive undecodable draws before training gives up

# (video id, caption, start second, end second); the window is None for whole videos.
Pair = tuple[str, str, int | None, int | None]


# ---------------------------------------------------------------------------------------------------------------- text
def encode_caption(tokenizer, caption: str, max_words: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Caption → (ids, mask, segment), each (1, max_words) int64: start token, BPE tokens cut so that the end token
    still fits, end token, zero padding."""
    words = [SPECIAL_TOKEN["CLS_TOKEN"]] + tokenizer.tokenize(caption)
    words = words[: max_words - 1] + [SPECIAL_TOKEN["SEP_TOKEN"]]
    ids = tokenizer.convert_tokens_to_ids(words)
    pairs_text = np.zeros((1, max_words), dtype=np.int64)
    pairs_mask = np.zeros((1, max_words), dtype=np.int64)
    pairs_segment = np.zeros((1, max_words), dtype=np.int64)
    pairs_text[0, : len(ids)] = ids
    pairs_mask[0, : len(ids)] = 1
    return pairs_text, pairs_mask, pairs_segment


def clip_window(start: float, end: float) -> tuple[int, int]:
    """The original's window clean-up: whole seconds, negatives to 0, ordered, and at least one second long."""
    start, end = max(int(start), 0), max(int(end), 0)
    if start > end:
        start, end = end, start
    elif start == end:
        end += 1
    return start, end


# --------------------------------------------------------------------------------------------------------- annotations
def annotation_error(path: str, where: str, expected: str, got: Any = None) -> UsageError:
    """A user error naming the file, the place in it and what was expected there."""
    message = f"{path}, {where}: expected {expected}"
    if got is not None:
        message += f", got {_short(got)}"
    return UsageError(message)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_lines(path: str) -> list[str]:
    """A text file's lines, without line ends (UTF-8).

    As the original (``for line in fp.readlines()``): lines end only at ``\\n``, ``\\r\\n`` or ``\\r``. Not
    ``str.splitlines``, which also splits at U+2028, U+0085, form feeds and other separators a caption may hold.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f]
    except UnicodeDecodeError as exc:
        raise annotation_error(path, f"byte {exc.start}", "UTF-8 text") from None


def read_id_list(path: str) -> list[tuple[int, str]]:
    """(line number, id) for each non-blank line of a one-id-per-line file."""
    return [(n, line.strip()) for n, line in enumerate(read_lines(path), 1) if line.strip()]


def read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except IsADirectoryError:
        raise annotation_error(path, "path", "a JSON file, not a folder") from None
    except json.JSONDecodeError as exc:
        raise annotation_error(path, f"line {exc.lineno} column {exc.colno}", f"valid JSON ({exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise annotation_error(path, f"byte {exc.start}", "UTF-8 text") from None


def read_csv(path: str, columns: Sequence[str]) -> pd.DataFrame:
    """A CSV with a header holding at least ``columns``, read as strings; every cell of those columns non-empty."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise annotation_error(path, "parsing", f"a CSV file with header columns {list(columns)} ({exc})") from None
    if frame.empty:  # refused here, at start-up, not when the first epoch is over and the evaluation finds nothing
        raise annotation_error(path, "line 2", "at least one row after the header", "no rows")
    absent = [c for c in columns if c not in frame.columns]
    if absent:
        raise annotation_error(path, "line 1 (header)", f"columns {list(columns)}", list(frame.columns))
    for column in columns:
        empty = np.flatnonzero(frame[column].str.strip().to_numpy() == "")
        if len(empty):
            # +2: one for the header, one because file lines count from 1
            raise annotation_error(path, f"line {empty[0] + 2}, column {column!r}", "a non-empty value")
    return frame


def warn_repeated(ids: Iterable[str], source: str, consequence: str) -> list[str]:
    """Log a WARNING naming the ids ``source`` lists more than once and what that does to the metrics; returns them.

    The original reads such lists as they are, so the repeats are kept (the metrics stay the original's), but never
    silently: a repeated test video is a second candidate that ties with the right one.
    """
    repeated = [video_id for video_id, n in Counter(ids).items() if n > 1]
    if repeated:
        shown = ", ".join(repeated[:LISTED_NAMES])
        if len(repeated) > LISTED_NAMES:
            shown += f" and {len(repeated) - LISTED_NAMES} more"
        logger.warning("%s lists %d video id(s) more than once: %s; %s", source, len(repeated), shown, consequence)
    return repeated


def require_keys(item: Any, keys: Sequence[str], path: str, where: str) -> None:
    if not isinstance(item, dict) or any(k not in item for k in keys):
        raise annotation_error(path, where, f"an object with keys {list(keys)}", item)


def require_str(value: Any, path: str, where: str) -> str:
    if not isinstance(value, str):
        raise annotation_error(path, where, "a string", value)
    return value


class _CaptionUnpickler(pickle.Unpickler):
    """Builds only what pickle opcodes build by themselves (dicts, lists, tuples, strings, numbers); any reference to
    a class or function, the way a pickle runs code, is refused before it is looked up."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refers to {module}.{name}; only dicts, lists and strings are allowed")


def load_raw_captions(path: str) -> dict[str, list[list[str]]]:
    """MSVD's ``raw-captions.pkl``: {video id: [[word, ...], ...]}, read without running any code it may hold."""
    try:
        with open(path, "rb") as f:
            # Python 2 pickles store text as bytes; captions are UTF-8
            captions = _CaptionUnpickler(f, encoding="utf-8").load()
    except (pickle.UnpicklingError, EOFError, UnicodeDecodeError, ValueError) as exc:
        raise annotation_error(path, "unpickling", "a pickle of {video id: [[word, ...], ...]}", str(exc)) from None
    if not isinstance(captions, dict):
        raise annotation_error(path, "top level", "a dict {video id: [[word, ...], ...]}", type(captions).__name__)
    for key, caps in captions.items():
        if not isinstance(key, str):
            raise annotation_error(path, f"key {key!r}", "a video id string")
        if not isinstance(caps, (list, tuple)):
            raise annotation_error(path, f"key {key!r}", "a list of captions", caps)
        for i, cap in enumerate(caps):
            if not isinstance(cap, (list, tuple)) or not all(isinstance(w, str) for w in cap):
                raise annotation_error(path, f"key {key!r}, caption {i}", "a list of words (strings)", cap)
    return captions


# -------------------------------------------------------------------------------------------------------------- videos
def _require_dir(features_path: str) -> None:
    if not os.path.isdir(features_path):
        raise UsageError(
            f"features_path {features_path!r} is not a directory; expected the folder that "
            f"holds the video files (--features_path)"
        )


def find_videos(features_path: str, wanted: Collection[str], by_stem: bool = True) -> dict[str, str]:
    """Walk ``features_path`` and map each wanted id to its file; the id is the file name before its last dot, or the
    whole name when ``by_stem`` is False (DiDeMo). Walked in sorted order, so the pick among duplicates is stable.
    What is not a regular file (a dangling symlink, a pipe) is no video: its id is missing, reported at build."""
    _require_dir(features_path)
    wanted = set(wanted)
    found: dict[str, str] = {}
    for root, dirs, files in os.walk(features_path):
        dirs.sort()
        for name in sorted(files):
            key = ".".join(name.split(".")[:-1]) if by_stem else name
            path = os.path.join(root, name)
            if key in wanted and os.path.isfile(path):
                found[key] = path
    return found


def find_videos_flat(features_path: str, video_ids: Iterable[str], extensions: Sequence[str]) -> dict[str, str]:
    """``<features_path>/<id><ext>`` for the first extension that is a regular file (MSR-VTT: .mp4, else .webm)."""
    _require_dir(features_path)
    names = set(os.listdir(features_path))
    found: dict[str, str] = {}
    for video_id in video_ids:
        for ext in extensions:
            path = os.path.join(features_path, video_id + ext)
            if video_id + ext in names and os.path.isfile(path):
                found[video_id] = path
                break
    return found


# ------------------------------------------------------------------------------------------------------------- dataset
class VideoTextDataset(Dataset):
    """Items ``(pairs_text, pairs_mask, pairs_segment, video, video_mask)`` from (video id, caption, window) pairs.

    A subclass reads its annotations, sets ``video_dict`` (id → file) and ``_pairs`` (or overrides ``_pair``), and
    calls ``_keep_present`` once so that missing files are reported at build time. A subclass takes a
    ``VideoSampling`` as ``sampling=``, or the original's loose keywords (``max_frames=``, ``frame_order=``, ...)
    turned into one by ``sampling_of``.
    """

    swallow_read_errors = False  # DiDeMo's original prints a read error and goes on with zero frames

    def __init__(
        self,
        tokenizer,
        features_path: str,
        max_words: int,
        sampling: VideoSampling | None = None,
        *,
        training: bool,
        frame_cache: str | None = None,
        skip_missing: bool = False,
        uint8_frames: bool = False,
        **loose_sampling: float,
    ):
        sampling = sampling_of(type(self).__name__, sampling, loose_sampling)
        self.tokenizer = tokenizer
        self.features_path = features_path
        self.max_words = max_words
        self.sampling = sampling
        self.skip_missing = skip_missing
        self.training = training
        # True: ``video`` holds the uint8 pixels and the reader normalises them (rawvideo_util.normalize_video), so a
        # DataLoader moves uint8 instead of float64. False, as the original: the normalised float64 frames.
        self.uint8_frames = uint8_frames
        self.rawVideoExtractor = RawVideoExtractor(
            framerate=sampling.feature_framerate, size=sampling.image_resolution, cache_dir=frame_cache
        )
        self.video_dict: dict[str, str] = {}
        self._pairs: list[Pair] = []
        self.missing_videos: list[str] = []
        # Counted per process: with DataLoader workers each worker counts its own share (and logs each event).
        self.n_undecodable = 0
        self.n_replaced = 0
        self.undecodable_videos: dict[str, int] = {}

    # The original's attributes, read-only: the sampling is one frozen value, so that a change cannot reach half of it.
    max_frames = property(lambda self: self.sampling.max_frames)
    feature_framerate = property(lambda self: self.sampling.feature_framerate)
    frame_order = property(lambda self: self.sampling.frame_order)
    slice_framepos = property(lambda self: self.sampling.slice_framepos)

    def __len__(self) -> int:
        return len(self._pairs)

    def _pair(self, idx: int) -> Pair:
        return self._pairs[idx]

    def _keep_present(self, video_ids: Sequence[str], source: str) -> list[str]:
        """The ids that have a file. Missing ones raise one error listing them, unless ``skip_missing``: then they
        are dropped and reported (training) or the reduced benchmark is announced (evaluation)."""
        if not video_ids:
            raise annotation_error(source, "contents", "at least one video", "none")
        missing = [v for v in video_ids if v not in self.video_dict]
        self.missing_videos = missing
        if not missing:
            return list(video_ids)
        total = len(video_ids)
        shown = ", ".join(missing[:LISTED_NAMES])
        if len(missing) > LISTED_NAMES:
            shown += f" and {len(missing) - LISTED_NAMES} more"
        message = (
            f"{len(missing)} of {total} videos listed in {source} have no file under {self.features_path}: {shown}"
        )
        if not self.skip_missing:
            action = "train without them" if self.training else "evaluate on the videos present"
            raise UsageError(
                f"{message}. Check the layout with preprocess/check_dataset.py, or pass "
                f"--skip_missing_videos to {action}."
            )
        kept = [v for v in video_ids if v in self.video_dict]
        if not kept:
            raise UsageError(f"{message}: nothing is left to {'train on' if self.training else 'evaluate'}")
        if self.training:
            logger.warning("%s; training without them (%d videos kept)", message, len(kept))
        else:
            note = f"evaluating on {len(kept)} of {total} videos ({message})"
            logger.warning(note)
        return kept

    def _get_text(self, caption: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return encode_caption(self.tokenizer, caption, self.max_words)

    def _get_rawvideo(self, video_id: str, start: int | None, end: int | None):
        """(video, video_mask, number of frames read) for one video id and window."""
        path = self.video_dict[video_id]
        try:
            video, video_mask, n_frames = self.rawVideoExtractor.get_video_sample(
                path, self.max_frames, self.slice_framepos, self.frame_order, start, end, uint8=self.uint8_frames
            )
        except Exception as exc:
            if not self.swallow_read_errors and not isinstance(exc, UnreadableVideoError):
                logger.error("video path: %s error. video id: %s, start: %s, end: %s", path, video_id, start, end)
                raise
            logger.warning(
                "video path: %s error. video id: %s, start: %s, end: %s, error: %s", path, video_id, start, end, exc
            )
            video = empty_video(self.max_frames, self.rawVideoExtractor.size, self.uint8_frames)
            video_mask = np.zeros((1, self.max_frames), dtype=np.int64)
            n_frames = 0
        if n_frames == 0:
            self.n_undecodable += 1
            self.undecodable_videos[path] = self.undecodable_videos.get(path, 0) + 1
        return video, video_mask, n_frames

    def __getitem__(self, idx: int):
        video_id, caption, start, end = self._pair(idx)
        video, video_mask, n_frames = self._get_rawvideo(video_id, start, end)
        tries = 0
        while n_frames == 0:
            path = self.video_dict[video_id]
            if not self.training:
                logger.warning(
                    "no frame decoded from %s (video id %s): it stays all zeros with mask 0, as in the "
                    "original (%d undecodable so far in this process)",
                    path,
                    video_id,
                    self.n_undecodable,
                )
                break
            if tries == MAX_REPLACEMENTS:
                raise RunError(
                    f"{tries} samples in a row had no decodable frame (last: {path}); check the videos "
                    f"under {self.features_path} with preprocess/check_dataset.py"
                )
            tries += 1
            # A zero video would give a zero embedding and a NaN loss; train on another sample instead.
            new_idx = random.randrange(len(self))
            self.n_replaced += 1
            logger.warning(
                "no frame decoded from %s (video id %s); sample %d replaced by sample %d "
                "(%d replaced so far in this process)",
                path,
                video_id,
                idx,
                new_idx,
                self.n_replaced,
            )
            idx = new_idx
            video_id, caption, start, end = self._pair(idx)
            video, video_mask, n_frames = self._get_rawvideo(video_id, start, end)
        pairs_text, pairs_mask, pairs_segment = self._get_text(caption)
        return pairs_text, pairs_mask, pairs_segment, video, video_mask

    def video_requests(self) -> list[tuple[str, int | None, int | None]]:
        """Each distinct (video file, start, end) the items read, in first-use order (for preprocess/check_dataset)."""
        seen: dict[tuple[str, int | None, int | None], None] = {}
        for video_id, _caption, start, end in self.all_pairs():
            seen.setdefault((self.video_dict[video_id], start, end), None)
        return list(seen)

    def all_pairs(self) -> Iterable[Pair]:
        """Every (video id, caption, start, end), without drawing anything at random."""
        return self._pairs

    def caption_ends(self) -> list[int] | None:
        """With several captions per video, pairs grouped by video: the number of pairs up to and including each
        video. None when each pair is its own video."""
        return None

    def encode_text(self, caption: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(pairs_text, pairs_mask, pairs_segment)`` of a caption, as an item carries them."""
        return self._get_text(caption)

    def kept_frames_uint8(self, pair_index: int) -> np.ndarray:
        """The frames the model sees of pair ``pair_index``'s video, in time order, before normalisation:
        uint8 RGB [n, 3, size, size] (n = 0 when nothing could be decoded)."""
        video_id, _caption, start, end = self._pairs[pair_index]
        return kept_frames_uint8(
            self.rawVideoExtractor, self.video_dict[video_id], self.max_frames, self.slice_framepos, start, end
        )


class SplitDataset(VideoTextDataset):
    """A data set whose split is named (``subset``) and whose annotations sit in one folder (``data_path``): MSVD,
    LSMDC, ActivityNet and DiDeMo. A subclass names its ``SUBSETS`` and reads its annotations in
    ``read_annotations``; ``options`` are :class:`VideoTextDataset`'s (and the original's sampling keywords)."""

    NAME = ""
    SUBSETS: tuple[str, ...] = ()

    def __init__(
        self,
        subset: str,
        data_path: str,
        features_path: str,
        tokenizer,
        max_words: int = 30,
        sampling: VideoSampling | None = None,
        **options,
    ):
        if subset not in self.SUBSETS:
            raise ValueError(f"{self.NAME} subset must be one of {self.SUBSETS}, got {subset!r}")
        super().__init__(tokenizer, features_path, max_words, sampling, training=subset == "train", **options)
        self.subset = subset
        self.data_path = data_path
        self.read_annotations(subset, data_path, features_path)

    def read_annotations(self, subset: str, data_path: str, features_path: str) -> None:
        raise NotImplementedError
