"""CLIP4Clip on a tiny CLIP: shapes, masking, heads against hand re-computations, load-time copies, key layout,
freezing, precision, checkpointing, and the loss."""

from __future__ import annotations

import dataclasses
import logging
import types
from collections.abc import Sequence

import pytest
import torch
from conftest import make_clip_state_dict

from modules.modeling import CLIP4Clip, CLIP4ClipConfig, freeze_clip_layers, implied_by_state_dict, resolve_precision
from modules.module_cross import CrossConfig

HEADS = ["meanP", "seqLSTM", "seqTransf", "tightTransf"]
LOOSE = ["meanP", "seqLSTM", "seqTransf"]
MAX_WORDS, MAX_FRAMES = 8, 4
# conftest's tiny CLIP with a 1024-token vocabulary: the 49408-row embedding table dominates build time, and the
# end-token rule only needs the end id to be the largest id in the row.
VOCAB = 1024
END_ID = VOCAB - 1

BLOCK_SUFFIXES = [
    "attn.in_proj_weight",
    "attn.in_proj_bias",
    "attn.out_proj.weight",
    "attn.out_proj.bias",
    "ln_1.weight",
    "ln_1.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
]
# OpenAI's key layout for the tiny CLIP of conftest (2 text and 2 visual blocks), prefixed as CLIP4Clip stores it.
CLIP_KEYS = (
    [
        "clip.positional_embedding",
        "clip.text_projection",
        "clip.logit_scale",
        "clip.visual.class_embedding",
        "clip.visual.positional_embedding",
        "clip.visual.proj",
        "clip.visual.conv1.weight",
        "clip.visual.ln_pre.weight",
        "clip.visual.ln_pre.bias",
        "clip.visual.ln_post.weight",
        "clip.visual.ln_post.bias",
        "clip.token_embedding.weight",
        "clip.ln_final.weight",
        "clip.ln_final.bias",
    ]
    + [f"clip.visual.transformer.resblocks.{i}.{s}" for i in range(2) for s in BLOCK_SUFFIXES]
    + [f"clip.transformer.resblocks.{i}.{s}" for i in range(2) for s in BLOCK_SUFFIXES]
)
HEAD_KEYS: dict[str, list[str]] = {
    "meanP": [],
    "seqLSTM": [
        "frame_position_embeddings.weight",
        "lstm_visual.weight_ih_l0",
        "lstm_visual.weight_hh_l0",
        "lstm_visual.bias_ih_l0",
        "lstm_visual.bias_hh_l0",
    ],
    "seqTransf": ["frame_position_embeddings.weight"]
    + [f"transformerClip.resblocks.{i}.{s}" for i in range(2) for s in BLOCK_SUFFIXES],
    "tightTransf": ["cross.embeddings.position_embeddings.weight"]
    + [f"cross.transformer.resblocks.{i}.{s}" for i in range(2) for s in BLOCK_SUFFIXES]
    + [
        "cross.pooler.ln_pool.weight",
        "cross.pooler.ln_pool.bias",
        "cross.pooler.dense.weight",
        "cross.pooler.dense.bias",
        "similarity_dense.weight",
        "similarity_dense.bias",
    ],
}


def make_config(clip_file, head: str, linear_patch: str = "2d", **overrides) -> CLIP4ClipConfig:
    fields = dict(
        pretrained_clip_name=str(clip_file),
        linear_patch=linear_patch,
        sim_header=head,
        cross_num_hidden_layers=2,
        max_words=MAX_WORDS,
        max_frames=MAX_FRAMES,
    )
    return CLIP4ClipConfig(**{**fields, **overrides})


def build(clip_file, head: str, linear_patch: str = "2d", state_dict=None, seed: int = 0, **overrides) -> CLIP4Clip:
    torch.manual_seed(seed)
    cfg = make_config(clip_file, head, linear_patch, **overrides)
    return CLIP4Clip.from_pretrained("cross-base", state_dict=state_dict, task_config=cfg)


@pytest.fixture(scope="module")
def clip_state_dict() -> dict[str, torch.Tensor]:
    return make_clip_state_dict(vocab_size=VOCAB)


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory, clip_state_dict):
    path = tmp_path_factory.mktemp("clip") / "tiny-clip-small-vocab.pt"
    torch.save(clip_state_dict, path)
    return path


@pytest.fixture(scope="module")
def model_of(clip_file):
    """Shared eval-mode models, one per (head, patch); tests that change a model build their own."""
    cache: dict[tuple, CLIP4Clip] = {}

    def get(head: str, linear_patch: str = "2d") -> CLIP4Clip:
        if (head, linear_patch) not in cache:
            cache[head, linear_patch] = build(clip_file, head, linear_patch).eval()
        return cache[head, linear_patch]

    return get


