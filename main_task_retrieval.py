"""CLIP4Clip video-text retrieval: train and evaluate, with the original's command line, logs and checkpoints.

Launch with ``torchrun --nproc_per_node=G main_task_retrieval.py ...`` (one or many nodes), the legacy
``python -m torch.distributed.launch``, or plainly ``python main_task_retrieval.py ...`` for one process.

The flags are parsed before torch is imported (``--help`` answers at once); the work is the ``engine`` package's.
The functions below keep the original's names and signatures for scripts written against it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from engine.flags import get_parser, parse_flags  # noqa: F401  (get_parser: the original's public name)
from errors import RunError, UsageError


def get_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and run the original's checks (in its order), then check every path."""
    from engine.config import check_extras, check_paths

    args = parse_flags(argv)
    check_extras(vars(args))
    check_paths(vars(args))
    return args


def _config_and_context(args: argparse.Namespace, device: Any):
    """The run config of the original's namespace and a one-process context on ``device``."""
    import util
    from engine.config import build_config
    from engine.context import RunContext
    from modules.modeling import resolve_precision

    config = build_config(vars(args))
    dist = util.DistInfo(rank=0, local_rank=0, world_size=1, device=device, initialized=False)
    return config, RunContext(dist, resolve_precision(config.model.precision, device))


def init_model(args: argparse.Namespace, device: Any):
    """The run's model: CLIP, then ``--init_model`` over it, frozen as the flags ask."""
    from engine import model

    return model.init_model(*_config_and_context(args, device))


def prep_optimizer(args: argparse.Namespace, model: Any, num_train_optimization_steps: float, coef_lr: float = 1.0):
    """BertAdam over (decay, no-decay) × (CLIP at lr·coef_lr, the rest at lr)."""
    from engine import model as engine_model

    return engine_model.prep_optimizer(model, args.lr, coef_lr, args.warmup_proportion, num_train_optimization_steps)


def train_epoch(epoch, args, model, train_dataloader, device, optimizer, scaler, global_step, run_log=None):
    """One pass over the loader; returns the mean batch loss and the global step."""
    from engine import train

    config, context = _config_and_context(args, device)
    return train.train_epoch(epoch, config, context, model, train_dataloader, optimizer, scaler, global_step, run_log)


def eval_epoch(args, model, test_dataloader, device, tag="eval", model_file=None, run_log=None, global_step=0):
    """Evaluate on the test loader; returns text-to-video R@1."""
    from engine import evaluate

    config, context = _config_and_context(args, device)
    return evaluate.eval_epoch(config, context, model, test_dataloader, tag, model_file, run_log, global_step)


def save_model(epoch: int, args: argparse.Namespace, model, optimizer, tr_loss: float, extra: dict) -> str:
    """``pytorch_model.bin.<epoch>`` and ``pytorch_opt.bin.<epoch>`` in ``--output_dir``, as an atomic pair."""
    from engine import checkpoint

    return checkpoint.save_model(epoch, args.output_dir, model, optimizer, tr_loss, extra)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_flags(argv)
        from engine.config import build_config
        from engine.run import run

        run(build_config(vars(args)))
    except UsageError as error:
        print(f"main_task_retrieval.py: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except RunError as error:  # a run that cannot go on: a non-finite loss, a failed save
        print(f"main_task_retrieval.py: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    finally:
        if "util" in sys.modules:
            sys.modules["util"].cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
