"""Shared fixtures: tiny CLIP-shaped weights and tiny videos, built on the fly (nothing is downloaded)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The suite checks numbers against CPU fp32 references (and the gloo backend for two-process runs). On a GPU machine
# the code would pick CUDA, fp16 weights and NCCL, so the GPU is hidden from the tests and from the processes they
# start; set CLIP4CLIP_TEST_KEEP_GPU=1 to leave it visible.
if os.environ.get("CLIP4CLIP_TEST_KEEP_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REAL_ANNOTATIONS = ROOT.parent / "shared" / "real_annotations"


def _block(prefix: str, width: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One OpenAI residual block's tensors under ``prefix`` (e.g. ``transformer.resblocks.0.``)."""

    def rnd(*shape, std=0.02):
        return torch.randn(*shape, generator=gen) * std

    return {
        prefix + "attn.in_proj_weight": rnd(3 * width, width),
        prefix + "attn.in_proj_bias": rnd(3 * width),
        prefix + "attn.out_proj.weight": rnd(width, width),
        prefix + "attn.out_proj.bias": rnd(width),
        prefix + "ln_1.weight": 1 + rnd(width, std=0.1),
        prefix + "ln_1.bias": rnd(width),
        prefix + "mlp.c_fc.weight": rnd(4 * width, width),
        prefix + "mlp.c_fc.bias": rnd(4 * width),
        prefix + "mlp.c_proj.weight": rnd(width, 4 * width),
        prefix + "mlp.c_proj.bias": rnd(width),
        prefix + "ln_2.weight": 1 + rnd(width, std=0.1),
        prefix + "ln_2.bias": rnd(width),
    }


def make_clip_state_dict(
    embed_dim: int = 512,
    image_resolution: int = 32,
    vision_layers: int = 2,
    vision_width: int = 64,
    vision_patch_size: int = 16,
    context_length: int = 77,
    vocab_size: int = 49408,
    transformer_width: int = 512,
    transformer_layers: int = 2,
    seed: int = 0,
    jit_extras: bool = False,
) -> dict[str, torch.Tensor]:
    """A random state dict with exactly OpenAI's ViT CLIP key layout and shapes.

    Defaults give a tiny model whose text width is 512, as the CLIP4Clip heads require.
    ``jit_extras`` adds the three scalar entries that OpenAI's TorchScript archives carry.
    """
    gen = torch.Generator().manual_seed(seed)
    grid = image_resolution // vision_patch_size

    def rnd(*shape, std=0.02):
        return torch.randn(*shape, generator=gen) * std

    sd: dict[str, torch.Tensor] = {
        "positional_embedding": rnd(context_length, transformer_width, std=0.01),
        "text_projection": rnd(transformer_width, embed_dim, std=transformer_width**-0.5),
        "logit_scale": torch.tensor(float(np.log(1 / 0.07))),
        "visual.class_embedding": rnd(vision_width, std=vision_width**-0.5),
        "visual.positional_embedding": rnd(grid * grid + 1, vision_width, std=vision_width**-0.5),
        "visual.proj": rnd(vision_width, embed_dim, std=vision_width**-0.5),
        "visual.conv1.weight": rnd(vision_width, 3, vision_patch_size, vision_patch_size),
        "visual.ln_pre.weight": 1 + rnd(vision_width, std=0.1),
        "visual.ln_pre.bias": rnd(vision_width),
    }
    for i in range(vision_layers):
        sd.update(_block(f"visual.transformer.resblocks.{i}.", vision_width, gen))
    sd["visual.ln_post.weight"] = 1 + rnd(vision_width, std=0.1)
    sd["visual.ln_post.bias"] = rnd(vision_width)
    sd["token_embedding.weight"] = rnd(vocab_size, transformer_width)
    for i in range(transformer_layers):
        sd.update(_block(f"transformer.resblocks.{i}.", transformer_width, gen))
    sd["ln_final.weight"] = 1 + rnd(transformer_width, std=0.1)
    sd["ln_final.bias"] = rnd(transformer_width)
    if jit_extras:
        sd["input_resolution"] = torch.tensor(image_resolution)
        sd["context_length"] = torch.tensor(context_length)
        sd["vocab_size"] = torch.tensor(vocab_size)
    return sd


@pytest.fixture(scope="session")
def tiny_clip_state_dict() -> dict[str, torch.Tensor]:
    """Tiny CLIP: text width 512 (2 layers), vision width 64 (2 layers), 32x32 images, 16x16 patches."""
    return make_clip_state_dict()


@pytest.fixture(scope="session")
def tiny_clip_file(tmp_path_factory, tiny_clip_state_dict) -> Path:
    """The tiny CLIP state dict saved as a plain ``torch.save`` file."""
    path = tmp_path_factory.mktemp("clip") / "tiny-clip.pt"
    torch.save(tiny_clip_state_dict, path)
    return path


def write_video(path: Path, n_frames: int, fps: float, size=(64, 48), fourcc: str = "mp4v", seed: int = 0) -> Path:
    """Write a small colour video with cv2; every frame differs, so frame selection is observable.

    Frame k carries its index in the top-left block's brightness, so tests can read back which frames were used.
    """
    import cv2

    w, h = size
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
    if not writer.isOpened():
        raise RuntimeError(f"cv2 cannot write {fourcc} video to {path}")
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    for k in range(n_frames):
        frame = np.roll(base, shift=k * 3, axis=1).copy()
        frame[: h // 2, : w // 2] = (k * 7) % 256
        writer.write(frame)
    writer.release()
    return path


def write_lying_avi(path: Path, n_frames: int, claimed_frames: int) -> Path:
    """An MJPEG AVI of ``n_frames`` real frames whose header claims ``claimed_frames`` (the main header's total frames,
    the stream header's length and the OpenDML frame count), as a damaged or hostile file does."""
    import struct

    write_video(path, n_frames, 10, size=(32, 24), fourcc="MJPG")
    data = bytearray(path.read_bytes())
    for chunk, offset in ((b"avih", 16), (b"strh", 32), (b"dmlh", 0)):
        at = data.find(chunk)
        if at >= 0:
            struct.pack_into("<I", data, at + 8 + offset, claimed_frames)
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def video_writer():
    """Expose :func:`write_video` to tests."""
    return write_video


@pytest.fixture(scope="session")
def real_annotations() -> Path:
    """``../shared/real_annotations`` beside the checkout; skipped (with the reason) when absent."""
    if not REAL_ANNOTATIONS.is_dir():
        pytest.skip(f"real annotation files not found at {REAL_ANNOTATIONS} (they sit beside the project checkout)")
    return REAL_ANNOTATIONS


@pytest.fixture(scope="session")
def tokenizer():
    """Our CLIP tokenizer (one instance: its BPE cache is shared by every test)."""
    from modules.tokenization_clip import SimpleTokenizer

    return SimpleTokenizer()


@pytest.fixture(scope="session")
def reference():
    """open_clip's copy of OpenAI's tokenizer: the independent reference for token ids."""
    from open_clip.tokenizer import SimpleTokenizer as OpenClipTokenizer

    return OpenClipTokenizer()