def make_inputs(batch: int, frames: int, lengths: Sequence[int] | None = None, seed: int = 0):
    """A batch in the data loader's layout; frames past ``lengths[b]`` are zero with mask 0."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, END_ID, (batch, 1, MAX_WORDS), generator=gen)
    attention_mask = torch.zeros_like(ids)
    for b in range(batch):
        end = 2 + b % (MAX_WORDS - 2)
        ids[b, 0, end] = END_ID
        ids[b, 0, end + 1 :] = 0
        attention_mask[b, 0, : end + 1] = 1
    segment_ids = torch.zeros_like(ids)
    video = torch.randn(batch, 1, frames, 1, 3, 32, 32, generator=gen, dtype=torch.float64)
    video_mask = torch.ones(batch, 1, frames, dtype=torch.long)
    if lengths is not None:
        for b, n in enumerate(lengths):
            video_mask[b, 0, n:] = 0
            video[b, 0, n:] = 0
    return ids, segment_ids, attention_mask, video, video_mask


def logits_of(model: CLIP4Clip, inputs) -> torch.Tensor:
    ids, seg, am, video, vm = inputs
    seq, vis = model.get_sequence_visual_output(ids, seg, am, video, vm)
    return model.get_similarity_logits(seq, vis, am, vm, loose_type=model.loose_type)[0]


# --- shapes and masking -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_shapes_for_batch_and_frame_counts(model_of, head):
    model = model_of(head)
    for batch in (1, 3):
        for frames in (1, MAX_FRAMES):
            ids, seg, am, video, vm = make_inputs(batch, frames)
            with torch.no_grad():
                seq, vis = model.get_sequence_visual_output(ids, seg, am, video, vm)
                logits, extra = model.get_similarity_logits(seq, vis, am, vm, loose_type=model.loose_type)
                assert model(ids, seg, am, video, vm) is None  # eval mode returns no loss
            assert seq.shape == (batch, 1, 512) and vis.shape == (batch, frames, 512)
            assert seq.dtype == vis.dtype == torch.float32
            assert logits.shape == (batch, batch) and extra == ()
            assert torch.isfinite(logits).all()


@pytest.mark.parametrize("head", HEADS)
def test_padded_frames_never_change_the_output(model_of, head):
    model = model_of(head)
    inputs = make_inputs(3, MAX_FRAMES, lengths=[4, 2, 1])
    ids, seg, am, video, vm = inputs
    noisy = video.clone()
    noisy[1, 0, 2:] = 50 * torch.randn_like(noisy[1, 0, 2:])
    noisy[2, 0, 1:] = -7.0
    with torch.no_grad():
        base = logits_of(model, inputs)
        changed = logits_of(model, (ids, seg, am, noisy, vm))
    assert torch.allclose(base, changed, rtol=0, atol=1e-6)

    model.train()
    try:
        torch.manual_seed(5)
        loss = model(ids, seg, am, video, vm)
        torch.manual_seed(5)
        loss_noisy = model(ids, seg, am, noisy, vm)
    finally:
        model.eval()
    assert abs(loss.item() - loss_noisy.item()) < 1e-6


# --- heads against independent re-computations -------------------------------------------------------------------


def reference_loose_logits(model: CLIP4Clip, seq, vis, lengths: Sequence[int]) -> torch.Tensor:
    """Each video alone, using only its valid frames: head, unit frames, plain mean, unit video, scaled dot."""
    videos = []
    for b, n in enumerate(lengths):
        frames = vis[b, :n]
        if model.sim_header == "seqLSTM":
            out, _ = model.lstm_visual(frames.unsqueeze(0))
            frames = out[0] + frames
        elif model.sim_header == "seqTransf":
            x = frames + model.frame_position_embeddings.weight[:n]
            x = model.transformerClip(x.unsqueeze(1), torch.zeros(1, n, n)).squeeze(1)
            frames = x + frames
        frames = frames / frames.norm(dim=-1, keepdim=True)
        mean = frames.mean(dim=0)
        videos.append(mean / mean.norm())
    text = seq[:, 0] / seq[:, 0].norm(dim=-1, keepdim=True)
    return model.clip.logit_scale.exp() * text @ torch.stack(videos).T


@pytest.mark.parametrize("head", LOOSE)
def test_loose_heads_match_hand_computation_with_ragged_lengths(model_of, head):
    model = model_of(head)
    lengths = [2, 4, 1]  # unsorted: packing must not need sorted lengths
    ids, seg, am, video, vm = make_inputs(3, MAX_FRAMES, lengths=lengths, seed=3)
    with torch.no_grad():
        seq, vis = model.get_sequence_visual_output(ids, seg, am, video, vm)
        logits, _ = model.get_similarity_logits(seq, vis, am, vm, loose_type=True)
        expected = reference_loose_logits(model, seq, vis, lengths)
    assert torch.allclose(logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("head", LOOSE)
def test_embeddings_reproduce_the_loose_logits(model_of, head):
    model = model_of(head)
    lengths = [3, 4, 1, 2]
    ids, seg, am, video, vm = make_inputs(4, MAX_FRAMES, lengths=lengths, seed=14)
    with torch.no_grad():
        seq, vis = model.get_sequence_visual_output(ids, seg, am, video, vm)
        logits, _ = model.get_similarity_logits(seq, vis, am, vm, loose_type=True)
        text = model.get_text_embedding(seq)
        videos = model.get_video_embedding(vis, vm)  # the loader's (B, 1, F) mask
        per_video = torch.cat(
            [model.get_video_embedding(vis[b : b + 1, :n], vm[b : b + 1, :, :n]) for b, n in enumerate(lengths)]
        )
    assert text.shape == videos.shape == (4, 512)
    assert torch.allclose(text.norm(dim=-1), torch.ones(4), rtol=0, atol=1e-6)
    assert torch.allclose(videos.norm(dim=-1), torch.ones(4), rtol=0, atol=1e-6)
    scale = model.clip.logit_scale.exp()
    assert torch.allclose(scale * text @ videos.T, logits, rtol=0, atol=1e-6)
    # Padding does not reach the embedding: each video cut to its valid frames gives the same vector.
    assert torch.allclose(per_video, videos, rtol=0, atol=1e-6)
    expected = reference_loose_logits(model, seq, vis, lengths)
    assert torch.allclose(scale * text @ videos.T, expected, rtol=0, atol=1e-5)


def test_video_embedding_needs_a_loose_head(model_of):
    ids, seg, am, video, vm = make_inputs(2, 2)
    model = model_of("tightTransf")
    with torch.no_grad():
        vis = model.get_visual_output(video, vm)
    with pytest.raises(ValueError, match="per-video embedding"):
        model.get_video_embedding(vis, vm)


def test_tight_transf_logits_equal_a_per_pair_loop(model_of):
    model = model_of("tightTransf")
    ids, seg, am, _, _ = make_inputs(2, MAX_FRAMES, seed=4)
    _, _, _, video, vm = make_inputs(3, MAX_FRAMES, lengths=[4, 2, 3], seed=5)
    with torch.no_grad():
        seq = model.get_sequence_output(ids, seg, am)
        vis = model.get_visual_output(video, vm)
        logits, _ = model.get_similarity_logits(seq, vis, am, vm, loose_type=False)
        expected = torch.zeros(2, 3)
        for i in range(2):
            for j in range(3):
                tokens = torch.cat([seq[i], vis[j]], dim=0).unsqueeze(0)
                mask = torch.cat([torch.ones(1, dtype=torch.long), vm[j, 0]]).unsqueeze(0)
                _, pooled = model.cross(tokens, None, mask)
                expected[i, j] = model.similarity_dense(pooled)[0, 0]
    assert logits.shape == (2, 3)
    assert torch.allclose(logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("head", ["meanP", "seqTransf", "tightTransf"])
def test_training_loss_is_symmetric_cross_entropy(clip_file, head):
    model = build(clip_file, head).train()
    ids, seg, am, video, vm = make_inputs(3, MAX_FRAMES, lengths=[4, 3, 2], seed=6)
    torch.manual_seed(9)  # tightTransf's embedding dropout draws the same mask both times
    loss = model(ids, seg, am, video, vm)
    torch.manual_seed(9)
    sim = logits_of(model, (ids, seg, am, video, vm)).detach().double()
    rows = -(sim.diag() - sim.logsumexp(dim=1)).mean()
    cols = -(sim.diag() - sim.logsumexp(dim=0)).mean()
    assert loss.item() == pytest.approx(((rows + cols) / 2).item(), abs=1e-5)


@pytest.mark.parametrize("head", LOOSE)
def test_all_zero_video_mask_gives_a_finite_loss(clip_file, head):
    model = build(clip_file, head).train()
    ids, seg, am, video, vm = make_inputs(3, MAX_FRAMES, lengths=[4, 0, 2], seed=7)
    loss = model(ids, seg, am, video, vm)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# --- load-time initialisation ------------------------------------------------------------------------------------


def test_seq_and_tight_heads_copy_the_text_tower(clip_file, clip_state_dict):
    sd = clip_state_dict
    seq = build(clip_file, "seqTransf", cross_num_hidden_layers=1)
    assert torch.equal(seq.frame_position_embeddings.weight, sd["positional_embedding"])
    assert len(seq.transformerClip.resblocks) == 1  # cut from the bottom of the text tower
    for suffix in BLOCK_SUFFIXES:
        assert torch.equal(
            seq.state_dict()[f"transformerClip.resblocks.0.{suffix}"], sd[f"transformer.resblocks.0.{suffix}"]
        ), suffix

    lstm = build(clip_file, "seqLSTM")
    assert torch.equal(lstm.frame_position_embeddings.weight, sd["positional_embedding"])

    tight = build(clip_file, "tightTransf")
    tight_sd = tight.state_dict()
    assert torch.equal(tight_sd["cross.embeddings.position_embeddings.weight"], sd["positional_embedding"])
    for i in range(2):
        for suffix in BLOCK_SUFFIXES:
            assert torch.equal(
                tight_sd[f"cross.transformer.resblocks.{i}.{suffix}"], sd[f"transformer.resblocks.{i}.{suffix}"]
            )
    # What stays random got the BERT-style init.
    assert torch.count_nonzero(tight.similarity_dense.bias) == 0
    assert torch.count_nonzero(tight.cross.pooler.dense.bias) == 0
    assert torch.equal(tight.cross.pooler.ln_pool.weight, torch.ones(512))
    assert abs(tight.cross.pooler.dense.weight.std().item() - 0.02) < 0.002


def test_3d_kernel_is_conv1_in_the_temporal_centre(model_of, clip_state_dict):
    conv2 = model_of("meanP", "3d").clip.visual.conv2.weight
    conv1 = clip_state_dict["visual.conv1.weight"]
    assert conv2.shape == (64, 3, 3, 16, 16)
    assert torch.equal(conv2[:, :, 1], conv1)
    assert torch.count_nonzero(conv2[:, :, 0]) == 0 and torch.count_nonzero(conv2[:, :, 2]) == 0


def test_3d_equals_2d_at_initialisation_on_any_video(model_of):
    two_d, three_d = model_of("meanP", "2d"), model_of("meanP", "3d")
    _, _, _, video, vm = make_inputs(2, MAX_FRAMES, seed=8)
    video = video * 3 + 1  # any content, not just unit noise
    with torch.no_grad():
        a = two_d.get_visual_output(video, vm)
        b = three_d.get_visual_output(video, vm)
    assert torch.allclose(a, b, rtol=0, atol=1e-5)


def test_copies_happen_only_when_absent_and_init_model_overrides_clip(clip_file, clip_state_dict):
    sd = clip_state_dict
    gen = torch.Generator().manual_seed(11)
    frame_pos = torch.randn(77, 512, generator=gen)
    conv1 = torch.randn(64, 3, 16, 16, generator=gen)
    text_pos = torch.randn(77, 512, generator=gen)
    init_model = {"clip.visual.conv1.weight": conv1, "clip.positional_embedding": text_pos}
    given = dict(init_model)

    seq = build(clip_file, "seqTransf", "3d", state_dict=given)
    assert given.keys() == init_model.keys()  # the caller's dict is left alone
    assert torch.equal(seq.clip.visual.conv1.weight, conv1)
    assert torch.equal(seq.clip.visual.conv2.weight[:, :, 1], conv1)  # 3d copies the merged dict's conv1
    assert torch.equal(seq.clip.positional_embedding, text_pos)
    # Head copies always come from the CLIP file, not from --init_model's clip.* keys.
    assert torch.equal(seq.frame_position_embeddings.weight, sd["positional_embedding"])

    present = build(clip_file, "seqTransf", state_dict={"frame_position_embeddings.weight": frame_pos})
    assert torch.equal(present.frame_position_embeddings.weight, frame_pos)
    assert not torch.equal(
        present.transformerClip.resblocks[0].attn.in_proj_weight, sd["transformer.resblocks.0.attn.in_proj_weight"]
    )

    ln = torch.full((512,), 3.0)
    tight = build(clip_file, "tightTransf", state_dict={"cross.transformer.resblocks.0.ln_1.weight": ln})
    assert torch.equal(tight.cross.transformer.resblocks[0].ln_1.weight, ln)
    assert not torch.equal(tight.cross.embeddings.position_embeddings.weight, sd["positional_embedding"])

    kernel = torch.randn(64, 3, 3, 16, 16, generator=gen)
    three_d = build(clip_file, "meanP", "3d", state_dict={"clip.visual.conv2.weight": kernel})
    assert torch.equal(three_d.clip.visual.conv2.weight, kernel)


# --- checkpoint layout -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("linear_patch", ["2d", "3d"])
@pytest.mark.parametrize("head", HEADS)
def test_key_layout_and_strict_round_trip(clip_file, tmp_path, model_of, caplog, head, linear_patch):
    source = model_of(head, linear_patch)
    expected = CLIP_KEYS + (["clip.visual.conv2.weight"] if linear_patch == "3d" else []) + HEAD_KEYS[head]
    saved = source.state_dict()
    assert sorted(saved) == sorted(expected)

    path = tmp_path / "pytorch_model.bin.0"
    torch.save(saved, path)
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    with caplog.at_level(logging.INFO):
        target = build(clip_file, head, linear_patch, state_dict=loaded, seed=123)
    assert "not initialized from pretrained model" not in caplog.text
    assert "not used in" not in caplog.text
    target.load_state_dict(loaded, strict=True)
    for key, value in target.state_dict().items():
        assert torch.equal(value, saved[key]), key


# --- freezing ----------------------------------------------------------------------------------------------------

ALWAYS_TRAINED = [
    "clip.ln_final.weight",
    "clip.ln_final.bias",
    "clip.text_projection",
    "clip.logit_scale",
    "clip.visual.ln_post.weight",
    "clip.visual.ln_post.bias",
    "clip.visual.proj",
]
FROZEN_BELOW_ALL_BLOCKS = [
    "clip.positional_embedding",
    "clip.token_embedding.weight",
    "clip.visual.class_embedding",
    "clip.visual.positional_embedding",
    "clip.visual.conv1.weight",
    "clip.visual.ln_pre.weight",
    "clip.visual.ln_pre.bias",
]


def _blocks(indices) -> list[str]:
    return [
        f"clip.{tower}transformer.resblocks.{i}.{s}"
        for tower in ("", "visual.")
        for i in indices
        for s in BLOCK_SUFFIXES
    ]


# Hand count for the tiny CLIP: a text block has 3,152,384 values and a visual block 49,984; the always-trained
# tensors 296,065; embeddings (token table 1024 x 512) + conv1 + ln_pre 613,376; total 7,314,177 (2d, meanP).
@pytest.mark.parametrize(
    "freeze_layer_num, trainable_blocks, n_trainable",
    [
        (-1, [0, 1], 7_314_177),
        (0, [0, 1], 6_700_801),
        (1, [1], 3_498_433),
        (6, [], 296_065),
        (12, [], 296_065),
    ],
)
def test_freeze_sets(clip_file, freeze_layer_num, trainable_blocks, n_trainable):
    model = build(clip_file, "meanP")
    counts = freeze_clip_layers(model, freeze_layer_num, "2d")
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    expected = ALWAYS_TRAINED + _blocks(trainable_blocks)
    if freeze_layer_num == -1:
        expected += FROZEN_BELOW_ALL_BLOCKS
    assert trainable == sorted(expected)
    assert counts == (n_trainable, 7_314_177)


def test_freeze_does_nothing_in_3d_and_checks_its_range(clip_file):
    model = build(clip_file, "seqTransf", "3d")
    n_trainable, n_total = freeze_clip_layers(model, 0, "3d")
    assert n_trainable == n_total == sum(p.numel() for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    for bad in (-2, 13):
        with pytest.raises(ValueError, match="freeze_layer_num"):
            freeze_clip_layers(model, bad, "2d")


# --- precision, memory, errors -----------------------------------------------------------------------------------


def test_resolve_precision():
    assert resolve_precision(None, "cpu") == "fp32"
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda") == "fp16-weights"
    assert resolve_precision(None, torch.device("cuda", 1)) == "fp16-weights"
    for choice in ("fp16-weights", "fp32", "bf16", "fp16"):
        assert resolve_precision(choice, "cpu") == choice
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp64", "cpu")


def test_fp16_weights_mode_keeps_keys_and_converts_only_clip(clip_file, clip_state_dict, model_of):
    model = build(clip_file, "tightTransf", precision="fp16-weights")
    assert model.precision == "fp16-weights" and model_of("tightTransf").precision == "fp32"
    assert list(model.state_dict()) == list(model_of("tightTransf").state_dict())
    clip = model.clip
    for tensor in (
        clip.visual.conv1.weight,
        clip.visual.proj,
        clip.text_projection,
        clip.transformer.resblocks[0].attn.in_proj_weight,
        clip.transformer.resblocks[0].mlp.c_fc.bias,
    ):
        assert tensor.dtype == torch.float16
    for tensor in (
        clip.token_embedding.weight,
        clip.positional_embedding,
        clip.logit_scale,
        clip.ln_final.weight,
        clip.visual.class_embedding,
    ):
        assert tensor.dtype == torch.float32
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if not n.startswith("clip."))
    # Loaded values take the parameter's dtype.
    assert torch.equal(clip.visual.proj, clip_state_dict["visual.proj"].half())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_autocast_modes_keep_fp32_weights(clip_file, precision):
    model = build(clip_file, "seqTransf", precision=precision).train()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ids, seg, am, video, vm = make_inputs(2, MAX_FRAMES, lengths=[4, 2], seed=12)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = model(ids, seg, am, video, vm)
    loss.backward()
    assert torch.isfinite(loss)


def test_grad_checkpointing_gives_the_same_loss_and_gradients(clip_file):
    model = build(clip_file, "seqTransf", grad_checkpointing=True).train()
    assert model.clip.transformer.grad_checkpointing and model.clip.visual.transformer.grad_checkpointing
    inputs = make_inputs(3, MAX_FRAMES, lengths=[4, 3, 1], seed=13)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(*inputs)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_ckpt, grads_ckpt = loss_and_grads()
    model.clip.set_grad_checkpointing(False)
    loss_plain, grads_plain = loss_and_grads()
    assert abs(loss_ckpt - loss_plain) < 1e-6
    assert grads_ckpt.keys() == grads_plain.keys() and len(grads_plain) > 0
    for name, grad in grads_plain.items():
        assert torch.allclose(grads_ckpt[name], grad, rtol=0, atol=1e-6), name


def test_bad_configurations_raise_clear_errors(clip_file, clip_state_dict, model_of):
    with pytest.raises(ValueError, match="max_words \\+ max_frames"):
        build(clip_file, "meanP", max_words=100, max_frames=29)
    with pytest.raises(ValueError, match="loose_type must be False"):
        build(clip_file, "tightTransf", loose_type=True)
    with pytest.raises(ValueError, match="context_length 77"):
        build(clip_file, "seqTransf", max_words=20, max_frames=78)
    with pytest.raises(ValueError, match="sim_header"):
        build(clip_file, "meanQ")
    no_proj = {k: v for k, v in clip_state_dict.items() if k != "visual.proj"}
    cfg = make_config(clip_file, "meanP")
    with pytest.raises(ValueError, match="visual.proj"):
        CLIP4Clip(CrossConfig.get_config("cross-base"), no_proj, cfg)

    # meanP built without --loose_type has the cross encoder's keys but cannot score, as in the original.
    strict_meanp = build(clip_file, "meanP", loose_type=False)
    assert "similarity_dense.weight" in strict_meanp.state_dict()
    ids, seg, am, video, vm = make_inputs(2, 2)
    with torch.no_grad():
        seq, vis = strict_meanp.get_sequence_visual_output(ids, seg, am, video, vm)
    with pytest.raises(ValueError, match="needs --loose_type"):
        strict_meanp.get_similarity_logits(seq, vis, am, vm, loose_type=False)
    with pytest.raises(ValueError, match="loose_type similarity"):
        model_of("tightTransf").get_similarity_logits(seq, vis, am, vm, loose_type=True)
    with pytest.raises(ValueError, match="7 dims"):
        model_of("meanP").get_visual_output(video[0], vm)


# --- what the temporal heads can learn ---------------------------------------------------------------------------


def _order_task(n: int, contents: torch.Tensor, gen: torch.Generator):
    """Videos A,A,B,B over fixed frame features, and a caption vector that leans to the shape seen last."""
    a = torch.randint(0, len(contents), (n,), generator=gen)
    b = (a + torch.randint(1, len(contents), (n,), generator=gen)) % len(contents)
    videos = torch.stack([contents[a], contents[a], contents[b], contents[b]], 1)
    twins = torch.stack([contents[b], contents[b], contents[a], contents[a]], 1)
    captions = torch.nn.functional.normalize(contents[a] + 2 * contents[b], dim=-1)
    return videos, twins, captions


@pytest.mark.parametrize("head", ["seqTransf", "seqLSTM"])
def test_temporal_heads_learn_an_order_that_mean_pooling_cannot_see(clip_file, head):
    """Given captions that tell a video from its time-reversed twin, the temporal head learns to rank the right
    one first (the head alone is trained, on fixed frame features); mean pooling gives both twins one vector."""
    gen = torch.Generator().manual_seed(0)
    # Frame features of std 0.2: the head learns the order in 100 steps. At std 1 (the tiny random CLIP's scale)
    # the position embeddings are small beside them and the same head needs over 1000 (docs/demo.md).
    contents = torch.randn(12, 512, generator=gen) * 0.2
    held_out = _order_task(200, contents, gen)
    mask = torch.ones(200, MAX_FRAMES)

    def own_and_twin(model):
        videos, twins, _ = held_out
        with torch.no_grad():
            return model.get_video_embedding(videos, mask), model.get_video_embedding(twins, mask)

    def pair_accuracy(model) -> float:
        own, twin = own_and_twin(model)
        captions = held_out[2]
        return ((captions * own).sum(1) > (captions * twin).sum(1)).float().mean().item()

    own, twin = own_and_twin(build(clip_file, "meanP"))
    assert (own - twin).abs().max() < 1e-6

    model = build(clip_file, head)
    head_params = [p for n, p in model.named_parameters() if not n.startswith("clip.")]
    optimizer = torch.optim.Adam(head_params, lr=1e-3)
    before = pair_accuracy(model)
    for _ in range(100):
        videos, _, captions = _order_task(16, contents, gen)
        logits = 14.3 * captions @ model.get_video_embedding(videos, torch.ones(16, MAX_FRAMES)).T
        loss = (model.loss_fct(logits) + model.loss_fct(logits.T)) / 2  # the training loss's symmetric form
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert before < 0.7  # seqTransf starts close to mean pooling; an untrained LSTM prefers the other order
    after = pair_accuracy(model)
    assert after > 0.9, (before, after)


# --- the typed config --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("linear_patch", ["2d", "3d"])
@pytest.mark.parametrize("head", HEADS)
def test_config_round_trips_through_the_model_it_builds(clip_file, model_of, head, linear_patch):
    config = make_config(clip_file, head, linear_patch)
    model = model_of(head, linear_patch)
    assert model.task_config == config and model.sim_header == head and model.linear_patch == linear_patch
    assert model.loose_type is (head != "tightTransf")
    # What a checkpoint cannot say (the CLIP file, the input sizes) is given; the rest comes from its keys.
    implied = CLIP4ClipConfig.from_state_dict(
        model.state_dict(), pretrained_clip_name=str(clip_file), max_words=MAX_WORDS, max_frames=MAX_FRAMES
    )
    if head in ("meanP", "seqLSTM"):  # no layer count in these heads' keys: the default stands
        implied = dataclasses.replace(implied, cross_num_hidden_layers=config.cross_num_hidden_layers)
    assert implied == config


def test_config_reads_the_original_namespace_and_checks_itself():
    original = types.SimpleNamespace(
        local_rank=0,
        sim_header="seqTransf",
        loose_type=True,
        linear_patch="3d",
        cross_num_hidden_layers=3,
        max_words=20,
        max_frames=8,
        n_gpu=4,
        lr=1e-4,
    )
    config = CLIP4ClipConfig.from_args(original)
    assert (config.sim_header, config.linear_patch, config.cross_num_hidden_layers) == ("seqTransf", "3d", 3)
    assert (config.max_words, config.max_frames, config.precision, config.pretrained_clip_name) == (
        20,
        8,
        "auto",
        "ViT-B/32",
    )
    assert CLIP4ClipConfig.from_args(config) is config
    assert CLIP4ClipConfig(sim_header="tightTransf").loose_type is False
    assert implied_by_state_dict({"cross.transformer.resblocks.2.ln_1.weight": torch.zeros(1)}) == {
        "linear_patch": "2d",
        "sim_header": "tightTransf",
        "cross_num_hidden_layers": 3,
        "tuning": "full",
    }
    w = torch.zeros(1)
    assert implied_by_state_dict({"clip.visual.proj": w}) == {
        "linear_patch": "2d",
        "sim_header": "meanP",
        "tuning": "full",
    }
    assert implied_by_state_dict({"lstm_visual.weight_ih_l0": w, "clip.visual.conv2.weight": w}) == {
        "linear_patch": "3d",
        "sim_header": "seqLSTM",
        "tuning": "full",
    }
    assert implied_by_state_dict({"clip.visual.proj": w, "text_adapter.gate_layer.bias": w})["tuning"] == "unipt"
    assert CLIP4ClipConfig.from_args(types.SimpleNamespace(tuning=None)).tuning == "full"  # flag not given
    for bad, message in [
        (dict(linear_patch="4d"), "linear_patch"),
        (dict(precision="fp64"), "precision"),
        (dict(max_frames=0), "max_frames"),
        (dict(freeze_layer_num=13), "freeze_layer_num"),
    ]:
        with pytest.raises(ValueError, match=message):
            CLIP4ClipConfig(**bad)


def test_checkpoints_that_do_not_fit_are_refused(clip_file, model_of):
    meanp = model_of("meanP").state_dict()
    resnet = {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.ones(64), "fc.weight": torch.zeros(10, 512)}
    with pytest.raises(ValueError, match="none of its 3 weights is one of this model's"):
        build(clip_file, "meanP", state_dict=resnet)
    other_clip = {
        "clip.visual.layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1),
        "frame_position_embeddings.weight": torch.zeros(77, 512),
    }
    with pytest.raises(ValueError, match="none of its 1 CLIP weights"):
        build(clip_file, "seqLSTM", state_dict=other_clip)
    misshaped = dict(meanp, **{"clip.visual.proj": torch.zeros(32, 512)})
    with pytest.raises(ValueError, match=r"clip.visual.proj has shape \(32, 512\), the model expects \(64, 512\)"):
        build(clip_file, "meanP", state_dict=misshaped)


def test_another_heads_checkpoint_loads_with_a_warning(clip_file, model_of, caplog):
    meanp = model_of("meanP").state_dict()
    with caplog.at_level("WARNING", logger="modules.modeling"):
        seq = build(clip_file, "seqTransf", state_dict=meanp)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(
        "has no weights for 25 parameters of the seqTransf head" in w and "frame_position_embeddings.weight" in w
        for w in warnings
    ), warnings
    assert torch.equal(seq.clip.visual.proj, meanp["clip.visual.proj"])
    caplog.clear()
    with caplog.at_level("WARNING", logger="modules.modeling"):
        build(clip_file, "meanP", state_dict=model_of("seqTransf").state_dict())
    assert any("holds 25 weights this model does not use" in r.getMessage() for r in caplog.records)


# --- UniPT parallel tuning ---------------------------------------------------------------------------------------


def adapter_keys(prefix: str, layers: int, width: int, embed: int = 512) -> dict[str, tuple]:
    """The fork's adapter keys and shapes, written out from its module layout (ReLU at .0, Linear at .1)."""
    keys = {}
    for i in range(layers):
        keys[f"{prefix}.downsample_layers.{i}.1.weight"] = (embed, width)
        keys[f"{prefix}.downsample_layers.{i}.1.bias"] = (embed,)
    for name in ("downsample_layer", "upsample_layer"):
        keys[f"{prefix}.{name}.1.weight"] = (embed, embed)
        keys[f"{prefix}.{name}.1.bias"] = (embed,)
    keys[f"{prefix}.gate_layer.weight"] = (1, embed)
    keys[f"{prefix}.gate_layer.bias"] = (1,)
    return keys


