"""What a run learns as it starts (process layout, device, resolved precision) and the set-up that learns it."""

from __future__ import annotations

import logging
import os
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass

import torch

import util
from engine.checkpoint import remove_stale_temporaries
from engine.config import RunConfig
from engine.runlock import run_lock
from modules.modeling import resolve_precision
from util import UsageError

logger = logging.getLogger("logger")


@dataclass(frozen=True)
class RunContext:
    """This process's place in the run and the precision the asked one resolved to on its device."""

    dist: util.DistInfo
    precision: str

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0


def start_run(config: RunConfig, hold: ExitStack | None = None) -> RunContext:
    """Process group, seeding, logger, precision and batch check, in the original's order.

    With ``hold``, rank 0 locks ``--output_dir`` into it before anything is written there (the log included), so a
    second run into the same folder stops at once; the lock lasts as long as ``hold``.
    """
    dist_info = util.init_distributed(config.run.local_rank)
    util.set_seed(config.run.seed)
    output_dir = config.run.output_dir
    os.makedirs(output_dir, exist_ok=True)
    stale = hold.enter_context(run_lock(output_dir)) if hold is not None and dist_info.rank == 0 else None
    util.get_logger(os.path.join(output_dir, "log.txt") if dist_info.rank == 0 else None)
    if stale:
        logger.warning("took over the lock of %s: its run (%s) is gone", output_dir, stale)
    if dist_info.rank == 0:
        remove_stale_temporaries(output_dir)
    context = RunContext(dist_info, resolve_precision(config.model.precision, dist_info.device))
    # Differs from the original, which divides by the visible GPU count (8 visible GPUs with 4 processes gave a
    # quarter batch): one process per device, so the per-process batch is batch_size // world_size.
    n_gpu = dist_info.world_size
    if config.optim.batch_size % n_gpu != 0:
        raise UsageError(
            f"Invalid batch_size parameter: {config.optim.batch_size} (after gradient accumulation) is not a "
            f"multiple of the {n_gpu} processes"
        )
    if context.is_main:
        log_effective_parameters(config, context)
    logger.info(f"device: {dist_info.device} n_gpu: {n_gpu}")
    return context


def log_effective_parameters(config: RunConfig, context: RunContext) -> None:
    """The flags as the original logs its namespace: with the process layout and the resolved precision."""
    known_now = {
        "local_rank": context.dist.local_rank,
        "rank": context.dist.rank,
        "world_size": context.dist.world_size,
        "n_gpu": context.dist.world_size,
        "precision": context.precision,
    }
    logger.info("Effective parameters:")
    for key, value in config.flags:
        logger.info(f"  <<< {key}: {known_now.get(key, value)}")


def wrap_ddp(model: torch.nn.Module, dist_info: util.DistInfo) -> torch.nn.Module:
    if not dist_info.initialized:
        return model
    ids = [dist_info.local_rank] if dist_info.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=ids, output_device=ids[0] if ids else None, find_unused_parameters=True
    )


def autocast_for(precision: str, device: torch.device):
    """Autocast for the bf16/fp16 modes; the fp16-weights and fp32 modes run as they are."""
    if precision in ("bf16", "fp16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return nullcontext()


def log_peak_memory(device: torch.device) -> None:
    """As the UniPT fork, on CUDA: the peak allocated memory so far (its line, MiB / 1000 as "GB")."""
    if device.type == "cuda" and util.is_main_process():
        logger.info("Memory utilization: %.3f GB" % (torch.cuda.max_memory_allocated(device) / 2**20 / 1000))
