"""CLIP (ViT only) as CLIP4Clip uses it: the two towers, architecture inference, fp16 conversion.

State-dict keys are exactly OpenAI's, so ``ViT-B-32.pt`` / ``ViT-B-16.pt`` load unchanged; reading those files is
:mod:`modules.clip_weights`' job.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from modules.clip_names import OPENAI_FILE_NAMES, OPENAI_MODEL_URLS
from modules.clip_names import available_models as available_models

# The original's names for the model tables.
_MODELS = OPENAI_MODEL_URLS
_PT_NAME = OPENAI_FILE_NAMES

# Entries of OpenAI's TorchScript archives that are not model parameters.
_JIT_EXTRAS = ("input_resolution", "context_length", "vocab_size")


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm computed in fp32 (fp16 statistics are too coarse), cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


AttnMask = torch.Tensor | Callable[[int], torch.Tensor] | None


def self_attention(attn: nn.MultiheadAttention, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``attn(x, x, x, attn_mask=mask)`` on (L, N, D) input, computed with ``scaled_dot_product_attention``.

    The same weights and maths as ``nn.MultiheadAttention`` (its parameters, so the state-dict keys stay), without
    its input checks, reshapes and mask copies; ``mask`` is additive and broadcasts to (N, heads, L, L): (L, L) for
    all samples, or (N, 1, L, L) per sample.
    """
    length, batch, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(length, batch, 3, heads, width // heads)
    q, k, v = qkv.permute(2, 1, 3, 0, 4).unbind(0)  # each (N, heads, L, head_dim)
    dropout = attn.dropout if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    out = out.permute(2, 0, 1, 3).reshape(length, batch, width)
    return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: x + attn(ln_1 x), then x + mlp(ln_2 x). Input is (L, N, D)."""

    def __init__(self, d_model: int, n_head: int, attn_mask: AttnMask = None, norm_layer: type = None):
        super().__init__()
        norm_layer = norm_layer or LayerNorm
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = norm_layer(d_model)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(d_model, d_model * 4)),
                    ("gelu", QuickGELU()),
                    ("c_proj", nn.Linear(d_model * 4, d_model)),
                ]
            )
        )
        self.ln_2 = norm_layer(d_model)
        # A callable builds the mask for the actual sequence length (the text tower's causal mask).
        self.attn_mask = attn_mask

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.attn_mask(x.shape[0]) if callable(self.attn_mask) else self.attn_mask
        if mask is not None:
            # Host-to-device copies may be asynchronous; a blocking one would stall the GPU queue every block.
            mask = mask.to(dtype=x.dtype, device=x.device, non_blocking=True)
        return self_attention(self.attn, x, mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual attention blocks on (L, N, D) tensors."""

    def __init__(self, width: int, layers: int, heads: int, attn_mask: AttnMask = None):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, attn_mask) for _ in range(layers)])
        # Recompute each block's activations in backward: same numbers, less memory.
        self.grad_checkpointing: bool = False

    def forward(
        self, x: torch.Tensor, hidden_states: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """(L, N, D) → (L, N, D); ``hidden_states`` adds (h_0, ..., h_layers): the input and every block's output,
        each an (N, L, D) view (UniPT's side network reads them)."""
        states = [x] if hidden_states else None
        for block in self.resblocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if states is not None:
                states.append(x)
        if states is None:
            return x
        return x, tuple(s.permute(1, 0, 2) for s in states)


def _run_transformer(
    transformer: Transformer, x: torch.Tensor, hidden_states: bool
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """(N, L, D) through ``transformer`` (which works on (L, N, D)) → (N, L, D) and its hidden states or None."""
    out = transformer(x.permute(1, 0, 2), hidden_states=hidden_states)
    x, states = out if hidden_states else (out, None)
    return x.permute(1, 0, 2), states


def _outputs(pooled: torch.Tensor, tokens: torch.Tensor | None, states: tuple[torch.Tensor, ...] | None):
    """``pooled`` alone, or a tuple of it followed by the requested extras (all tokens, then hidden states)."""
    extras = tuple(e for e in (tokens, states) if e is not None)
    return (pooled, *extras) if extras else pooled


class VisualTransformer(nn.Module):
    """The ViT image tower; ``linear_patch='3d'`` adds CLIP4Clip's temporal patch embedding ``conv2``."""

    def __init__(
        self,
        input_resolution: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        output_dim: int,
        linear_patch: str = "2d",
    ):
        super().__init__()
        if linear_patch not in ("2d", "3d"):
            raise ValueError(f"linear_patch must be '2d' or '3d', got {linear_patch!r}")
        self.input_resolution = input_resolution
        self.output_dim = output_dim
        self.linear_patch = linear_patch
        # Creation order is the original's, so a seeded global RNG gives the same initial values.
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))
        if linear_patch == "3d":
            self.conv2 = nn.Conv3d(
                3,
                width,
                kernel_size=(3, patch_size, patch_size),
                stride=(1, patch_size, patch_size),
                padding=(1, 0, 0),
                bias=False,
            )

    def _patchify_3d(self, x: torch.Tensor, video_frame: int) -> torch.Tensor:
        n = x.shape[0]
        if video_frame < 1 or n % video_frame:
            raise ValueError(
                f"linear_patch='3d' needs video_frame = frames per video dividing the batch of {n} "
                f"images, got video_frame={video_frame}"
            )
        x = x.reshape(n // video_frame, video_frame, *x.shape[-3:]).permute(0, 2, 1, 3, 4)  # (B, 3, T, H, W)
        x = self.conv2(x).permute(0, 2, 1, 3, 4)  # (B, T, width, g, g)
        return x.reshape(n, *x.shape[-3:])

    def forward(self, x: torch.Tensor, video_frame: int = -1, return_hidden: bool = False, hidden_states: bool = False):
        """Images (N, 3, H, W) → (N, output_dim) class-token features; ``return_hidden`` adds all tokens
        (N, 1+g², output_dim); ``hidden_states`` adds the transformer's (h_0, ..., h_layers), each (N, 1+g², width)."""
        x = self._patchify_3d(x, video_frame) if self.linear_patch == "3d" else self.conv1(x)
        x = x.flatten(2).permute(0, 2, 1)  # (N, g*g, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        x, states = _run_transformer(self.transformer, x, hidden_states)
        # ln_post and proj on all tokens, as CLIP4Clip does, so the hidden sequence comes for free.
        hidden = self.ln_post(x) @ self.proj
        pooled = hidden[:, 0, :]
        return _outputs(pooled, hidden if return_hidden else None, states)


class CLIP(nn.Module):
    """OpenAI's CLIP with a ViT image tower (CLIP4Clip's variant: 3d patches, length-L causal text mask)."""

    def __init__(
        self,
        embed_dim: int,
        image_resolution: int,
        vision_layers: int,
        vision_width: int,
        vision_patch_size: int,
        context_length: int,
        vocab_size: int,
        transformer_width: int,
        transformer_heads: int,
        transformer_layers: int,
        linear_patch: str = "2d",
    ):
        super().__init__()
        if isinstance(vision_layers, (tuple, list)):
            raise ValueError(
                f"vision_layers={tuple(vision_layers)} describes a ResNet CLIP; CLIP4Clip needs a ViT "
                f"CLIP (e.g. ViT-B/32 or ViT-B/16)"
            )
        self.context_length = context_length
        self.visual = VisualTransformer(
            input_resolution=image_resolution,
            patch_size=vision_patch_size,
            width=vision_width,
            layers=vision_layers,
            heads=vision_width // 64,
            output_dim=embed_dim,
            linear_patch=linear_patch,
        )
        self.transformer = Transformer(
            transformer_width, transformer_layers, transformer_heads, attn_mask=self.build_attention_mask
        )
        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]))  # CLIP4Clip's value; pretrained files overwrite it
        self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """OpenAI's initialisation of the text tower (the visual tower initialises itself)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width, layers = self.transformer.width, self.transformer.layers
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        attn_std = width**-0.5
        fc_std = (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    @staticmethod
    def get_config(pretrained_clip_name: str = "ViT-B/32") -> dict[str, torch.Tensor]:
        """The CLIP state dict for a model name (``ViT-B/32``, ``ViT-B/16``, a tiny random name) or a file path."""
        # Imported here: the loader builds tiny CLIPs with this module's classes, so a top-level import would be a
        # cycle. This method is the original's entry point; the resolving itself lives in clip_weights.
        from modules.clip_weights import load_clip_state_dict

        return load_clip_state_dict(pretrained_clip_name)

    @staticmethod
    def build_attention_mask(length: int) -> torch.Tensor:
        """Additive causal mask (length, length): -inf above the diagonal, 0 elsewhere."""
        return torch.full((length, length), float("-inf")).triu_(1)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def encode_image(
        self, image: torch.Tensor, return_hidden: bool = False, video_frame: int = -1, hidden_states: bool = False
    ):
        """Images (N, 3, H, W) → (N, embed_dim); with ``return_hidden`` also all projected tokens; with
        ``hidden_states`` also the tower's (h_0, ..., h_layers), each (N, 1+g², vision width)."""
        return self.visual(
            image.to(self.dtype), video_frame=video_frame, return_hidden=return_hidden, hidden_states=hidden_states
        )

    def encode_text(self, text: torch.Tensor, return_hidden: bool = False, hidden_states: bool = False):
        """Token ids (N, L), L ≤ context_length → end-token features (N, embed_dim); ``return_hidden`` adds
        (N, L, embed_dim); ``hidden_states`` adds the tower's (h_0, ..., h_layers), each (N, L, text width)."""
        length = text.shape[1]
        if length > self.context_length:
            raise ValueError(f"text has {length} tokens, more than CLIP's context_length {self.context_length}")
        x = self.token_embedding(text).to(self.dtype) + self.positional_embedding[:length].to(self.dtype)
        x, states = _run_transformer(self.transformer, x, hidden_states)
        hidden = self.ln_final(x).to(self.dtype) @ self.text_projection
        # The end token has the largest id (49407) and padding is 0, so argmax finds it.
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), text.argmax(dim=-1)]
        return _outputs(pooled, hidden if return_hidden else None, states)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits_per_image, logits_per_text): scaled cosine similarities."""
        image_features = F.normalize(self.encode_image(image), dim=-1)
        text_features = F.normalize(self.encode_text(text), dim=-1)
        scale = self.logit_scale.exp()
        return scale * image_features @ text_features.t(), scale * text_features @ image_features.t()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.transformer.grad_checkpointing = enable
        self.transformer.grad_checkpointing = enable


def convert_weights(model: nn.Module) -> None:
    """Cast to fp16, in place, what OpenAI's CLIP keeps in fp16: Conv/Linear weights and biases, attention
    projections, and ``text_projection`` / ``proj``. Embeddings, LayerNorms and ``logit_scale`` stay fp32."""

    def to_half(t: torch.Tensor | None) -> None:
        if t is not None:
            t.data = t.data.half()

    def convert(module: nn.Module) -> None:
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            to_half(module.weight)
            to_half(module.bias)
        if isinstance(module, nn.MultiheadAttention):
            for name in (
                "in_proj_weight",
                "q_proj_weight",
                "k_proj_weight",
                "v_proj_weight",
                "in_proj_bias",
                "bias_k",
                "bias_v",
            ):
                to_half(getattr(module, name))
        for name in ("text_projection", "proj"):
            attr = getattr(module, name, None)
            if isinstance(attr, torch.Tensor):
                to_half(attr)

    model.apply(convert)


def _shape(state_dict: Mapping[str, torch.Tensor], key: str, ndim: int, what: str) -> torch.Size:
    if key not in state_dict:
        hint = ""
        if any(k.startswith(("clip.", "module.")) for k in state_dict):
            hint = " (its keys carry a 'clip.'/'module.' prefix: this is a wrapper checkpoint, not a CLIP state dict)"
        raise ValueError(f"not a ViT CLIP state dict: missing key {key!r} ({what}){hint}")
    value = state_dict[key]
    if not isinstance(value, torch.Tensor) or value.dim() != ndim:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"CLIP state dict key {key!r} ({what}): expected a {ndim}-d tensor, got {got}")
    return value.shape


def clip_config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """CLIP constructor kwargs inferred from the tensor shapes of an OpenAI-layout ViT state dict."""
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"expected a CLIP state dict (mapping of names to tensors), got {type(state_dict).__name__}")
    if any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in state_dict):
        raise ValueError(
            "this is a ResNet CLIP state dict (keys 'visual.layer1.*'); CLIP4Clip needs a ViT CLIP "
            "(ViT-B/32 or ViT-B/16)"
        )
    conv1 = _shape(state_dict, "visual.conv1.weight", 4, "patch embedding (width, 3, patch, patch)")
    vis_pos = _shape(state_dict, "visual.positional_embedding", 2, "visual positions (1 + grid², width)")
    text_proj = _shape(state_dict, "text_projection", 2, "text projection (width, embed_dim)")
    text_pos = _shape(state_dict, "positional_embedding", 2, "text positions (context_length, width)")
    tokens = _shape(state_dict, "token_embedding.weight", 2, "token embedding (vocab_size, width)")
    ln_final = _shape(state_dict, "ln_final.weight", 1, "final text LayerNorm (width,)")
    vision_layers = len([k for k in state_dict if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")])
    text_layers = len({k.split(".")[2] for k in state_dict if k.startswith("transformer.resblocks.")})
    vision_width, text_width = conv1[0], ln_final[0]
    for name, width, layers in (("visual", vision_width, vision_layers), ("text", text_width, text_layers)):
        if layers == 0:
            raise ValueError(
                f"CLIP state dict has no {name} transformer blocks "
                f"(no '{'visual.' if name == 'visual' else ''}transformer.resblocks.*' keys)"
            )
        if width < 64:
            raise ValueError(f"CLIP {name} width {width} is below 64; heads are inferred as width // 64")
    grid = round((vis_pos[0] - 1) ** 0.5)
    return dict(
        embed_dim=text_proj[1],
        image_resolution=conv1[-1] * grid,
        vision_layers=vision_layers,
        vision_width=vision_width,
        vision_patch_size=conv1[-1],
        context_length=text_pos[0],
        vocab_size=tokens[0],
        transformer_width=text_width,
        transformer_heads=text_width // 64,
        transformer_layers=text_layers,
    )


def _check_against(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise ValueError naming the first key that is missing, unexpected or of the wrong shape."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    for key, shape in expected.items():
        if key not in state_dict:
            raise ValueError(
                f"CLIP state dict is missing key {key!r} (expected shape {tuple(shape)}) for the "
                f"architecture inferred from its shapes"
            )
        value = state_dict[key]
        if not isinstance(value, torch.Tensor) or value.shape != shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"CLIP state dict key {key!r}: expected shape {tuple(shape)}, got {got}")
    for key in state_dict:
        if key not in expected:
            raise ValueError(f"CLIP state dict has unexpected key {key!r}, not part of an OpenAI ViT CLIP")


def build_model(state_dict: Mapping[str, torch.Tensor]) -> CLIP:
    """Infer the architecture, build it, cast to OpenAI's fp16 set, load strictly; returns the model in eval mode."""
    config = clip_config_from_state_dict(state_dict)
    weights = {k: v for k, v in state_dict.items() if k not in _JIT_EXTRAS}  # the caller's dict is left intact
    linear_patch = "3d" if "visual.conv2.weight" in weights else "2d"
    with torch.device("meta"):  # shape check first, without allocating or touching the RNG
        _check_against(CLIP(**config, linear_patch=linear_patch), weights)
    model = CLIP(**config, linear_patch=linear_patch)
    convert_weights(model)
    model.load_state_dict(weights)
    return model.eval()