def test_unipt_adds_the_adapters_after_init_and_round_trips(clip_file, tmp_path, caplog):
    full = build(clip_file, "meanP", seed=5)
    unipt = build(clip_file, "meanP", seed=5, tuning="unipt")
    expected = {**adapter_keys("image_adapter", 3, 64), **adapter_keys("text_adapter", 3, 512)}
    extra = {k: tuple(v.shape) for k, v in unipt.state_dict().items() if k not in full.state_dict()}
    assert extra == expected
    # Built after the model's init_weights: everything else draws the same numbers as full mode, and the
    # adapters keep PyTorch's Linear init (bias uniform in ±1/sqrt(fan_in), not the zeros of init_weights).
    for key, value in full.state_dict().items():
        assert torch.equal(unipt.state_dict()[key], value), key
    assert unipt.text_adapter.gate_layer.bias.abs().item() > 0
    assert unipt.image_adapter.downsample_layers[0][1].bias.abs().max() <= 64**-0.5

    path = tmp_path / "pytorch_model.bin.0"
    torch.save(unipt.state_dict(), path)
    with caplog.at_level(logging.INFO):
        again = build(clip_file, "meanP", state_dict=torch.load(path, weights_only=True), seed=9, tuning="unipt")
    assert "not initialized from pretrained model" not in caplog.text and "not used in" not in caplog.text
    for key, value in unipt.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_unipt_outputs_are_the_anchor_plus_the_adapter(clip_file):
    model = build(clip_file, "meanP", seed=1, tuning="unipt").eval()
    full = build(clip_file, "meanP", seed=1).eval()
    ids, seg, am, video, vm = make_inputs(2, 3, seed=4)
    with torch.no_grad():
        seq, vis = model.get_sequence_visual_output(ids, seg, am, video, vm)
        anchor_seq, anchor_vis = full.get_sequence_visual_output(ids, seg, am, video, vm)
        flat_ids = ids.view(-1, MAX_WORDS)
        pooled, states = model.clip.encode_text(flat_ids, hidden_states=True)
        expected_seq = model.text_adapter(states, pooled.unsqueeze(1), mask=flat_ids != 0, position=flat_ids.argmax(-1))
        pooled, states = model.clip.encode_image(video.view(-1, 3, 32, 32).float(), hidden_states=True)
        expected_vis = model.image_adapter(states, pooled.unsqueeze(1))
    assert seq.shape == (2, 1, 512) and vis.shape == (2, 3, 512)
    torch.testing.assert_close(seq.view(2, 512), expected_seq, rtol=0, atol=0)
    torch.testing.assert_close(vis.view(6, 512), expected_vis, rtol=0, atol=0)
    # A zero up-projection leaves exactly the frozen CLIP's output (the residual).
    for adapter in (model.text_adapter, model.image_adapter):
        torch.nn.init.zeros_(adapter.upsample_layer[1].weight)
        torch.nn.init.zeros_(adapter.upsample_layer[1].bias)
    with torch.no_grad():
        seq, vis = model.get_sequence_visual_output(ids, seg, am, video, vm)
    assert torch.equal(seq, anchor_seq) and torch.equal(vis, anchor_vis)


