"""Loading a checkpoint into CLIP4Clip: what is refused or warned, and the head weights copied from CLIP."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from modules.model_config import CLIP4ClipConfig
from modules.until_module import is_log_rank
from util import UsageError

if TYPE_CHECKING:
    from modules.modeling import CLIP4Clip

logger = logging.getLogger("modules.modeling")


def copies_from_clip(config: CLIP4ClipConfig, checkpoint: Mapping[str, torch.Tensor]) -> bool:
    """Whether loading initialises a head the checkpoint lacks from CLIP's text tower (see
    :func:`add_initialisation_copies`)."""
    if config.sim_header == "tightTransf":
        return not any("cross.transformer" in key for key in checkpoint)
    if config.sim_header in ("seqLSTM", "seqTransf"):
        return not any("frame_position_embeddings" in key for key in checkpoint)
    return False


def _preview(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_checkpoint(model: nn.Module, state_dict: Mapping[str, torch.Tensor], name: str) -> None:
    """Refuse a checkpoint that cannot be this model's; warn about what of the model it leaves at initialisation.

    Errors: none of its weights is one of the model's, or it holds CLIP weights (clip.*) and none of them is one of
    the model's (another architecture, or not a CLIP4Clip file), or a weight has another shape. Warnings: head
    weights it lacks (they start from their initialisation, e.g. a meanP checkpoint fine-tuned with seqTransf, a
    documented use), weights it holds that the model does not use, and CLIP weights it lacks (they keep the CLIP
    file's values).
    """
    own = model.state_dict()
    keys = {key.replace("gamma", "weight").replace("beta", "bias"): key for key in state_dict}
    clip_keys = [key for key in keys if key.startswith("clip.")]
    if not any(key in own for key in keys) or (clip_keys and not any(key in own for key in clip_keys)):
        raise UsageError(
            f"{name}: none of its {len(clip_keys) or len(keys)} {'CLIP ' if clip_keys else ''}weights "
            f"is one of this model's; it is not a CLIP4Clip checkpoint of this CLIP (its first keys: "
            f"{_preview(list(keys), 3)})"
        )
    for key, original in keys.items():
        if key in own and tuple(own[key].shape) != tuple(state_dict[original].shape):
            raise UsageError(
                f"{name}: {original} has shape {tuple(state_dict[original].shape)}, the model expects "
                f"{tuple(own[key].shape)} (a checkpoint of another CLIP or head size?)"
            )
    if not is_log_rank(getattr(model, "task_config", None)):
        return
    missing_head = [key for key in own if not key.startswith("clip.") and key not in keys]
    missing_clip = [key for key in own if key.startswith("clip.") and key not in keys]
    unused = [original for key, original in keys.items() if key not in own]
    if missing_head:
        logger.warning(
            "%s has no weights for %d parameters of the %s head; they start from their initialisation: %s",
            name,
            len(missing_head),
            getattr(model, "sim_header", "?"),
            _preview(missing_head),
        )
    if unused:
        logger.warning(
            "%s holds %d weights this model does not use (trained with another head or layer count?): %s",
            name,
            len(unused),
            _preview(unused),
        )
    if missing_clip:
        logger.warning(
            "%s lacks %d CLIP weights; they keep the CLIP file's values: %s",
            name,
            len(missing_clip),
            _preview(missing_clip),
        )


def add_initialisation_copies(
    model: CLIP4Clip,
    state_dict: dict[str, torch.Tensor],
    clip_state_dict: dict[str, torch.Tensor],
    cross_num_hidden_layers: int,
) -> None:
    """As the original at load time: fill head weights that ``state_dict`` lacks from CLIP, in place.

    The 3d kernel comes from the merged dict's conv1 (so a fine-tuned one when ``--init_model`` has it); the
    text-tower copies always come from the CLIP file itself.
    """

    def has_key_containing(fragment: str) -> bool:
        return any(fragment in key for key in state_dict)

    def text_blocks(new_prefix: str) -> dict[str, torch.Tensor]:
        copies = {}
        for key, val in clip_state_dict.items():
            if key.startswith("transformer.resblocks.") and int(key.split(".")[2]) < cross_num_hidden_layers:
                copies[new_prefix + key[len("transformer.") :]] = val.clone()
        return copies

    if model.linear_patch == "3d" and not has_key_containing("visual.conv2.weight"):
        conv1 = state_dict["clip.visual.conv1.weight"].clone()
        kernel_t = model.clip.visual.conv2.weight.size(2)
        left = (kernel_t - 1) // 2
        right = kernel_t - 1 - left
        zeros = lambda n: conv1.new_zeros(conv1.shape[0], conv1.shape[1], n, *conv1.shape[2:])  # noqa: E731
        # Temporal centre slice = conv1, so 3d equals 2d on the centre frame at initialisation.
        state_dict["clip.visual.conv2.weight"] = torch.cat([zeros(left), conv1.unsqueeze(2), zeros(right)], dim=2)

    if model.sim_header == "tightTransf" and not has_key_containing("cross.transformer"):
        state_dict["cross.embeddings.position_embeddings.weight"] = clip_state_dict["positional_embedding"].clone()
        state_dict.update(text_blocks("cross.transformer."))

    if model.sim_header in ("seqLSTM", "seqTransf") and not has_key_containing("frame_position_embeddings"):
        state_dict["frame_position_embeddings.weight"] = clip_state_dict["positional_embedding"].clone()
        if model.sim_header == "seqTransf":
            # The text tower's blocks (the paper says "image": a typo, issue #60).
            state_dict.update(text_blocks("transformerClip."))
