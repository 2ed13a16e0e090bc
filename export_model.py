#!/usr/bin/env python
"""Export a trained CLIP4Clip checkpoint as plain files that load without pickle.

    python export_model.py --init_model ckpts/pytorch_model.bin.4 --output_dir exported/
        [--pretrained_clip_name ViT-B/32] [--hf_dir exported/hf_clip]

``--output_dir`` gets ``model.safetensors`` (every weight, under the checkpoint's own keys) and ``config.json``
(the model: head, its layer count, patch embedding, tuning, and the CLIP architecture). ``--hf_dir`` adds the CLIP
towers as a Hugging Face ``transformers`` ``CLIPModel`` folder. That folder holds CLIP only: with the meanP head it
gives CLIP4Clip's scores in any CLIP pipeline (mean of the normalised frame embeddings); the seqLSTM, seqTransf and
tightTransf heads' weights, UniPT's adapters and a 3d patch embedding have no place in a CLIPModel and are left out
(3d is refused). See docs/weights.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import torch

from modules.clip_formats import write_exported, write_hf_clip
from modules.clip_weights import load_clip_state_dict
from modules.modeling import implied_by_state_dict
from modules.module_clip import clip_config_from_state_dict
from util import UsageError, read_state_dict

CLIP_PREFIX = "clip."
# Not weights: entries OpenAI's TorchScript archives carry beside them.
_CLIP_EXTRAS = ("input_resolution", "context_length", "vocab_size")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--init_model", required=True, help="the trained checkpoint (pytorch_model.bin.N)")
    p.add_argument("--output_dir", required=True, help="folder for model.safetensors + config.json")
    p.add_argument(
        "--pretrained_clip_name",
        default=None,
        help="CLIP weights for a checkpoint that holds none (a UniPT checkpoint saved without its frozen CLIP)",
    )
    p.add_argument("--hf_dir", default=None, help="also write the CLIP towers as a transformers CLIPModel folder")
    return p


def complete_checkpoint(state: dict[str, torch.Tensor], clip_name: str | None, where: str) -> dict[str, torch.Tensor]:
    """The checkpoint with every CLIP weight: its own, else those of ``clip_name`` under the ``clip.`` prefix."""
    if any(k.startswith(CLIP_PREFIX) for k in state):
        return state
    if clip_name is None:
        raise UsageError(f"--init_model {where}: holds no CLIP weights ('clip.*'); give --pretrained_clip_name")
    clip = load_clip_state_dict(clip_name)
    return {**state, **{CLIP_PREFIX + k: v for k, v in clip.items() if k not in _CLIP_EXTRAS}}


def clip_part(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(CLIP_PREFIX) :]: v for k, v in state.items() if k.startswith(CLIP_PREFIX)}


def model_config(state: dict[str, torch.Tensor], where: str) -> dict[str, Any]:
    """config.json's content: what the keys say about the model and its CLIP."""
    try:
        clip = clip_config_from_state_dict(clip_part(state))
    except ValueError as error:
        raise UsageError(f"--init_model {where}: {error}") from None
    return {"model": implied_by_state_dict(state), "clip": clip}


def export(init_model: str, output_dir: str, clip_name: str | None = None, hf_dir: str | None = None) -> dict:
    """Write the exported folder (and the transformers folder when ``hf_dir`` is given); returns the config."""
    state = complete_checkpoint(read_state_dict(init_model, "--init_model"), clip_name, init_model)
    config = model_config(state, init_model)
    write_exported(output_dir, state, config)
    if hf_dir is not None:
        write_hf_clip(hf_dir, clip_part(state))
    return config


def main(argv: Sequence[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    try:
        config = export(args.init_model, args.output_dir, args.pretrained_clip_name, args.hf_dir)
    except UsageError as e:
        print(f"export_model.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output_dir} ({config['model']['sim_header']}, tuning {config['model']['tuning']})")
    if args.hf_dir is not None:
        print(f"wrote {args.hf_dir} (transformers CLIPModel: CLIP towers only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
