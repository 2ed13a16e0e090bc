"""The run: set-up in the original's order, then evaluation, or training with an evaluation after each epoch."""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader
from tqdm.contrib.logging import logging_redirect_tqdm

import util
from dataloaders.data_dataloaders import DATALOADER_DICT
from engine.checkpoint import load_optimizer_state, load_resume_state, previous_best, save_model
from engine.config import RunConfig
from engine.context import RunContext, start_run, wrap_ddp
from engine.evaluate import eval_epoch
from engine.model import compile_model, init_model, prep_optimizer
from engine.runlog import RunLog
from engine.train import train_epoch
from errors import RunError, UsageError
from modules.modeling import CLIP4Clip
from modules.optimization import BertAdam
from modules.tokenization_clip import SimpleTokenizer as ClipTokenizer

logger = logging.getLogger("logger")


def run(config: RunConfig) -> None:
    """The whole run, as the original orders it: processes and logger, model, test and val loaders, then work.

    ``--output_dir`` is locked for the run's life; a resume's checkpoint pair is checked before the model is built.
    """
    with ExitStack() as hold:
        context = start_run(config, hold)
        resume_state = None
        if config.run.do_train and config.run.resume_model:
            resume_state = load_resume_state(config.run.resume_model, config.run.init_model, config.optim.epochs)
        run_started(config, context, resume_state)


def run_started(config: RunConfig, context: RunContext, resume_state: dict | None) -> None:
    """Model, test and val loaders, then training (from ``resume_state`` when resuming) or an evaluation."""
    tokenizer = ClipTokenizer()
    model = init_model(config, context)
    loaders = DATALOADER_DICT[config.data.datatype]
    data, sampling, batch_size_val = config.data, config.eval_sampling, config.optim.batch_size_val
    test_dataloader, test_length = None, 0
    if loaders["test"] is not None:
        test_dataloader, test_length = loaders["test"](data, sampling, tokenizer, batch_size_val)
    val_dataloader, val_length = loaders["val"](data, sampling, tokenizer, batch_size_val, subset="val")
    if test_dataloader is None:
        test_dataloader, test_length = val_dataloader, val_length
    if context.is_main:
        logger.info("***** Running test *****")
        logger.info("  Num examples = %d", test_length)
        logger.info("  Batch size = %d", batch_size_val)
        logger.info("  Num steps = %d", len(test_dataloader))
        logger.info("***** Running val *****")
        logger.info("  Num examples = %d", val_length)

    run_log = RunLog(config.run.output_dir, config.run.tensorboard) if context.is_main else None
    try:
        if config.run.do_train:
            train_and_evaluate(config, context, model, tokenizer, test_dataloader, run_log, resume_state)
        else:
            eval_epoch(
                config, context, model, test_dataloader, tag="eval", model_file=config.run.init_model, run_log=run_log
            )
    finally:
        if run_log is not None:
            run_log.close()


@dataclass
class TrainState:
    """What the epochs carry forward; a resumed run starts from its checkpoint's."""

    epoch: int = 0
    global_step: int = 0
    best_score: float = 0.00001
    best_model_file: str = "None"


def train_and_evaluate(
    config: RunConfig,
    context: RunContext,
    model: CLIP4Clip,
    tokenizer: ClipTokenizer,
    test_dataloader: DataLoader,
    run_log: RunLog | None,
    resume_state: dict | None = None,
) -> None:
    """Train, evaluating and saving after each epoch; a resumed run from its checked ``resume_state``."""
    per_process = config.optim.batch_size // context.dist.world_size
    train_builder = DATALOADER_DICT[config.data.datatype]["train"]
    train_dataloader, train_length, train_sampler = train_builder(
        config.data, config.train_sampling, tokenizer, per_process
    )
    if len(train_dataloader) == 0:
        raise UsageError(
            f"the training set has {train_length} samples, fewer than one batch of {per_process} per process"
        )
    gas = config.optim.gradient_accumulation_steps
    num_train_optimization_steps = (int(len(train_dataloader) + gas - 1) / gas) * config.optim.epochs
    optim = config.optim
    optimizer = prep_optimizer(model, optim.lr, optim.coef_lr, optim.warmup_proportion, num_train_optimization_steps)
    if config.run.compile:
        compile_model(model)
    model = wrap_ddp(model, context.dist)
    scaler = torch.amp.GradScaler(context.device.type, enabled=context.precision == "fp16")
    if context.is_main:
        logger.info("***** Running training *****")
        logger.info("  Num examples = %d", train_length)
        logger.info("  Batch size = %d", config.optim.batch_size)
        logger.info("  Num steps = %d", num_train_optimization_steps * gas)
    state = TrainState() if resume_state is None else resume(config, context, resume_state, optimizer, scaler)
    for epoch in range(state.epoch, config.optim.epochs):
        train_sampler.set_epoch(epoch)
        run_epoch(epoch, config, context, model, train_dataloader, test_dataloader, optimizer, scaler, state, run_log)


