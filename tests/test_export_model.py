"""export_model.py: a checkpoint → safetensors folder → the same scores; its CLIP towers → transformers' embeddings."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import export_model
from modules.clip_formats import read_exported
from modules.modeling import CLIP4Clip, CLIP4ClipConfig

MAX_WORDS, MAX_FRAMES = 8, 3
TINY = "tiny-random-ViT/16"


def config(sim_header: str) -> CLIP4ClipConfig:
    return CLIP4ClipConfig(
        pretrained_clip_name=TINY, sim_header=sim_header, max_words=MAX_WORDS, max_frames=MAX_FRAMES, precision="fp32"
    )


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """A trained-looking model: every weight moved off its initial value, so a weight left behind shows."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return model.eval()


def inputs() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(2)
    ids = torch.tensor([[49406, 320, 1929, 49407, 0, 0, 0, 0], [49406, 2368, 49407, 0, 0, 0, 0, 0]])
    video = torch.randn(2, 1, 1, MAX_FRAMES, 3, 64, 64, generator=gen)
    return ids, (ids != 0).long(), video, torch.ones(2, MAX_FRAMES, dtype=torch.long)


@torch.no_grad()
def scores(model: CLIP4Clip) -> torch.Tensor:
    ids, mask, video, video_mask = inputs()
    text = model.get_sequence_output(ids, torch.zeros_like(ids), mask)
    visual = model.get_visual_output(video, video_mask)
    return model.get_similarity_logits(text, visual, mask, video_mask, loose_type=True)[0]


@pytest.mark.parametrize("sim_header", ["meanP", "seqTransf"])
def test_export_round_trip_gives_identical_scores(tmp_path, sim_header):
    model = perturbed(CLIP4Clip.from_config(config(sim_header)))
    checkpoint = tmp_path / "pytorch_model.bin.0"
    torch.save(model.state_dict(), checkpoint)
    assert export_model.main(["--init_model", str(checkpoint), "--output_dir", str(tmp_path / "out")]) == 0

    state, saved = read_exported(tmp_path / "out")
    assert saved["model"] == {"linear_patch": "2d", "sim_header": sim_header, "tuning": "full"} | (
        {"cross_num_hidden_layers": 4} if sim_header == "seqTransf" else {}
    )
    assert saved["clip"]["vision_patch_size"] == 16 and saved["clip"]["transformer_width"] == 512
    # Self-contained: built on its own CLIP, the default name's file is not needed.
    as_saved = dataclasses.replace(config(sim_header), pretrained_clip_name="ViT-B/32", **saved["model"])
    loaded = CLIP4Clip.from_config(as_saved, state).eval()
    assert torch.equal(scores(loaded), scores(model))


def test_hf_folder_gives_the_same_clip_embeddings(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = perturbed(CLIP4Clip.from_config(config("meanP")))
    checkpoint = tmp_path / "pytorch_model.bin.0"
    torch.save(model.state_dict(), checkpoint)
    export_model.export(str(checkpoint), str(tmp_path / "out"), hf_dir=str(tmp_path / "hf"))

    hf = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    ids, _, video, _ = inputs()
    images = video.view(-1, 3, 64, 64)
    with torch.no_grad():
        for ours, theirs in (
            (model.clip.encode_image(images), hf.get_image_features(pixel_values=images)),
            (model.clip.encode_text(ids), hf.get_text_features(input_ids=ids)),
        ):
            theirs = theirs if isinstance(theirs, torch.Tensor) else theirs.pooler_output
            assert (ours - theirs).abs().max().item() < 1e-5
    assert hf.logit_scale.item() == pytest.approx(model.clip.logit_scale.item())
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["text_config"]["eos_token_id"] == 49407


def test_checkpoint_without_clip_weights_needs_pretrained_clip_name(tmp_path, capsys):
    head_only = {"transformerClip.resblocks.0.ln_1.weight": torch.ones(512)}
    checkpoint = tmp_path / "pytorch_model.bin.0"
    torch.save(head_only, checkpoint)
    assert export_model.main(["--init_model", str(checkpoint), "--output_dir", str(tmp_path / "out")]) == 2
    assert "holds no CLIP weights ('clip.*'); give --pretrained_clip_name" in capsys.readouterr().err

    args = ["--init_model", str(checkpoint), "--output_dir", str(tmp_path / "out"), "--pretrained_clip_name", TINY]
    assert export_model.main(args) == 0
    state, saved = read_exported(tmp_path / "out")
    assert "clip.visual.conv1.weight" in state and "clip.input_resolution" not in state
    assert saved["model"]["sim_header"] == "seqTransf"
