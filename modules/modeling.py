"""CLIP4Clip: encode text and video with CLIP, apply a similarity head, and compute the symmetric contrastive loss."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from modules.clip_weights import clip_for_checkpoint
from modules.model_config import (  # noqa: F401  (importable from here, as before the split)
    ADAPTER_PREFIXES,
    MAX_POSITION_EMBEDDINGS,
    CLIP4ClipConfig,
    implied_by_state_dict,
    resolve_precision,
)
from modules.model_loading import add_initialisation_copies, check_checkpoint, copies_from_clip  # noqa: F401
from modules.module_adapter import Our_tuning_for_transformer
from modules.module_clip import CLIP, convert_weights
from modules.module_cross import CrossConfig, CrossModel
from modules.module_cross import Transformer as TransformerClip
from modules.names import LINEAR_PATCHES, LOOSE_HEADERS, PRECISIONS, SIM_HEADERS, TUNINGS  # noqa: F401
from modules.until_module import CrossEn, PreTrainedModel, allgather, is_log_rank
from util import default_device, get_world_size

logger = logging.getLogger(__name__)
# Guards the norms so an all-zero video mask gives zero logits, not NaN (the original divides by a zero norm);
# far below any real norm.
NORM_EPS = 1e-6


def _flatten_video(video: Any) -> tuple[torch.Tensor, int]:
    """(B, pair, bs, ts, 3, H, W) video of any float dtype → (B·pair·bs·ts, 3, H, W) fp32 and the frames per video."""
    video = torch.as_tensor(video).float()
    if video.dim() != 7:
        raise ValueError(
            f"video must have 7 dims (batch, pair, bs, ts, channel, height, width), got shape {tuple(video.shape)}"
        )
    b, pair, bs, ts, channel, h, w = video.shape
    return video.view(b * pair * bs * ts, channel, h, w), bs * ts


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)


class CLIP4ClipPreTrainedModel(PreTrainedModel):
    """Builds :class:`CLIP4Clip` from OpenAI's CLIP weights plus an optional checkpoint, with the load-time tricks."""

    def __init__(self, cross_config: CrossConfig):
        super().__init__(cross_config)
        self.cross_config = cross_config

    @classmethod
    def from_pretrained(
        cls,
        cross_model_name: str,
        state_dict: dict[str, torch.Tensor] | None = None,
        cache_dir: str | None = None,
        type_vocab_size: int = 2,
        *inputs,
        task_config: Any = None,
        checkpoint_name: str = "the checkpoint",
        **kwargs,
    ) -> CLIP4ClipPreTrainedModel:
        """Load CLIP, build the model, initialise the heads, load weights.

        CLIP is ``task_config.pretrained_clip_name``, unless ``state_dict`` holds every CLIP weight: then the model
        is built on those, its architecture read off their shapes (see :func:`clip_for_checkpoint`).

        ``task_config`` (keyword only) is a :class:`CLIP4ClipConfig` or the original's argument namespace.
        ``state_dict`` (the ``--init_model`` checkpoint) wins over the CLIP file key by key; a checkpoint that
        does not fit the model is refused (see :func:`check_checkpoint`).
        """
        if task_config is None:
            raise ValueError(
                f"{cls.__name__}.from_pretrained needs task_config=<a CLIP4ClipConfig or the run's arguments>"
            )
        config = CLIP4ClipConfig.from_args(task_config)
        checkpoint = dict(state_dict) if state_dict is not None else {}
        clip_state_dict = clip_for_checkpoint(
            config.pretrained_clip_name, state_dict, checkpoint_name, copies_from_clip(config, checkpoint)
        )
        merged = dict(checkpoint)
        for key, val in clip_state_dict.items():
            merged.setdefault("clip." + key, val.clone())

        cross_config = CrossConfig.get_config(cross_model_name, cache_dir, type_vocab_size, task_config=config)
        model = cls(cross_config, clip_state_dict, *inputs, task_config=config, **kwargs)
        if state_dict is not None:
            check_checkpoint(model, checkpoint, checkpoint_name)
        add_initialisation_copies(model, merged, clip_state_dict, config.cross_num_hidden_layers)
        return cls.init_preweight(model, merged, task_config=config)

    @classmethod
    def from_config(
        cls,
        config: CLIP4ClipConfig,
        state_dict: dict[str, torch.Tensor] | None = None,
        checkpoint_name: str = "the checkpoint",
    ) -> CLIP4ClipPreTrainedModel:
        """The model of ``config``, with ``state_dict`` (a CLIP4Clip checkpoint) loaded over CLIP's weights."""
        return cls.from_pretrained(
            "cross-base", state_dict=state_dict, task_config=config, checkpoint_name=checkpoint_name
        )