def run_epoch(
    epoch: int,
    config: RunConfig,
    context: RunContext,
    model: torch.nn.Module,
    train_dataloader: DataLoader,
    test_dataloader: DataLoader,
    optimizer: BertAdam,
    scaler: torch.amp.GradScaler,
    state: TrainState,
    run_log: RunLog | None,
) -> None:
    """Train one epoch, save it (rank 0), evaluate it, and keep the best."""
    with logging_redirect_tqdm(loggers=[logger.root]):
        tr_loss, state.global_step = train_epoch(
            epoch, config, context, model, train_dataloader, optimizer, scaler, state.global_step, run_log
        )
    # State of every rank at the start of the next epoch: the evaluation below draws nothing.
    rng_states = util.all_gather_objects(util.get_rng_state())
    output_model_file, save_error = None, None
    if context.is_main:
        logger.info("Epoch %d/%s Finished, Train Loss: %f", epoch + 1, config.optim.epochs, tr_loss)
        run_log.epoch(epoch + 1, state.global_step, tr_loss)
        extra = {"rng_states": rng_states, "global_step": state.global_step, "scaler": scaler.state_dict()}
        try:
            output_model_file = save_model(epoch, config.run.output_dir, model, optimizer, tr_loss, extra)
        except RunError as error:
            save_error = error
    if util.any_rank(save_error is not None):  # every process stops, not only the one that saves
        raise save_error or RunError(f"process 0 could not save the checkpoint of epoch {epoch}; stopping with it")
    with logging_redirect_tqdm(loggers=[logger.root]):
        R1 = eval_epoch(
            config,
            context,
            model,
            test_dataloader,
            tag=f"epoch{epoch}",
            model_file=output_model_file,
            run_log=run_log,
            global_step=state.global_step,
        )
    if context.is_main:
        if state.best_score <= R1:
            state.best_score, state.best_model_file = R1, output_model_file
        logger.info(f"The best model is: {state.best_model_file}, the R1 is: {state.best_score:.4f}")


def resume(
    config: RunConfig, context: RunContext, checkpoint: dict, optimizer: BertAdam, scaler: torch.amp.GradScaler
) -> TrainState:
    """Optimizer, scaler and RNG states of the ``--resume_model`` file; the best so far from the earlier metrics."""
    path = config.run.resume_model
    load_optimizer_state(optimizer, checkpoint["optimizer_state_dict"], path)
    state = TrainState(epoch=checkpoint["epoch"] + 1, global_step=checkpoint.get("global_step", 0))
    if "scaler" in checkpoint:
        scaler.load_state_dict(checkpoint["scaler"])
    rng_states = checkpoint.get("rng_states")
    world_size = context.dist.world_size
    if rng_states:
        if len(rng_states) != world_size:
            logger.warning(
                "resuming %d processes from a run of %d: the data order continues, the "
                "random streams do not match an uninterrupted run",
                world_size,
                len(rng_states),
            )
        util.set_rng_state(rng_states[context.dist.rank % len(rng_states)])
    elif context.is_main:
        logger.warning(
            "%s holds no RNG state (an original checkpoint): training continues, but not "
            "bit-identically to an uninterrupted run",
            path,
        )
    state.best_score, state.best_model_file = previous_best(config.run.output_dir, state.epoch)
    if context.is_main:
        logger.info("Resumed from %s: continuing at epoch %d", path, state.epoch + 1)
    return state
