"""The run's model: tuning resolved against --init_model, CLIP4Clip built and frozen, its optimizer."""

from __future__ import annotations

import dataclasses
import logging

import torch

from engine.config import RunConfig
from engine.context import RunContext
from modules.clip_formats import read_checkpoint
from modules.modeling import ADAPTER_PREFIXES, CLIP4Clip, CLIP4ClipConfig, freeze_clip_layers, implied_by_state_dict
from modules.optimization import BertAdam
from util import UsageError

logger = logging.getLogger("logger")


def resolve_tuning(asked: str | None, init_model: str | None, state_dict: dict[str, torch.Tensor] | None) -> str:
    """The tuning from the flag and what ``--init_model`` holds, so no adapter is dropped silently.

    Without the flag, a checkpoint with UniPT adapters selects unipt (the fork's own command lines have no flag).
    """
    found = implied_by_state_dict(state_dict)["tuning"] if state_dict is not None else "full"
    adapters = ", ".join(p + "*" for p in ADAPTER_PREFIXES)
    if asked is None:
        if found == "unipt":
            logger.info("--init_model %s holds UniPT adapters (%s): tuning unipt", init_model, adapters)
        return found
    if asked == "full" and found == "unipt":
        raise UsageError(
            f"--tuning full: --init_model {init_model} holds UniPT adapters ({adapters}); use --tuning unipt or "
            f"leave the flag out"
        )
    return asked


def init_model(config: RunConfig, context: RunContext) -> CLIP4Clip:
    """The run's model: CLIP, then ``--init_model`` over it, frozen below ``--freeze_layer_num``. Evaluating a
    checkpoint as another head is refused."""
    path = config.run.init_model
    state_dict = read_checkpoint(path, "--init_model") if path else None
    tuning = resolve_tuning(config.run.tuning, path, state_dict)
    model_config = dataclasses.replace(config.model, tuning=tuning, precision=context.precision)
    if state_dict is not None and not config.run.do_train:
        check_trained_as(model_config, state_dict, path)
    model = CLIP4Clip.from_pretrained(
        config.run.cross_model,
        state_dict=state_dict,
        task_config=model_config,
        checkpoint_name=f"--init_model {path}",
    ).to(context.device)
    freeze_clip_layers(model, model_config.freeze_layer_num, model_config.linear_patch)
    return model


def check_trained_as(config: CLIP4ClipConfig, state_dict: dict[str, torch.Tensor], path: str) -> None:
    """A checkpoint evaluated with the head, layer count and patch it was trained with, or a one-line error.

    Training may start from another head's checkpoint (meanP → seqTransf is a documented use; the missing head
    weights are logged); an evaluation would report metrics of a head that was never trained.
    """
    # A meanP or seqLSTM checkpoint holds no layer count: neither compared nor named.
    implied = implied_by_state_dict(state_dict)
    differ = {key: value for key, value in implied.items() if getattr(config, key) != value}
    if differ:
        flags = " ".join(f"--{key} {value}" for key, value in implied.items())
        asked = ", ".join(f"--{key} {getattr(config, key)}" for key in differ)
        raise UsageError(
            f"--init_model {path} was trained with {flags}; evaluating it with {asked} would score "
            f"untrained weights. Pass the flags it was trained with."
        )


def prep_optimizer(model: torch.nn.Module, lr: float, coef_lr: float, warmup: float, total_steps: float) -> BertAdam:
    """BertAdam over four groups: (decay, no-decay) × (CLIP at lr·coef_lr, the rest at lr).

    As the original, full tuning groups every parameter, frozen ones included (they never get a gradient). As the
    UniPT fork, unipt groups only the adapters, which hold no CLIP name, so they all land in the two groups at lr.
    """
    model = getattr(model, "module", model)
    param_optimizer = list(model.named_parameters())
    if getattr(getattr(model, "task_config", None), "tuning", "full") == "unipt":  # any module may be optimized
        param_optimizer = [(n, p) for n, p in param_optimizer if n.startswith(ADAPTER_PREFIXES)]
    no_decay = ["bias", "LayerNorm.bias", "LayerNorm.weight"]
    decay = [(n, p) for n, p in param_optimizer if not any(nd in n for nd in no_decay)]
    no_decay_params = [(n, p) for n, p in param_optimizer if any(nd in n for nd in no_decay)]
    weight_decay = 0.2
    groups = [
        {"params": [p for n, p in decay if "clip." in n], "weight_decay": weight_decay, "lr": lr * coef_lr},
        {"params": [p for n, p in decay if "clip." not in n], "weight_decay": weight_decay},
        {"params": [p for n, p in no_decay_params if "clip." in n], "weight_decay": 0.0, "lr": lr * coef_lr},
        {"params": [p for n, p in no_decay_params if "clip." not in n], "weight_decay": 0.0},
    ]
    return BertAdam(
        groups,
        lr=lr,
        warmup=warmup,
        schedule="warmup_cosine",
        b1=0.9,
        b2=0.98,
        e=1e-6,
        t_total=total_steps,
        weight_decay=weight_decay,
        max_grad_norm=1.0,
    )


def compile_model(model: torch.nn.Module) -> None:
    """``torch.compile`` the model's forward in place (its state-dict keys stay). What cannot be compiled runs
    eagerly with a warning instead of stopping the run."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    try:
        model.compile()
    except Exception as error:  # e.g. a Python version this torch cannot compile for
        logger.warning(
            "--compile: torch.compile is unavailable (%s); training without it",
            str(error).splitlines()[0] if str(error) else type(error).__name__,
        )
