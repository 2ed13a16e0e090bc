"""The model of an index, and texts and videos to the unit embeddings it ranks by.

For the loose heads (meanP, seqLSTM, seqTransf) the video side does not depend on the text, so a video embedding is
taken after the similarity head, the per-frame normalisation, the masked mean and the final normalisation, and
``exp(logit_scale) * text @ video`` is the number ``get_similarity_logits`` gives.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dataloaders.dataset_util import encode_caption
from dataloaders.rawvideo_util import RawVideoExtractor
from dataloaders.sampling import VideoSampling
from modules.clip_formats import read_checkpoint as read_model_checkpoint
from modules.modeling import CLIP4Clip, CLIP4ClipConfig
from modules.tokenization_clip import SimpleTokenizer
from search.index import DAMAGED, Index
from search.settings import ModelSpec, Weights
from util import UsageError, default_device

TEXT_BATCH = 256  # texts per forward pass: a query file of any length fits in memory


def read_checkpoint(path: str | None) -> dict[str, torch.Tensor] | None:
    """The ``--init_model`` state dict (a checkpoint file or an exported folder), or None without one."""
    return read_model_checkpoint(path, "--init_model") if path is not None else None


def load_model(
    spec: ModelSpec, state: dict[str, torch.Tensor] | None, max_frames: int, device: torch.device, max_words: int = 32
) -> CLIP4Clip:
    """CLIP4Clip in eval mode from ``spec`` and the checkpoint ``state`` (which also gives the temporal layer count
    and the tuning)."""
    try:  # the head, patch and sizes the user asked for, checked against each other
        config = CLIP4ClipConfig.from_state_dict(
            state or {},
            pretrained_clip_name=spec.pretrained_clip_name,
            sim_header=spec.sim_header,
            linear_patch=spec.linear_patch,
            max_words=max_words,
            max_frames=max_frames,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    # Modules the weights do not cover are drawn from the global RNG: seed it so index and search build the same
    # model, and fork it so the caller's stream is left as it was. Loading logs go to stderr, keeping stdout for --json.
    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(sys.stderr):
        torch.manual_seed(0)
        try:
            model = CLIP4Clip.from_config(config, state, checkpoint_name=f"--init_model {spec.init_model}")
        except (FileNotFoundError, ValueError) as e:  # how modules/ says a weights file is missing or does not fit
            raise UsageError(str(e)) from None
    return model.to(device).eval()


def fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the model's tensors, as fp16 so a GPU (fp16) and a CPU (fp32) build of the same weights agree."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu")
        if t.is_floating_point():
            t = t.half()
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def index_model(index: Index, index_dir: str | Path, weights: Weights, max_words: int) -> CLIP4Clip:
    """The model that built ``index`` (weights moved since: pass their new place); refuses any other model."""
    spec = index.settings.model.with_weights(weights)
    if spec.init_model and not Path(spec.init_model).exists():
        raise UsageError(
            f"checkpoint {spec.init_model}, which built {index_dir}, not found; pass its new location with --init_model"
        )
    state = read_checkpoint(spec.init_model)
    model = load_model(spec, state, index.settings.sampling.max_frames, default_device(), max_words)
    width = model.clip.text_projection.shape[1]
    if index.videos and index.embeddings.shape[1] != width:
        raise UsageError(
            f"{index_dir}: the stored embeddings are {index.embeddings.shape[1]} wide, the model's {width}; {DAMAGED}"
        )
    if fingerprint(model) != spec.fingerprint:
        raise UsageError(
            f"{spec.describe()} is not the model that built {index_dir}: the weights differ "
            f"(fingerprint mismatch), so its text embeddings cannot be compared with the index. "
            f"Pass the original weights, or re-index into a new --index directory."
        )
    return model


def logit_scale(model) -> float:
    """The factor ``get_similarity_logits`` puts on cosine similarities (loose heads)."""
    scale = float(model.clip.logit_scale.detach().exp())
    if not np.isfinite(scale):
        raise UsageError(f"the model's logit_scale gives a non-finite factor ({scale}): its weights are damaged")
    return scale


@functools.lru_cache(maxsize=1)
def _tokenizer() -> SimpleTokenizer:
    return SimpleTokenizer()


@torch.no_grad()
def text_embeddings(model, texts: Sequence[str], max_words: int = 32) -> torch.Tensor:
    """(len(texts), D) end-token embeddings of unit norm, on the model's device, ``TEXT_BATCH`` texts at a time."""
    tokenizer = _tokenizer()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), TEXT_BATCH):
        parts = [encode_caption(tokenizer, t, max_words) for t in texts[start : start + TEXT_BATCH]]
        ids, mask, segment = (torch.from_numpy(np.stack(x)).to(device) for x in zip(*parts))
        out.append(model.get_text_embedding(model.get_sequence_output(ids, segment, mask)))
    text = torch.cat(out)
    if not torch.isfinite(text).all():  # scores of NaN would be ranked arbitrarily and printed as invalid JSON
        raise UsageError("the model gives non-finite text embeddings (NaN or Inf): its weights are damaged")
    return text


