"""Checkpoints: the model and optimizer files of an epoch as an atomic pair, resuming from one, the previous best."""

from __future__ import annotations

import json
import logging
import os
import re

import torch

import util
from errors import RunError
from modules.optimization import BertAdam
from util import UsageError

logger = logging.getLogger("logger")


def save_model(
    epoch: int, output_dir: str, model: torch.nn.Module, optimizer: BertAdam, tr_loss: float, extra: dict
) -> str:
    """``pytorch_model.bin.<epoch>`` and ``pytorch_opt.bin.<epoch>`` as a pair (rank 0 only).

    The opt file holds the original's {epoch, optimizer_state_dict, loss} plus what an exact continuation needs
    (``extra``: every rank's RNG states, the global step, the grad scaler) and the model file's SHA-256. Both are written to temporary files
    first and renamed only when both are complete, the model first: an opt file, which is what ``--resume_model``
    names, always has its model beside it. A failed save (disk full, read-only) leaves neither, and earlier epochs'
    files untouched.
    """
    model_to_save = getattr(model, "module", model)
    output_model_file = os.path.join(output_dir, f"pytorch_model.bin.{epoch}")
    optimizer_state_file = os.path.join(output_dir, f"pytorch_opt.bin.{epoch}")
    try:
        with util.atomic_path(optimizer_state_file) as opt_tmp, util.atomic_path(output_model_file) as model_tmp:
            torch.save(model_to_save.state_dict(), model_tmp)
            # The model file's fingerprint tells a resume whether --init_model is this file's pair.
            extra = {**extra, "model_sha256": util.file_sha256(model_tmp)}
            torch.save(
                {"epoch": epoch, "optimizer_state_dict": optimizer.state_dict(), "loss": tr_loss, **extra}, opt_tmp
            )
    except (OSError, RuntimeError) as error:  # torch.save reports a failed write as a RuntimeError
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
        raise RunError(
            f"cannot save the checkpoint of epoch {epoch} to {output_dir} ({reason}); the files of "
            f"earlier epochs are untouched"
        ) from None
    logger.info("Model saved to %s", output_model_file)
    logger.info("Optimizer saved to %s", optimizer_state_file)
    return output_model_file


def remove_stale_temporaries(output_dir: str) -> None:
    """Temporary files of a save that was killed (they never became checkpoints) are deleted, saying so."""
    removed = util.remove_stale_temporaries(output_dir)
    if removed:
        logger.warning(
            "removed %d temporary file(s) of an interrupted save in %s: %s",
            len(removed),
            output_dir,
            ", ".join(p.name for p in removed),
        )


def load_resume_state(resume_model: str, init_model: str, epochs: int) -> dict:
    """The ``--resume_model`` file, checked before anything trains: an epoch left to train, and ``--init_model`` the
    model file saved with it (same run, same epoch)."""
    checkpoint = util.read_torch_file(resume_model, "--resume_model")
    if not isinstance(checkpoint, dict) or not {"epoch", "optimizer_state_dict"} <= set(checkpoint):
        raise UsageError(
            f"--resume_model {resume_model}: expected a pytorch_opt.bin.N file with 'epoch' and 'optimizer_state_dict'"
        )
    epoch = checkpoint["epoch"]
    if type(epoch) is not int or epoch < 0:
        raise UsageError(f"--resume_model {resume_model}: its epoch is {epoch!r}; expected a whole number >= 0")
    if epoch + 1 >= epochs:
        raise UsageError(
            f"--resume_model {resume_model} ends epoch {epoch + 1} of the run and --epochs {epochs} leaves nothing "
            f"to train: raise --epochs"
        )
    _check_pair(resume_model, checkpoint, init_model)
    return checkpoint


def _check_pair(resume_model: str, checkpoint: dict, init_model: str) -> None:
    epoch, pair = checkpoint["epoch"], f"pytorch_model.bin.{checkpoint['epoch']}"
    named = re.fullmatch(r"pytorch_model\.bin\.(-?\d+)", os.path.basename(init_model))
    if named and int(named.group(1)) != epoch:
        raise UsageError(
            f"--init_model {init_model} is the model of epoch {named.group(1)}, --resume_model {resume_model} the "
            f"optimizer of epoch {epoch}: give the pair of one epoch ({pair} with it)"
        )
    recorded = checkpoint.get("model_sha256")
    if recorded is None:
        logger.warning(
            "%s records no fingerprint of its model file (saved by an older version): cannot check that "
            "--init_model %s is its pair",
            resume_model,
            init_model,
        )
    elif recorded != util.file_sha256(init_model):
        raise UsageError(
            f"--init_model {init_model} is not the model saved with --resume_model {resume_model} (another run or "
            f"epoch): give the {pair} saved beside it"
        )


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, resume_model: str) -> None:
    """``state`` into ``optimizer``, refused naming ``resume_model`` when it is not this model's (other parameter
    groups, or moments of another shape, which would only fail at the first step)."""
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise UsageError(
            f"--resume_model {resume_model}: its optimizer state does not fit this model "
            f"({' '.join(str(error).split())[:120]})"
        ) from None
    for group in optimizer.param_groups:
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                    raise UsageError(
                        f"--resume_model {resume_model}: its optimizer state {name!r} has shape "
                        f"{tuple(value.shape)} for a weight of shape {tuple(param.shape)}; not this model's file"
                    )


def previous_best(output_dir: str, before_epoch: int) -> tuple[float, str]:
    """Best R@1 and model file among the metrics_epoch<k>.json files of epochs before ``before_epoch``."""
    best_score, best_file = 0.00001, "None"
    for epoch in range(before_epoch):
        path = os.path.join(output_dir, f"metrics_epoch{epoch}.json")
        if os.path.isfile(path):
            score, model_file = _r1_of(path)
            if best_score <= score:
                best_score, best_file = score, model_file
    return best_score, best_file


def _r1_of(path: str) -> tuple[float, str]:
    """An earlier epoch's text-to-video R@1 and model file, or a one-line error naming its metrics file."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        score, model_file = record["text_to_video"]["R1"], record["model_file"]
    except (ValueError, KeyError, TypeError) as error:  # JSON and UTF-8 errors are ValueErrors
        raise UsageError(
            f"{path}: expected an earlier epoch's metrics (a JSON object with text_to_video.R1 and model_file) to "
            f"resume from ({type(error).__name__}: {' '.join(str(error).split())[:80]})"
        ) from None
    return score, model_file
