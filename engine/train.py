"""One training epoch: the original's loop with gradient accumulation, a grad scaler and a finite-loss guard."""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import util
from dataloaders.rawvideo_util import normalize_video
from engine.config import RunConfig
from engine.context import RunContext, autocast_for, log_peak_memory
from engine.runlog import RunLog
from errors import RunError
from modules.optimization import BertAdam

logger = logging.getLogger("logger")


def train_epoch(
    epoch: int,
    config: RunConfig,
    context: RunContext,
    model: torch.nn.Module,
    train_dataloader: DataLoader,
    optimizer: BertAdam,
    scaler: torch.amp.GradScaler,
    global_step: int,
    run_log: RunLog | None = None,
) -> tuple[float, int]:
    """One pass over the loader, as the original's loop; returns the mean batch loss and the global step."""
    device = context.device
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model.train()
    log_step = config.optim.n_display
    gas = config.optim.gradient_accumulation_steps
    start_time = time.time()
    total_loss = 0.0
    bar = tqdm(
        train_dataloader,
        desc=f"epoch {epoch + 1}/{config.optim.epochs}",
        unit="batch",
        disable=not util.is_main_process(),
        dynamic_ncols=True,
    )
    for step, batch in enumerate(bar):
        input_ids, input_mask, segment_ids, video, video_mask = (t.to(device, non_blocking=True) for t in batch)
        video = normalize_video(video, video_mask)
        with autocast_for(context.precision, device):
            loss = model(input_ids, segment_ids, input_mask, video, video_mask)
        if gas > 1:
            loss = loss / gas
        loss_value = float(loss.detach())
        finite = math.isfinite(loss_value)
        if util.any_rank(not finite):
            # Stopped here, on every process, before the step and long before a checkpoint of NaN weights is written.
            where = f"at epoch {epoch + 1}, step {step + 1} (after {global_step} optimizer steps)"
            if finite:
                raise RunError(f"another process's training loss is not finite {where}; stopping with it")
            raise RunError(
                f"the training loss is {loss_value} {where}; stopping. Lower --lr, or check the data with "
                f"preprocess/check_dataset.py"
            )
        scaler.scale(loss).backward()
        total_loss += loss_value
        if (step + 1) % gas == 0:
            _optimizer_step(model, optimizer, scaler)
            global_step += 1
            if global_step % log_step == 0 and util.is_main_process():
                _log_step(config, optimizer, epoch, step, len(train_dataloader), global_step, loss, start_time, run_log)
                start_time = time.time()
        bar.set_postfix(loss=f"{loss_value:.4f}")
    log_peak_memory(device)
    return total_loss / len(train_dataloader), global_step


def _optimizer_step(model: torch.nn.Module, optimizer: BertAdam, scaler: torch.amp.GradScaler) -> None:
    """Clip the unscaled gradients to norm 1, step, zero the gradients and keep the logit scale at most 100."""
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(optimizer)
    scaler.update()
    # Zeros, not None, as the original's torch did: get_lr() lists the lr of parameters with a grad.
    optimizer.zero_grad(set_to_none=False)
    # https://github.com/openai/CLIP/issues/46
    clip_model = getattr(model, "module", model).clip
    torch.clamp_(clip_model.logit_scale.data, max=np.log(100))


def _log_step(
    config: RunConfig,
    optimizer: BertAdam,
    epoch: int,
    step: int,
    n_steps: int,
    global_step: int,
    loss: torch.Tensor,
    start_time: float,
    run_log: RunLog | None,
) -> None:
    """The original's ``Epoch: e/E, Step: s/n, Lr: ..., Loss: ...`` line (e and s 1-based), and its run-log record."""
    log_step, gas = config.optim.n_display, config.optim.gradient_accumulation_steps
    unique_lrs = sorted(set(optimizer.get_lr()))
    lrs = "-".join("%.9f" % lr for lr in unique_lrs)
    step_loss, step_time = float(loss.detach()), (time.time() - start_time) / (log_step * gas)
    logger.info(
        "Epoch: %d/%s, Step: %d/%d, Lr: %s, Loss: %f, Time/step: %f",
        epoch + 1,
        config.optim.epochs,
        step + 1,
        n_steps,
        lrs,
        step_loss,
        step_time,
    )
    if run_log is not None:
        run_log.step(epoch + 1, step + 1, global_step, unique_lrs, step_loss, step_time)