@torch.no_grad()
def video_embeddings(model, video: torch.Tensor, video_mask: torch.Tensor) -> torch.Tensor:
    """(B, D) unit video embeddings (head included) for video (B, 1, F, 1, 3, H, W) and mask (B, 1, F)."""
    return model.get_video_embedding(model.get_visual_output(video, video_mask), video_mask)


class VideoFiles(Dataset):
    """The selected frames of each file, or the reason they could not be read."""

    def __init__(self, root: Path, paths: Sequence[str], extractor: RawVideoExtractor, sampling: VideoSampling):
        self.root, self.paths, self.extractor, self.sampling = root, list(paths), extractor, sampling

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.root / self.paths[i]
        try:
            video, mask, n_frames = self.extractor.get_video_sample(
                str(path), self.sampling.max_frames, slice_framepos=self.sampling.slice_framepos, frame_order=0
            )
        except (OSError, ValueError, cv2.error) as e:  # one bad file must not end the run; it is reported instead
            return i, None, None, 0, f"{type(e).__name__}: {e}"
        if n_frames == 0:
            return i, None, None, 0, "no frame could be decoded"
        # float64 came from float32 frames, so float32 is exact and halves what the workers send.
        return i, torch.as_tensor(video).float(), torch.as_tensor(mask), int(n_frames), ""


def _collate(items):
    good = [it for it in items if it[1] is not None]
    video = torch.stack([it[1] for it in good]) if good else None
    mask = torch.stack([it[2] for it in good]) if good else None
    failed = [(it[0], it[4]) for it in items if it[1] is None]
    return [it[0] for it in good], [it[3] for it in good], video, mask, failed


def _ignore_interrupt(worker_id: int) -> None:
    """Ctrl-C reaches the whole process group: the main process stops the run, so a decoding worker need not
    (it would print its own traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def frame_reader(model, sampling: VideoSampling) -> RawVideoExtractor:
    """Frames as the model saw them at indexing: its input size, uncropped, at the index's frame rate."""
    return RawVideoExtractor(
        centercrop=False, size=model.clip.visual.input_resolution, framerate=sampling.feature_framerate
    )


def encode_videos(
    model,
    root: Path,
    paths: Sequence[str],
    sampling: VideoSampling,
    batch_size: int = 16,
    num_workers: int = 0,
    progress: bool = True,
) -> Iterator[tuple[str, np.ndarray | None, int, str]]:
    """Yield (path, embedding or None, n_frames, error) for every file, decoding in ``num_workers`` processes."""
    device = next(model.parameters()).device
    data = VideoFiles(root, paths, frame_reader(model, sampling), sampling)
    loader = DataLoader(
        data, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate, worker_init_fn=_ignore_interrupt
    )
    with tqdm(total=len(data), unit="video", desc="encoding", disable=not progress) as bar:
        for rows, frames, video, mask, failed in loader:
            for i, error in failed:
                yield paths[i], None, 0, error
            if rows:
                emb = video_embeddings(model, video.to(device), mask.to(device)).float().cpu().numpy()
                for i, n, e in zip(rows, frames, emb):
                    yield paths[i], e, n, ""
            bar.update(len(rows) + len(failed))
