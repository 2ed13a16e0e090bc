"""The mask-taking transformer of the seqTransf head and the cross encoder of the tightTransf head."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modules import module_clip as clip_blocks
from modules.module_clip import QuickGELU
from modules.until_module import LayerNorm, PreTrainedModel, is_log_rank

logger = logging.getLogger(__name__)

CONFIG_NAME = "cross_config.json"
MODULES_DIR = Path(__file__).resolve().parent


@dataclasses.dataclass
class CrossConfig:
    """Configuration of :class:`CrossModel`. Class defaults first, then the JSON file's values override them.

    Only ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``max_position_embeddings``,
    ``hidden_dropout_prob`` (embedding dropout) and ``initializer_range`` change the model; the other fields are
    kept so the original's JSON files read unchanged.
    """

    vocab_size: int = -1
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02

    @classmethod
    def from_dict(cls, json_object: dict[str, Any], source: str = "<dict>") -> CrossConfig:
        """Class defaults overridden by ``json_object``; an unknown key raises ValueError naming ``source``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(json_object) - known)
        if unknown:
            raise ValueError(f"{source}: unknown cross-config keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**json_object)

    @classmethod
    def from_json_file(cls, json_file: str | Path) -> CrossConfig:
        path = Path(json_file)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object of config values, got {type(data).__name__}")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def get_config(
        cls,
        cross_model_name: str,
        cache_dir: str | None = None,
        type_vocab_size: int = 2,
        task_config: Any = None,
    ) -> CrossConfig:
        """Read ``modules/<cross_model_name>/cross_config.json``, or ``cross_model_name`` as a folder or JSON path.

        ``cache_dir`` is accepted for the original's call signature; nothing is downloaded, so it is not used.
        """
        candidates = [MODULES_DIR / cross_model_name, Path(cross_model_name)]
        config_file = None
        for candidate in candidates:
            if candidate.is_dir() and (candidate / CONFIG_NAME).is_file():
                config_file = candidate / CONFIG_NAME
                break
            if candidate.is_file():
                config_file = candidate
                break
        if config_file is None:
            raise FileNotFoundError(
                f"cross model '{cross_model_name}': no {CONFIG_NAME} in {candidates[0]} "
                f"and '{cross_model_name}' is not a folder holding one nor a JSON file"
            )
        config = cls.from_json_file(config_file)
        config.type_vocab_size = type_vocab_size
        if is_log_rank(task_config):
            logger.info("loading cross config %s", config_file)
            logger.info("Model config %s", config.to_json_string())
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


class ResidualAttentionBlock(clip_blocks.ResidualAttentionBlock):
    """CLIP's pre-norm block with TF-style LayerNorms and an additive (B, L, L) attention mask given per call."""

    def __init__(self, d_model: int, n_head: int):
        super().__init__(d_model, n_head, norm_layer=LayerNorm)
        self.n_head = n_head

    def attention(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        # (B, L, L) -> (B, 1, L, L): one mask per sample, broadcast over the heads instead of copied per head.
        return clip_blocks.self_attention(self.attn, x, attn_mask.unsqueeze(1).to(x.dtype))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln_1(x), attn_mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of :class:`ResidualAttentionBlock` over (L, B, D) input with one (B, L, L) additive mask."""

    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


class CrossEmbeddings(nn.Module):
    """Input plus learned position embeddings, then dropout; no type embedding and no LayerNorm."""

    def __init__(self, config: CrossConfig):
        super().__init__()
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, concat_embeddings: torch.Tensor) -> torch.Tensor:
        seq_length = concat_embeddings.size(1)
        position_ids = torch.arange(seq_length, dtype=torch.long, device=concat_embeddings.device)
        embeddings = concat_embeddings + self.position_embeddings(position_ids).unsqueeze(0)
        return self.dropout(embeddings)


class CrossPooler(nn.Module):
    """TF-LayerNorm over all tokens, then token 0 through a dense layer and QuickGELU."""

    def __init__(self, config: CrossConfig):
        super().__init__()
        self.ln_pool = LayerNorm(config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = QuickGELU()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        pooled_output = self.ln_pool(hidden_states)[:, 0]
        return self.activation(self.dense(pooled_output))


class CrossModel(PreTrainedModel):
    """The tightTransf cross encoder: embeddings, a masked transformer, and a pooler over token 0."""

    def __init__(self, config: CrossConfig):
        super().__init__(config)
        self.embeddings = CrossEmbeddings(config)
        self.transformer = Transformer(
            width=config.hidden_size,
            layers=config.num_hidden_layers,
            heads=config.num_attention_heads,
        )
        self.pooler = CrossPooler(config)
        self.apply(self.init_weights)

    def build_attention_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) keep-mask → additive (B, L, L) mask: 0 where kept, -1e6 where masked (keys only)."""
        extended = attention_mask.unsqueeze(1).to(dtype=self.dtype)
        extended = (1.0 - extended) * -1000000.0
        return extended.expand(-1, attention_mask.size(1), -1)

    def forward(
        self,
        concat_input: torch.Tensor,
        concat_type: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D) input → (sequence output (B, L, D), pooled output (B, D)).

        ``concat_type`` is accepted for the original's call signature; its embeddings never used type ids.
        """
        if attention_mask is None:
            attention_mask = torch.ones(concat_input.shape[:2], device=concat_input.device)
        extended_attention_mask = self.build_attention_mask(attention_mask)

        embedding_output = self.embeddings(concat_input).permute(1, 0, 2)  # NLD -> LND
        embedding_output = self.transformer(embedding_output, extended_attention_mask).permute(1, 0, 2)
        return embedding_output, self.pooler(embedding_output)