@pytest.mark.parametrize("head", LOOSE)
def test_unipt_trains_only_the_adapters(clip_file, head):
    model = build(clip_file, head, seed=2, tuning="unipt").train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in model.state_dict() if n.startswith(("image_adapter.", "text_adapter."))}
    loss = model(*make_inputs(3, MAX_FRAMES, lengths=[4, 2, 1], seed=6))
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable  # no CLIP, head or logit_scale tensor gets a gradient
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in with_grad and "gate" not in n)


def test_unipt_config_errors(clip_file):
    with pytest.raises(ValueError, match="tightTransf: the adapters give one vector per caption"):
        build(clip_file, "tightTransf", tuning="unipt")
    with pytest.raises(ValueError, match="tuning must be one of"):
        build(clip_file, "meanP", tuning="lora")


def test_fork_vit_b32_checkpoint_loads_strictly():
    """A state dict laid out as the fork saves it (ViT-B/32: 13 x 768 vision, 13 x 512 text) has exactly our keys."""
    from modules.module_clip import CLIP

    vit_b32 = dict(
        embed_dim=512,
        image_resolution=224,
        vision_layers=12,
        vision_width=768,
        vision_patch_size=32,
        context_length=77,
        vocab_size=49408,
        transformer_width=512,
        transformer_heads=8,
        transformer_layers=12,
    )
    with torch.device("meta"):
        clip_state_dict = CLIP(**vit_b32).state_dict()
        cfg = CLIP4ClipConfig(precision="fp32", tuning="unipt")
        model = CLIP4Clip(CrossConfig.get_config("cross-base"), clip_state_dict, cfg)
    fork_adapters = {**adapter_keys("image_adapter", 13, 768), **adapter_keys("text_adapter", 13, 512)}
    fork = {"clip." + k: v for k, v in clip_state_dict.items()}
    fork.update({k: torch.randn(shape) for k, shape in fork_adapters.items()})
    model.load_state_dict(fork, strict=True, assign=True)
    assert torch.equal(model.text_adapter.gate_layer.weight, fork["text_adapter.gate_layer.weight"])