class CLIP4Clip(CLIP4ClipPreTrainedModel):
    """CLIP towers plus one of four similarity heads: meanP, seqLSTM, seqTransf (loose) or tightTransf (cross).

    ``task_config`` is a :class:`CLIP4ClipConfig`, or the original's argument namespace (converted).
    """

    def __init__(self, cross_config: CrossConfig, clip_state_dict: dict[str, torch.Tensor], task_config: Any):
        super().__init__(cross_config)
        config = CLIP4ClipConfig.from_args(task_config)
        clip_kwargs = config.check_clip(clip_state_dict)
        self.task_config = config
        self.loose_type = config.loose_type
        self.linear_patch = config.linear_patch
        self.sim_header = config.sim_header
        self.tuning = config.tuning
        self.precision = resolve_precision(config.precision, default_device())
        if is_log_rank(task_config):
            for key, value in clip_kwargs.items():
                logger.info("\t %s: %s", key, value)
            logger.info(
                "\t linear_patch: %s, sim_header: %s, loose_type: %s, precision: %s",
                self.linear_patch,
                self.sim_header,
                self.loose_type,
                self.precision,
            )
            logger.info("\t tuning: %s", self.tuning)

        # As the original: the construction order fixes the RNG draws of the heads that stay random.
        self.clip = CLIP(**clip_kwargs, linear_patch=self.linear_patch).float()
        if self.precision == "fp16-weights":
            convert_weights(self.clip)

        # The real position tables have CLIP's context_length (77) rows; the 128 of the cross config only gates
        # max_words + max_frames.
        cross_config.max_position_embeddings = clip_kwargs["context_length"]
        transformer_width = clip_kwargs["transformer_width"]
        transformer_heads = clip_kwargs["transformer_heads"]
        if not self.loose_type:
            cross_config.num_hidden_layers = config.cross_num_hidden_layers
            self.cross = CrossModel(cross_config)
            self.similarity_dense = nn.Linear(cross_config.hidden_size, 1)
        if self.sim_header in ("seqLSTM", "seqTransf"):
            self.frame_position_embeddings = nn.Embedding(
                cross_config.max_position_embeddings, cross_config.hidden_size
            )
        if self.sim_header == "seqTransf":
            self.transformerClip = TransformerClip(
                width=transformer_width, layers=config.cross_num_hidden_layers, heads=transformer_heads
            )
        if self.sim_header == "seqLSTM":
            self.lstm_visual = nn.LSTM(
                input_size=cross_config.hidden_size,
                hidden_size=cross_config.hidden_size,
                batch_first=True,
                bidirectional=False,
                num_layers=1,
            )
        self.loss_fct = CrossEn()
        self.apply(self.init_weights)
        if self.tuning == "unipt":
            self._add_adapters(clip_kwargs)

        if config.grad_checkpointing:
            self.clip.set_grad_checkpointing(True)

    def _add_adapters(self, clip_kwargs: dict[str, Any]) -> None:
        """UniPT's two side networks, then freeze everything else (``logit_scale`` and the heads included).

        As the fork: built after ``init_weights``, so they keep PyTorch's default Linear initialisation, and each
        reads the input of its tower's first block plus every block's output (13 states for ViT-B/32).
        """
        embed_dim = clip_kwargs["embed_dim"]
        n_vision = clip_kwargs["vision_layers"] + 1
        n_text = clip_kwargs["transformer_layers"] + 1
        self.image_adapter = Our_tuning_for_transformer(
            n_vision, [clip_kwargs["vision_width"]] * n_vision, embed_dim, downsample_D_factor=1
        )
        self.text_adapter = Our_tuning_for_transformer(
            n_text, [clip_kwargs["transformer_width"]] * n_text, embed_dim, downsample_D_factor=1
        )
        for name, param in self.named_parameters():
            param.requires_grad_(name.startswith(ADAPTER_PREFIXES))

    def forward(self, input_ids, token_type_ids, attention_mask, video, video_mask=None) -> torch.Tensor | None:
        """Training: the symmetric CrossEn loss of the batch's similarity matrix. Eval: None."""
        input_ids = input_ids.view(-1, input_ids.shape[-1])
        token_type_ids = token_type_ids.view(-1, token_type_ids.shape[-1])
        attention_mask = attention_mask.view(-1, attention_mask.shape[-1])
        video_mask = video_mask.view(-1, video_mask.shape[-1])
        video, video_frame = _flatten_video(video)

        sequence_output, visual_output = self.get_sequence_visual_output(
            input_ids, token_type_ids, attention_mask, video, video_mask, shaped=True, video_frame=video_frame
        )
        if not self.training:
            return None
        sim_matrix, _ = self.get_similarity_logits(
            sequence_output, visual_output, attention_mask, video_mask, shaped=True, loose_type=self.loose_type
        )
        return (self.loss_fct(sim_matrix) + self.loss_fct(sim_matrix.T)) / 2

    def get_sequence_output(self, input_ids, token_type_ids, attention_mask, shaped=False) -> torch.Tensor:
        """Token ids → (B, 1, 512) end-token features (fp32)."""
        if not shaped:
            input_ids = input_ids.view(-1, input_ids.shape[-1])
        if self.tuning == "unipt":
            # The backbone is frozen: run it without autograd so none of its activations is kept for backward.
            with torch.no_grad():
                pooled, states = self.clip.encode_text(input_ids, hidden_states=True)
            # The padding id is 0 and the end token has the largest id, as in CLIP's own pooling.
            sequence_hidden = self.text_adapter(
                states, pooled.unsqueeze(1), mask=input_ids != 0, position=input_ids.argmax(dim=-1)
            )
        else:
            sequence_hidden = self.clip.encode_text(input_ids)
        sequence_hidden = sequence_hidden.float()
        return sequence_hidden.view(input_ids.size(0), -1, sequence_hidden.size(-1))

    def get_visual_output(self, video, video_mask, shaped=False, video_frame=-1) -> torch.Tensor:
        """Video → (B, F, 512) per-frame features (fp32)."""
        if not shaped:
            video_mask = video_mask.view(-1, video_mask.shape[-1])
            video, video_frame = _flatten_video(video)
        if self.tuning == "unipt":
            with torch.no_grad():  # frozen backbone, as in get_sequence_output
                pooled, states = self.clip.encode_image(video, video_frame=video_frame, hidden_states=True)
            # Each frame's class token is its anchor and its own position; a frame has no padding to mask.
            visual_hidden = self.image_adapter(states, pooled.unsqueeze(1))
        else:
            visual_hidden = self.clip.encode_image(video, video_frame=video_frame)
        visual_hidden = visual_hidden.float()
        return visual_hidden.view(video_mask.size(0), -1, visual_hidden.size(-1))

    def get_sequence_visual_output(
        self, input_ids, token_type_ids, attention_mask, video, video_mask, shaped=False, video_frame=-1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not shaped:
            input_ids = input_ids.view(-1, input_ids.shape[-1])
            video_mask = video_mask.view(-1, video_mask.shape[-1])
            video, video_frame = _flatten_video(video)
        sequence_output = self.get_sequence_output(input_ids, token_type_ids, attention_mask, shaped=True)
        visual_output = self.get_visual_output(video, video_mask, shaped=True, video_frame=video_frame)
        return sequence_output, visual_output

    def _apply_video_head(self, visual_output: torch.Tensor, video_mask: torch.Tensor, sim_header: str) -> torch.Tensor:
        """The temporal head on (B, F, 512) frame features, with a residual connection (meanP: identity)."""
        if sim_header == "seqLSTM":
            original = visual_output
            # A row with no valid frame is given length 1 so packing works; its mean pooling masks it out anyway.
            lengths = video_mask.sum(dim=-1).cpu().clamp_min(1)
            packed = pack_padded_sequence(visual_output, lengths, batch_first=True, enforce_sorted=False)
            visual_output, _ = self.lstm_visual(packed)
            if self.training:
                self.lstm_visual.flatten_parameters()
            visual_output, _ = pad_packed_sequence(visual_output, batch_first=True)
            visual_output = torch.cat((visual_output, original[:, visual_output.size(1) :]), dim=1)
            visual_output = visual_output + original
        elif sim_header == "seqTransf":
            original = visual_output
            n_frames = visual_output.size(1)
            position_ids = torch.arange(n_frames, dtype=torch.long, device=visual_output.device)
            visual_output = visual_output + self.frame_position_embeddings(position_ids).unsqueeze(0)
            extended_mask = (1.0 - video_mask.to(visual_output.dtype).unsqueeze(1)) * -1000000.0
            extended_mask = extended_mask.expand(-1, n_frames, -1)
            visual_output = self.transformerClip(visual_output.permute(1, 0, 2), extended_mask).permute(1, 0, 2)
            visual_output = visual_output + original
        return visual_output

    @staticmethod
    def _pool_video(visual_output: torch.Tensor, video_mask: torch.Tensor) -> torch.Tensor:
        """Unit frames, masked mean over frames, unit video → (B, 512)."""
        visual_output = _l2_normalize(visual_output)
        mask = video_mask.to(dtype=torch.float).unsqueeze(-1)
        mask_sum = mask.sum(dim=1)
        mask_sum = torch.where(mask_sum == 0, torch.ones_like(mask_sum), mask_sum)
        return _l2_normalize((visual_output * mask).sum(dim=1) / mask_sum)

    def get_video_embedding(self, visual_output: torch.Tensor, video_mask: torch.Tensor) -> torch.Tensor:
        """(B, F, 512) frame features and a (B, F) or (B, 1, F) mask → (B, 512) unit video embeddings (loose heads).

        exp(logit_scale) · get_text_embedding(seq) @ this.T are the loose logits; no all-gather happens here.
        """
        if self.sim_header not in LOOSE_HEADERS:
            raise ValueError(
                f"a per-video embedding needs sim_header in {LOOSE_HEADERS}; {self.sim_header!r} "
                f"scores each (text, video) pair jointly"
            )
        video_mask = video_mask.view(-1, video_mask.shape[-1])
        visual_output = self._apply_video_head(visual_output.contiguous(), video_mask, self.sim_header)
        return self._pool_video(visual_output, video_mask)

    @staticmethod
    def get_text_embedding(sequence_output: torch.Tensor) -> torch.Tensor:
        """(B, 1, 512) end-token features → (B, 512) unit text embeddings."""
        return _l2_normalize(sequence_output.squeeze(1))

    def _loose_similarity(
        self, sequence_output, visual_output, attention_mask, video_mask, sim_header="meanP"
    ) -> torch.Tensor:
        """Dot-product heads: temporal head on the frames, masked mean, cosine similarity times exp(logit_scale)."""
        sequence_output, visual_output = sequence_output.contiguous(), visual_output.contiguous()
        visual_output = self._apply_video_head(visual_output, video_mask, sim_header)

        # Between head and pooling, as the original: every rank pools the whole global batch.
        if self.training:
            visual_output = allgather(visual_output)
            video_mask = allgather(video_mask)
            sequence_output = allgather(sequence_output)
            if get_world_size() > 1:
                dist.barrier()

        video = self._pool_video(visual_output, video_mask)
        text = self.get_text_embedding(sequence_output)
        logit_scale = self.clip.logit_scale.exp()
        return logit_scale * torch.matmul(text, video.t())

    def _cross_similarity(self, sequence_output, visual_output, attention_mask, video_mask) -> torch.Tensor:
        """tightTransf: every (text, video) pair through the cross encoder in one chunk → (B_t, B_v) scores."""
        sequence_output, visual_output = sequence_output.contiguous(), visual_output.contiguous()
        b_text, s_text, h_text = sequence_output.size()
        b_visual, s_visual, h_visual = visual_output.size()

        # The text side is CLIP's single end-token vector, so its mask is one 1 per text.
        attention_mask = torch.ones(b_text, 1, device=attention_mask.device, dtype=attention_mask.dtype)
        # Pair (i, j) sits at row i * b_visual + j.
        text = sequence_output.unsqueeze(1).repeat(1, b_visual, 1, 1).view(-1, s_text, h_text)
        text_mask = attention_mask.unsqueeze(1).repeat(1, b_visual, 1).view(-1, s_text)
        video = visual_output.unsqueeze(0).repeat(b_text, 1, 1, 1).view(-1, s_visual, h_visual)
        video_mask = video_mask.unsqueeze(0).repeat(b_text, 1, 1).view(-1, s_visual)

        concat_features = torch.cat((text, video), dim=1)
        concat_mask = torch.cat((text_mask, video_mask), dim=1)
        concat_type = torch.cat((torch.zeros_like(text_mask), torch.ones_like(video_mask)), dim=1)
        _, pooled_output = self.cross(concat_features, concat_type, concat_mask)
        return self.similarity_dense(pooled_output).squeeze(-1).view(b_text, b_visual)

    def get_similarity_logits(
        self, sequence_output, visual_output, attention_mask, video_mask, shaped=False, loose_type=False
    ) -> tuple[torch.Tensor, tuple]:
        """(B_t, B_v) logits and an empty tuple, as the original returns."""
        if not shaped:
            attention_mask = attention_mask.view(-1, attention_mask.shape[-1])
            video_mask = video_mask.view(-1, video_mask.shape[-1])

        if loose_type:
            if self.sim_header not in LOOSE_HEADERS:
                raise ValueError(
                    f"loose_type similarity needs sim_header in {LOOSE_HEADERS}, this model has {self.sim_header!r}"
                )
            retrieve_logits = self._loose_similarity(
                sequence_output, visual_output, attention_mask, video_mask, sim_header=self.sim_header
            )
        else:
            if self.sim_header != "tightTransf":
                raise ValueError(f"sim_header {self.sim_header!r} needs --loose_type; only tightTransf runs without")
            retrieve_logits = self._cross_similarity(sequence_output, visual_output, attention_mask, video_mask)
        return retrieve_logits, ()


_ALWAYS_TRAINED = ("ln_final.", "text_projection", "logit_scale", "visual.ln_post.", "visual.proj")
_BLOCK_PREFIXES = ("visual.transformer.resblocks.", "transformer.resblocks.")


def _clip_param_trains(name: str, freeze_layer_num: int) -> bool:
    if name.startswith(_ALWAYS_TRAINED):
        return True
    if name.startswith(_BLOCK_PREFIXES):
        return int(name.split(".resblocks.")[1].split(".")[0]) >= freeze_layer_num
    return False


def freeze_clip_layers(model: nn.Module, freeze_layer_num: int, linear_patch: str) -> tuple[int, int]:
    """Freeze CLIP as the original does and return (trainable, total) parameter element counts of the whole model.

    -1 freezes nothing. Otherwise blocks below ``freeze_layer_num``, the embeddings, conv1 and ln_pre are frozen;
    ln_final, text_projection, logit_scale, visual.ln_post and visual.proj always train. In 3d mode the original's
    test (the truthiness of ``name.find("conv2.")``) is true for every name, so nothing is frozen; kept as the
    original, since its published results were trained that way.
    """
    if not -1 <= freeze_layer_num <= 12:
        raise ValueError(f"freeze_layer_num must be in -1..12, got {freeze_layer_num}")
    model = getattr(model, "module", model)
    if freeze_layer_num > -1 and linear_patch != "3d":
        for name, param in model.clip.named_parameters():
            if not _clip_param_trains(name, freeze_layer_num):
                param.requires_grad_(False)
    n_total = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if is_log_rank(getattr(model, "task_config", None)):
        logger.info(
            "freeze_layer_num %d (%s): %d of %d parameters train", freeze_layer_num, linear_patch, n_trainable, n_total
        )
    return n_trainable, n_total
