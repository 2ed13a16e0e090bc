"""CLIP4Clip video-text retrieval: train and evaluate, with the original's command line, logs and checkpoints.

Launch with ``torchrun --nproc_per_node=G main_task_retrieval.py ...`` (one or many nodes), the legacy
``python -m torch.distributed.launch``, or plainly ``python main_task_retrieval.py ...`` for one process.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import util
from dataloaders.data_dataloaders import DATALOADER_DICT
from dataloaders.dataset_util import encode_caption
from dataloaders.rawvideo_util import normalize_video
from metrics import dual_softmax_rerank, retrieval_metrics
from modules.modeling import (
    ADAPTER_PREFIXES,
    LOOSE_HEADERS,
    SIM_HEADERS,
    CLIP4Clip,
    CLIP4ClipConfig,
    freeze_clip_layers,
    implied_by_state_dict,
    resolve_precision,
)
from modules.module_clip import available_models
from modules.optimization import BertAdam
from modules.tokenization_clip import SimpleTokenizer as ClipTokenizer
from util import UsageError

logger = logging.getLogger("logger")

# Similarity is computed in blocks of at most this many logits (loose heads) ...
SIM_BLOCK_ELEMENTS = 1 << 22
# ... or this many (text, video) pairs through the cross encoder (tightTransf).
TIGHT_PAIRS_PER_BLOCK = 2048
TIGHT_VIDEOS_PER_BLOCK = 64


class RunError(RuntimeError):
    """The run cannot go on (a non-finite loss, a checkpoint that could not be written): one line, exit 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise UsageError(f"{message} (see --help)")


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def get_parser() -> argparse.ArgumentParser:
    """Every flag of the original, with its default; the new ones are marked [new]."""
    p = _Parser(description="CLIP4Clip on Retrieval Task", formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    g = p.add_argument_group("mode")
    g.add_argument("--do_train", action="store_true", help="train, evaluating the test set after each epoch")
    g.add_argument("--do_eval", action="store_true", help="evaluate --init_model (ignored with --do_train)")
    g.add_argument("--task_type", default="retrieval", choices=["retrieval"], help="only retrieval exists")

    g = p.add_argument_group("data")
    g.add_argument("--datatype", default="msrvtt", choices=list(DATALOADER_DICT), help="data set")
    g.add_argument("--train_csv", default="data/.train.csv", help="MSR-VTT train id CSV")
    g.add_argument("--val_csv", default="data/.val.csv", help="MSR-VTT test CSV (JSFusion 1k-A)")
    g.add_argument(
        "--data_path",
        default="data/caption.pickle",
        help="MSR-VTT: MSRVTT_data.json; other data sets: the annotation folder",
    )
    g.add_argument("--features_path", default="data/videos_feature.pickle", help="video folder")
    g.add_argument("--num_thread_reader", type=int, default=1, help="DataLoader workers")
    g.add_argument("--max_words", type=int, default=20, help="text tokens, start and end included")
    g.add_argument("--max_frames", type=int, default=100, help="frames per video")
    g.add_argument("--feature_framerate", type=int, default=1, help="frames sampled per second")
    g.add_argument("--expand_msrvtt_sentences", action="store_true", help="MSR-VTT train: one sample per caption")
    g.add_argument(
        "--train_frame_order", type=int, default=0, choices=[0, 1, 2], help="0 in order, 1 reversed, 2 shuffled"
    )
    g.add_argument(
        "--eval_frame_order", type=int, default=0, choices=[0, 1, 2], help="0 in order, 1 reversed, 2 shuffled"
    )
    g.add_argument(
        "--slice_framepos",
        type=int,
        default=0,
        choices=[0, 1, 2],
        help="frames kept from a long video: 0 first, 1 last, 2 uniform",
    )
    g.add_argument("--frame_cache", default=None, metavar="DIR", help="[new] cache decoded frames in DIR")
    g.add_argument(
        "--skip_missing_videos",
        dest="skip_missing",
        action="store_true",
        help="[new] drop listed videos that have no file instead of stopping",
    )

    g = p.add_argument_group("model")
    g.add_argument(
        "--pretrained_clip_name",
        default="ViT-B/32",
        help=f"one of {', '.join(available_models())} (read from modules/), or a weights file",
    )
    g.add_argument("--cross_model", default="cross-base", help="cross config folder under modules/")
    g.add_argument("--init_model", default=None, help="state dict whose keys override the CLIP initialisation")
    g.add_argument("--sim_header", default="meanP", choices=SIM_HEADERS, help="similarity head")
    g.add_argument(
        "--loose_type",
        action="store_true",
        help="dot-product similarity; required by meanP, seqLSTM, seqTransf, ignored by tightTransf",
    )
    g.add_argument(
        "--cross_num_hidden_layers",
        type=int,
        default=4,
        help="layers of the seqTransf transformer and of the tightTransf cross encoder",
    )
    g.add_argument("--linear_patch", default="2d", choices=["2d", "3d"], help="patch embedding")
    g.add_argument(
        "--freeze_layer_num",
        type=int,
        default=0,
        choices=range(-1, 13),
        metavar="{-1..12}",
        help="CLIP blocks below this index (and the embeddings) are frozen; -1 trains everything",
    )
    g.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp16-weights", "fp32", "bf16", "fp16"],
        help="[new] auto: fp16-weights on CUDA (the original's fp16 CLIP), fp32 on CPU; "
        "bf16/fp16: fp32 weights with autocast",
    )
    g.add_argument(
        "--grad_checkpointing", action="store_true", help="[new] recompute CLIP activations in backward to save memory"
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="[new] torch.compile the training forward (the first steps are slow while it compiles)",
    )
    g.add_argument(
        "--tuning",
        default=None,
        choices=["full", "unipt"],
        help="[new] full: fine-tune CLIP (the original); unipt: freeze CLIP and train UniPT's adapters "
        "(the UniPT fork). Default: unipt when --init_model holds adapters, else full",
    )

    g = p.add_argument_group("optimisation")
    g.add_argument("--output_dir", required=True, help="log, checkpoints and metrics go here")
    g.add_argument("--epochs", type=int, default=20)
    g.add_argument("--batch_size", type=int, default=256, help="global train batch, split over the processes")
    g.add_argument("--batch_size_val", type=int, default=3500, help="eval batch of each process")
    g.add_argument("--lr", type=float, default=1e-4, help="base learning rate")
    g.add_argument("--coef_lr", type=float, default=1.0, help="lr multiplier for CLIP parameters")
    g.add_argument("--warmup_proportion", type=float, default=0.1, help="share of steps with linear warm-up")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--n_display", type=int, default=100, help="log every N optimizer steps")
    g.add_argument(
        "--resume_model",
        default=None,
        help="pytorch_opt.bin.N to continue from; pass the matching pytorch_model.bin.N as --init_model",
    )
    g.add_argument("--cache_dir", default="", help="accepted for compatibility; nothing is downloaded")

    g = p.add_argument_group("evaluation")
    g.add_argument(
        "--eval_dsl", action="store_true", help="[new] also report dual-softmax re-ranked metrics, on separate lines"
    )
    g.add_argument("--dsl_temperature", type=float, default=1.0, help="[new] temperature of --eval_dsl")
    g.add_argument(
        "--eval_report",
        action="store_true",
        help="[new] after each evaluation write eval_report.html (metrics, plots, worst captions) into "
        "--output_dir; needs matplotlib",
    )
    g.add_argument(
        "--tensorboard",
        action="store_true",
        help="[new] also write loss, learning rates and metrics to <output_dir>/tensorboard "
        "(metrics.jsonl is always written); needs tensorboard",
    )

    g = p.add_argument_group("distributed (set by the launcher)")
    g.add_argument(
        "--local_rank",
        "--local-rank",
        dest="local_rank",
        type=int,
        default=0,
        help="set by torch.distributed.launch; torchrun uses LOCAL_RANK",
    )
    g.add_argument("--n_gpu", type=int, default=1, help="overwritten with the number of processes")
    g.add_argument("--world_size", type=int, default=0, help="overwritten by torch.distributed")
    g.add_argument("--rank", type=int, default=0, help="overwritten by torch.distributed")

    g = p.add_argument_group("accepted for the original's scripts, no effect")
    for flag in ("--do_pretrain", "--do_lower_case", "--fp16", "--use_mil", "--sampled_use_mil"):
        g.add_argument(
            flag, action="store_true", help=argparse.SUPPRESS if flag != "--fp16" else "no effect; see --precision"
        )
    for flag, kind, default in (
        ("--lr_decay", float, 0.9),
        ("--video_dim", int, 1024),
        ("--margin", float, 0.1),
        ("--hard_negative_rate", float, 0.5),
        ("--negative_weighting", int, 1),
        ("--n_pair", int, 1),
        ("--fp16_opt_level", str, "O1"),
        ("--text_num_hidden_layers", int, 12),
        ("--visual_num_hidden_layers", int, 12),
    ):
        g.add_argument(flag, type=kind, default=default, help=argparse.SUPPRESS)
    return p


def get_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and run the original's checks (in its order), then check every path."""
    args = get_parser().parse_args(argv)
    if args.sim_header == "tightTransf":
        args.loose_type = False
    if args.gradient_accumulation_steps < 1:
        raise UsageError(
            f"Invalid gradient_accumulation_steps parameter: {args.gradient_accumulation_steps}, should be >= 1"
        )
    if not args.do_train and not args.do_eval:
        raise UsageError("At least one of `do_train` or `do_eval` must be True.")
    # The original fails on the first similarity instead; same rule, said before anything is loaded.
    if args.sim_header in LOOSE_HEADERS and not args.loose_type:
        raise UsageError(f"--sim_header {args.sim_header} needs --loose_type (only tightTransf runs without it)")
    for name in ("epochs", "batch_size", "batch_size_val", "n_display", "max_words", "max_frames", "feature_framerate"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.num_thread_reader < 0:
        raise UsageError(f"--num_thread_reader must be >= 0, got {args.num_thread_reader}")
    if args.batch_size < args.gradient_accumulation_steps:
        raise UsageError(
            f"--batch_size {args.batch_size} is smaller than --gradient_accumulation_steps "
            f"{args.gradient_accumulation_steps}"
        )
    for name in ("lr", "coef_lr", "dsl_temperature"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            raise UsageError(f"--{name} must be a positive finite number, got {value}")
    if not 0 <= args.warmup_proportion < 1:  # NaN fails this too
        raise UsageError(f"--warmup_proportion must be in [0, 1), got {args.warmup_proportion}")
    if args.max_words < 3:
        raise UsageError(
            f"--max_words must be >= 3 (the start and end tokens and at least one word), got {args.max_words}"
        )
    if not 0 <= args.seed < 2**32:
        raise UsageError(f"--seed must be in [0, 2**32), got {args.seed}")
    args.batch_size = int(args.batch_size / args.gradient_accumulation_steps)
    check_extras(args)
    check_paths(args)
    return args


def check_extras(args: argparse.Namespace) -> None:
    """The optional packages the asked-for outputs need, named before anything is loaded."""
    for flag, package in (("eval_report", "matplotlib"), ("tensorboard", "tensorboard")):
        if getattr(args, flag) and importlib.util.find_spec(package) is None:
            raise UsageError(f"--{flag} needs the {package} package: pip install -r requirements-report.txt")


def _need(path: str | None, flag: str, kind: str = "file") -> None:
    ok = path is not None and (os.path.isfile(path) if kind == "file" else os.path.isdir(path))
    if not ok:
        raise UsageError(f"{flag} {path}: no such {kind}")


def check_paths(args: argparse.Namespace) -> None:
    """Every input path exists, so a typo fails in a second, not after the model is built."""
    if args.pretrained_clip_name not in available_models() and not os.path.isfile(args.pretrained_clip_name):
        raise UsageError(
            f"--pretrained_clip_name {args.pretrained_clip_name}: neither a known name "
            f"({', '.join(available_models())}) nor an existing file"
        )
    if args.init_model is not None:
        _need(args.init_model, "--init_model")
    elif args.do_eval and not args.do_train:
        logger.warning("--do_eval without --init_model evaluates the untrained CLIP4Clip initialisation")
    if args.resume_model is not None:
        _need(args.resume_model, "--resume_model")
        if args.init_model is None:
            raise UsageError("--resume_model needs the matching --init_model (pytorch_model.bin.N of the same epoch)")
    if args.datatype == "msrvtt":
        _need(args.val_csv, "--val_csv")
        if args.do_train:
            _need(args.train_csv, "--train_csv")
            _need(args.data_path, "--data_path")
    else:
        _need(args.data_path, "--data_path", "folder")
    _need(args.features_path, "--features_path", "folder")
    if args.frame_cache is not None and os.path.exists(args.frame_cache) and not os.path.isdir(args.frame_cache):
        raise UsageError(f"--frame_cache {args.frame_cache}: exists and is not a folder")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UsageError(f"--output_dir {args.output_dir}: exists and is not a folder")
    _need_writable(args.output_dir, "--output_dir")
    if args.frame_cache is not None:
        _need_writable(args.frame_cache, "--frame_cache")


def _need_writable(directory: str, flag: str) -> None:
    """Create ``directory`` if needed and write a file there, so a read-only place fails now, not at the first save."""
    probe = util.temporary_path(os.path.join(directory, "write-test"))
    try:
        os.makedirs(directory, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UsageError(f"{flag} {directory}: cannot write there ({error.strerror or error})") from None


# ---------------------------------------------------------------------------------------------------------------
# Model and optimizer
# ---------------------------------------------------------------------------------------------------------------


def resolve_tuning(args: argparse.Namespace, state_dict: dict[str, torch.Tensor] | None) -> None:
    """Set ``args.tuning`` from the flag and what ``--init_model`` holds, so no adapter is dropped silently.

    Without the flag, a checkpoint with UniPT adapters selects unipt (the fork's own command lines have no flag).
    """
    found = implied_by_state_dict(state_dict)["tuning"] if state_dict is not None else "full"
    if args.tuning is None:
        args.tuning = found
        if found == "unipt":
            logger.info(
                "--init_model %s holds UniPT adapters (%s): tuning unipt",
                args.init_model,
                ", ".join(p + "*" for p in ADAPTER_PREFIXES),
            )
    elif args.tuning == "full" and found == "unipt":
        raise UsageError(
            f"--tuning full: --init_model {args.init_model} holds UniPT adapters "
            f"({', '.join(p + '*' for p in ADAPTER_PREFIXES)}); use --tuning unipt or leave the flag out"
        )


def init_model(args: argparse.Namespace, device: torch.device) -> CLIP4Clip:
    """The run's model: CLIP, then ``--init_model`` over it. Evaluating a checkpoint as another head is refused."""
    state_dict = util.read_state_dict(args.init_model, "--init_model") if args.init_model else None
    resolve_tuning(args, state_dict)
    config = CLIP4ClipConfig.from_args(args)
    if state_dict is not None and not args.do_train:
        check_trained_as(config, state_dict, args.init_model)
    model = CLIP4Clip.from_pretrained(
        args.cross_model,
        cache_dir=args.cache_dir or None,
        state_dict=state_dict,
        task_config=config,
        checkpoint_name=f"--init_model {args.init_model}",
    )
    return model.to(device)


def check_trained_as(config: CLIP4ClipConfig, state_dict: dict[str, torch.Tensor], path: str) -> None:
    """A checkpoint evaluated with the head, layer count and patch it was trained with, or a one-line error.

    Training may start from another head's checkpoint (meanP → seqTransf is a documented use; the missing head
    weights are logged); an evaluation would report metrics of a head that was never trained.
    """
    implied = implied_by_state_dict(state_dict)
    if implied.get("cross_num_hidden_layers") is None:
        implied["cross_num_hidden_layers"] = config.cross_num_hidden_layers
    differ = {key: value for key, value in implied.items() if getattr(config, key) != value}
    if differ:
        flags = " ".join(f"--{key} {value}" for key, value in implied.items())
        asked = ", ".join(f"--{key} {getattr(config, key)}" for key in differ)
        raise UsageError(
            f"--init_model {path} was trained with {flags}; evaluating it with {asked} would score "
            f"untrained weights. Pass the flags it was trained with."
        )


def prep_optimizer(
    args: argparse.Namespace, model: torch.nn.Module, num_train_optimization_steps: float, coef_lr: float = 1.0
) -> BertAdam:
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
        {"params": [p for n, p in decay if "clip." in n], "weight_decay": weight_decay, "lr": args.lr * coef_lr},
        {"params": [p for n, p in decay if "clip." not in n], "weight_decay": weight_decay},
        {"params": [p for n, p in no_decay_params if "clip." in n], "weight_decay": 0.0, "lr": args.lr * coef_lr},
        {"params": [p for n, p in no_decay_params if "clip." not in n], "weight_decay": 0.0},
    ]
    return BertAdam(
        groups,
        lr=args.lr,
        warmup=args.warmup_proportion,
        schedule="warmup_cosine",
        b1=0.9,
        b2=0.98,
        e=1e-6,
        t_total=num_train_optimization_steps,
        weight_decay=weight_decay,
        max_grad_norm=1.0,
    )


def frames_as_uint8(loader: DataLoader) -> DataLoader:
    """Differs from the original (float64 frames): the loader's batches carry the frames' uint8 pixels, an eighth of
    the bytes to collate and copy; ``normalize_video`` turns them into the same float32 values on the device."""
    loader.dataset.uint8_frames = True
    return loader


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


# ---------------------------------------------------------------------------------------------------------------
# What a run records for plots
# ---------------------------------------------------------------------------------------------------------------

METRIC_SCALARS = (("R1", "R1"), ("R5", "R5"), ("R10", "R10"), ("MdR", "MR"), ("MnR", "MeanR"))


class RunLog:
    """Rank 0's numbers for plots: one JSON line per logged step, finished epoch and evaluation in
    ``<output_dir>/metrics.jsonl`` (appended, so a resumed run continues the file), the same as TensorBoard scalars
    under ``<output_dir>/tensorboard`` with ``--tensorboard``."""

    def __init__(self, output_dir: str, tensorboard: bool = False):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def _write(self, record: dict, scalars: dict[str, float], step: int) -> None:
        util.append_line(json.dumps({**record, "time": round(time.time(), 3)}), self.path)
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()

    def step(
        self, epoch: int, step: int, global_step: int, lrs: Sequence[float], loss: float, time_per_step: float
    ) -> None:
        """The numbers of one ``Epoch: e/E, Step: s/n, Lr: ..., Loss: ...`` log line (e and s 1-based, as logged)."""
        scalars = {"train/loss": loss, "train/time_per_step": time_per_step}
        scalars.update({f"train/lr_{i}": lr for i, lr in enumerate(lrs)})
        self._write(
            {
                "event": "step",
                "epoch": epoch,
                "step": step,
                "global_step": global_step,
                "lr": list(lrs),
                "loss": loss,
                "time_per_step": time_per_step,
            },
            scalars,
            global_step,
        )

    def epoch(self, epoch: int, global_step: int, train_loss: float) -> None:
        self._write(
            {"event": "epoch", "epoch": epoch, "global_step": global_step, "train_loss": train_loss},
            {"train/epoch_loss": train_loss},
            global_step,
        )

    def evaluation(self, record: dict, global_step: int) -> None:
        """One evaluation's ``metrics_<tag>.json`` record."""
        scalars = {
            f"eval/{side}_{name}": record[key][metric]
            for side, key in (("t2v", "text_to_video"), ("v2t", "video_to_text"))
            for name, metric in METRIC_SCALARS
        }
        self._write({"event": "eval", "global_step": global_step, **record}, scalars, global_step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------


def save_model(
    epoch: int, args: argparse.Namespace, model: torch.nn.Module, optimizer: BertAdam, tr_loss: float, extra: dict
) -> str:
    """``pytorch_model.bin.<epoch>`` and ``pytorch_opt.bin.<epoch>`` as a pair (rank 0 only).

    The opt file holds the original's {epoch, optimizer_state_dict, loss} plus what an exact continuation needs
    (``extra``: every rank's RNG states, the global step, the grad scaler). Both are written to temporary files
    first and renamed only when both are complete, the model first: an opt file, which is what ``--resume_model``
    names, always has its model beside it. A failed save (disk full, read-only) leaves neither, and earlier epochs'
    files untouched.
    """
    model_to_save = getattr(model, "module", model)
    output_model_file = os.path.join(args.output_dir, f"pytorch_model.bin.{epoch}")
    optimizer_state_file = os.path.join(args.output_dir, f"pytorch_opt.bin.{epoch}")
    try:
        with util.atomic_path(optimizer_state_file) as opt_tmp, util.atomic_path(output_model_file) as model_tmp:
            torch.save(model_to_save.state_dict(), model_tmp)
            torch.save(
                {"epoch": epoch, "optimizer_state_dict": optimizer.state_dict(), "loss": tr_loss, **extra}, opt_tmp
            )
    except (OSError, RuntimeError) as error:  # torch.save reports a failed write as a RuntimeError
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
        raise RunError(
            f"cannot save the checkpoint of epoch {epoch} to {args.output_dir} ({reason}); the files of "
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


def load_resume_state(path: str) -> dict:
    checkpoint = util.read_torch_file(path, "--resume_model")
    if not isinstance(checkpoint, dict) or not {"epoch", "optimizer_state_dict"} <= set(checkpoint):
        raise UsageError(
            f"--resume_model {path}: expected a pytorch_opt.bin.N file with 'epoch' and 'optimizer_state_dict'"
        )
    return checkpoint


def previous_best(output_dir: str, before_epoch: int) -> tuple[float, str]:
    """Best R@1 and model file among the metrics_epoch<k>.json files of epochs before ``before_epoch``."""
    best_score, best_file = 0.00001, "None"
    for epoch in range(before_epoch):
        path = os.path.join(output_dir, f"metrics_epoch{epoch}.json")
        if os.path.isfile(path):
            with open(path) as f:
                record = json.load(f)
            if best_score <= record["text_to_video"]["R1"]:
                best_score, best_file = record["text_to_video"]["R1"], record["model_file"]
    return best_score, best_file


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


def train_epoch(
    epoch: int,
    args: argparse.Namespace,
    model: torch.nn.Module,
    train_dataloader: DataLoader,
    device: torch.device,
    optimizer: BertAdam,
    scaler: torch.amp.GradScaler,
    global_step: int,
    run_log: RunLog | None = None,
) -> tuple[float, int]:
    """One pass over the loader, as the original's loop; returns the mean batch loss and the global step."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model.train()
    log_step = args.n_display
    gas = args.gradient_accumulation_steps
    clip_model = getattr(model, "module", model).clip
    start_time = time.time()
    total_loss = 0.0
    bar = tqdm(
        train_dataloader,
        desc=f"epoch {epoch + 1}/{args.epochs}",
        unit="batch",
        disable=not util.is_main_process(),
        dynamic_ncols=True,
    )
    for step, batch in enumerate(bar):
        input_ids, input_mask, segment_ids, video, video_mask = (t.to(device, non_blocking=True) for t in batch)
        video = normalize_video(video, video_mask)
        with autocast_for(args.precision, device):
            loss = model(input_ids, segment_ids, input_mask, video, video_mask)
        if gas > 1:
            loss = loss / gas
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            # Stopped here, before the step and long before a checkpoint of NaN weights could be written.
            raise RunError(
                f"the training loss is {loss_value} at epoch {epoch + 1}, step {step + 1} (after "
                f"{global_step} optimizer steps); stopping. Lower --lr, or check the data with "
                f"preprocess/check_dataset.py"
            )
        scaler.scale(loss).backward()
        total_loss += loss_value
        if (step + 1) % gas == 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
            # Zeros, not None, as the original's torch did: get_lr() below lists the lr of parameters with a grad.
            optimizer.zero_grad(set_to_none=False)
            # https://github.com/openai/CLIP/issues/46
            torch.clamp_(clip_model.logit_scale.data, max=np.log(100))
            global_step += 1
            if global_step % log_step == 0 and util.is_main_process():
                unique_lrs = sorted(set(optimizer.get_lr()))
                lrs = "-".join("%.9f" % lr for lr in unique_lrs)
                step_loss, step_time = float(loss.detach()), (time.time() - start_time) / (log_step * gas)
                logger.info(
                    "Epoch: %d/%s, Step: %d/%d, Lr: %s, Loss: %f, Time/step: %f",
                    epoch + 1,
                    args.epochs,
                    step + 1,
                    len(train_dataloader),
                    lrs,
                    step_loss,
                    step_time,
                )
                if run_log is not None:
                    run_log.step(epoch + 1, step + 1, global_step, unique_lrs, step_loss, step_time)
                start_time = time.time()
        bar.set_postfix(loss=f"{loss_value:.4f}")
    log_peak_memory(device)
    return total_loss / len(train_dataloader), global_step


def log_peak_memory(device: torch.device) -> None:
    """As the UniPT fork, on CUDA: the peak allocated memory so far (its line, MiB / 1000 as "GB")."""
    if device.type == "cuda" and util.is_main_process():
        logger.info("Memory utilization: %.3f GB" % (torch.cuda.max_memory_allocated(device) / 2**20 / 1000))


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------


def shard(n: int) -> range:
    """This rank's contiguous share of ``n`` items (rank order = item order)."""
    rank, world = util.get_rank(), util.get_world_size()
    return range(n * rank // world, n * (rank + 1) // world)


def _loader_like(loader: DataLoader, indices: Sequence[int]) -> DataLoader:
    return DataLoader(
        Subset(loader.dataset, list(indices)),
        batch_size=loader.batch_size,
        num_workers=loader.num_workers,
        shuffle=False,
        drop_last=False,
        pin_memory=loader.pin_memory,
    )


def encode_test_shard(
    model: CLIP4Clip, test_dataloader: DataLoader, device: torch.device, precision: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's text features, text masks, frame features and video masks, on the CPU.

    Multi-sentence data (MSVD): texts are tokenised straight from the annotations and each video is decoded once
    (at its last caption, as the original selects them), instead of decoding a video per caption.
    """
    dataset = test_dataloader.dataset
    multi = bool(getattr(dataset, "multi_sentence_per_video", False))
    show = util.is_main_process()
    seqs, tmasks, viss, vmasks = [], [], [], []
    with autocast_for(precision, device):
        if multi:
            pairs = list(dataset.all_pairs())
            texts = shard(len(pairs))
            for start in tqdm(
                range(texts.start, texts.stop, test_dataloader.batch_size),
                desc="encode texts",
                disable=not show,
                unit="batch",
            ):
                stop = min(start + test_dataloader.batch_size, texts.stop)
                encoded = [
                    encode_caption(dataset.tokenizer, pairs[i][1], dataset.max_words) for i in range(start, stop)
                ]
                ids, mask, segment = (torch.from_numpy(np.concatenate(parts)).to(device) for parts in zip(*encoded))
                seqs.append(model.get_sequence_output(ids, segment, mask).float().cpu())
                tmasks.append(mask.view(-1, mask.shape[-1]).cpu())
            last_caption = [c - 1 for c in dataset.cut_off_points]
            video_loader = _loader_like(test_dataloader, [last_caption[i] for i in shard(len(last_caption))])
            for batch in tqdm(video_loader, desc="encode videos", disable=not show, unit="batch"):
                _, _, _, video, video_mask = (t.to(device, non_blocking=True) for t in batch)
                video = normalize_video(video, video_mask)
                viss.append(model.get_visual_output(video, video_mask).float().cpu())
                vmasks.append(video_mask.view(-1, video_mask.shape[-1]).cpu())
        else:
            loader = test_dataloader
            if util.get_world_size() > 1:
                loader = _loader_like(test_dataloader, shard(len(dataset)))
            for batch in tqdm(loader, desc="encode test set", disable=not show, unit="batch"):
                input_ids, input_mask, segment_ids, video, video_mask = (t.to(device, non_blocking=True) for t in batch)
                video = normalize_video(video, video_mask)
                seq, vis = model.get_sequence_visual_output(input_ids, segment_ids, input_mask, video, video_mask)
                seqs.append(seq.float().cpu())
                tmasks.append(input_mask.view(-1, input_mask.shape[-1]).cpu())
                viss.append(vis.float().cpu())
                vmasks.append(video_mask.view(-1, video_mask.shape[-1]).cpu())

    def cat(parts: list[torch.Tensor], like: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.cat(parts) if parts else torch.empty((0, *like), dtype=dtype)

    hidden = model.clip.text_projection.shape[1]
    return (
        cat(seqs, (1, hidden), torch.float32),
        cat(tmasks, (dataset.max_words,), torch.long),
        cat(viss, (dataset.max_frames, hidden), torch.float32),
        cat(vmasks, (dataset.max_frames,), torch.long),
    )


def similarity_columns(
    model: CLIP4Clip,
    seq: torch.Tensor,
    text_mask: torch.Tensor,
    vis: torch.Tensor,
    video_mask: torch.Tensor,
    device: torch.device,
) -> torch.Tensor:
    """[all texts, these videos] logits of ``model.get_similarity_logits``, in bounded-memory blocks, on the CPU.

    Loose heads: each block is all texts × a slice of videos, so the temporal head runs once per video (it does
    not depend on the text) and the result equals the original's per-batch-pair computation. tightTransf: blocks
    of (text, video) pairs through the cross encoder.
    """
    n_text, n_video = seq.shape[0], vis.shape[0]
    if n_video == 0:
        return torch.empty((n_text, 0))
    columns = []
    if model.loose_type:
        step = max(1, SIM_BLOCK_ELEMENTS // max(n_text, 1))
        seq_d, text_mask_d = seq.to(device), text_mask.to(device)
        for v0 in range(0, n_video, step):
            logits, _ = model.get_similarity_logits(
                seq_d,
                vis[v0 : v0 + step].to(device),
                text_mask_d,
                video_mask[v0 : v0 + step].to(device),
                loose_type=True,
            )
            columns.append(logits.float().cpu())
        return torch.cat(columns, dim=1)
    v_step = min(n_video, TIGHT_VIDEOS_PER_BLOCK)
    t_step = max(1, TIGHT_PAIRS_PER_BLOCK // v_step)
    for v0 in range(0, n_video, v_step):
        vis_d, video_mask_d = vis[v0 : v0 + v_step].to(device), video_mask[v0 : v0 + v_step].to(device)
        rows = []
        for t0 in range(0, n_text, t_step):
            logits, _ = model.get_similarity_logits(
                seq[t0 : t0 + t_step].to(device),
                vis_d,
                text_mask[t0 : t0 + t_step].to(device),
                video_mask_d,
                loose_type=False,
            )
            rows.append(logits.float().cpu())
        columns.append(torch.cat(rows, dim=0))
    return torch.cat(columns, dim=1)


def _metric_line(m: dict, prefix: str = "") -> str:
    return (
        f"\t>>>  {prefix}R@1: {m['R1']:.1f} - {prefix}R@5: {m['R5']:.1f} - {prefix}R@10: {m['R10']:.1f} - "
        f"{prefix}Median R: {m['MR']:.1f} - {prefix}Mean R: {m['MeanR']:.1f}"
    )


def _plain(m: dict) -> dict:
    return {k: float(v) for k, v in m.items() if k in ("R1", "R5", "R10", "MR", "MedianR", "MeanR", "Std_Rank")}


def write_eval_report(
    args: argparse.Namespace,
    dataset,
    sim_matrix: np.ndarray,
    cut: list[int] | None,
    tables: dict[str, dict],
    tag: str,
    model_file: str | None,
    curves: str | None,
) -> None:
    """``eval_report.html`` in ``--output_dir`` (replaced by each evaluation), thumbnails from the frames the model
    saw: the test set's own decoding of each video."""
    import eval_report
    from dataloaders.rawvideo_util import kept_frames_uint8

    pairs = list(dataset.all_pairs())
    if cut is None:  # one caption per video: row i and column i are pair i
        video_pairs, truth = pairs, np.arange(len(pairs))
    else:  # caption rows grouped by video; each video is its last caption's pair, as encoded
        video_pairs = [pairs[c - 1] for c in cut]
        truth = np.repeat(np.arange(len(cut)), np.diff([0] + list(cut)))

    def frames(j: int) -> np.ndarray:
        video_id, _, start, end = video_pairs[j]
        return kept_frames_uint8(
            dataset.rawVideoExtractor,
            dataset.video_dict[video_id],
            dataset.max_frames,
            dataset.slice_framepos,
            start,
            end,
        )

    path = os.path.join(args.output_dir, "eval_report.html")
    details = {
        "evaluation": tag,
        "model": model_file or args.pretrained_clip_name,
        "data set": args.datatype,
        "head": args.sim_header,
    }
    eval_report.write_report(
        path,
        sim_matrix,
        truth,
        [p[1] for p in pairs],
        [str(p[0]) for p in video_pairs],
        tables,
        frames,
        title=f"CLIP4Clip evaluation report ({tag})",
        details=details,
        curves=curves,
    )
    logger.info("Evaluation report written to %s", path)


def eval_epoch(
    args: argparse.Namespace,
    model: torch.nn.Module,
    test_dataloader: DataLoader,
    device: torch.device,
    tag: str,
    model_file: str | None = None,
    run_log: RunLog | None = None,
    global_step: int = 0,
) -> float:
    """Every rank encodes its shard and scores its videos' columns; rank 0 logs the metrics, writes
    ``metrics_<tag>.json``, records them in ``run_log`` and, with ``--eval_report``, writes ``eval_report.html``.
    Returns text-to-video R@1 (on every rank). Draws nothing from the RNGs."""
    model = getattr(model, "module", model)
    dataset = test_dataloader.dataset
    multi = bool(getattr(dataset, "multi_sentence_per_video", False))
    is_main = util.is_main_process()
    if multi and is_main:
        logger.warning("Eval under the multi-sentence per video clip setting.")
        logger.warning(f"sentence num: {dataset.sentence_num}, video num: {dataset.video_num}")

    model.eval()
    with torch.no_grad(), util.preserved_rng():
        seq, text_mask, vis, video_mask = encode_test_shard(model, test_dataloader, device, args.precision)
        texts = util.all_gather_objects((seq, text_mask))
        seq, text_mask = torch.cat([t[0] for t in texts]), torch.cat([t[1] for t in texts])
        block = similarity_columns(model, seq, text_mask, vis, video_mask, device)
    blocks = util.gather_objects(block.numpy())

    R1 = 0.0
    if is_main:
        sim_matrix = np.concatenate(blocks, axis=1)
        cut = list(dataset.cut_off_points) if multi else None
        if multi:
            logger.info(f"before reshape, sim matrix size: {sim_matrix.shape[0]} x {sim_matrix.shape[1]}")
            shape = (len(cut), max(e - s for s, e in zip([0] + cut[:-1], cut)), sim_matrix.shape[1])
            logger.info("after reshape, sim matrix size: {} x {} x {}".format(*shape))
        else:
            logger.info(f"sim matrix size: {sim_matrix.shape[0]}, {sim_matrix.shape[1]}")
            logger.info(f"\t Length-T: {len(sim_matrix)}, Length-V:{len(sim_matrix[0])}")
        tv_metrics, vt_metrics = retrieval_metrics(sim_matrix, cut)
        logger.info("Text-to-Video:")
        logger.info(_metric_line(tv_metrics))
        logger.info("Video-to-Text:")
        logger.info(_metric_line(vt_metrics, "V2T$"))
        record = {
            "tag": tag,
            "model_file": model_file,
            "datatype": args.datatype,
            "sim_header": args.sim_header,
            "num_texts": int(sim_matrix.shape[0]),
            "num_videos": int(sim_matrix.shape[1]),
            "text_to_video": _plain(tv_metrics),
            "video_to_text": _plain(vt_metrics),
        }
        if args.eval_dsl:
            # Re-ranked copies only: the standard numbers above are never replaced.
            dsl_tv, _ = retrieval_metrics(dual_softmax_rerank(sim_matrix, args.dsl_temperature), cut)
            _, dsl_vt = retrieval_metrics(dual_softmax_rerank(sim_matrix.T, args.dsl_temperature).T, cut)
            logger.info("Text-to-Video, dual-softmax re-ranked (--eval_dsl, temperature %g):", args.dsl_temperature)
            logger.info(_metric_line(dsl_tv, "DSL$"))
            logger.info("Video-to-Text, dual-softmax re-ranked (--eval_dsl, temperature %g):", args.dsl_temperature)
            logger.info(_metric_line(dsl_vt, "DSL$V2T$"))
            record["dsl"] = {
                "temperature": args.dsl_temperature,
                "text_to_video": _plain(dsl_tv),
                "video_to_text": _plain(dsl_vt),
            }
        util.atomic_write_text(
            json.dumps(record, indent=1) + "\n", os.path.join(args.output_dir, f"metrics_{tag}.json")
        )
        if run_log is not None:
            run_log.evaluation(record, global_step)
        if args.eval_report:
            tables = {"Text-to-Video": tv_metrics, "Video-to-Text": vt_metrics}
            if args.eval_dsl:
                tables.update({"Text-to-Video, DSL": dsl_tv, "Video-to-Text, DSL": dsl_vt})
            write_eval_report(
                args, dataset, sim_matrix, cut, tables, tag, model_file, run_log.path if run_log is not None else None
            )
        R1 = float(tv_metrics["R1"])
    log_peak_memory(device)
    return util.broadcast_object(R1)


# ---------------------------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------------------------


def prepare(args: argparse.Namespace) -> tuple[util.DistInfo, CLIP4Clip, ClipTokenizer]:
    """Process group, seeding, logger, precision, batch check, tokenizer, model and freezing (the original's order)."""
    dist_info = util.init_distributed(args.local_rank)
    util.set_seed(args.seed)
    args.local_rank, args.rank, args.world_size = dist_info.local_rank, dist_info.rank, dist_info.world_size
    os.makedirs(args.output_dir, exist_ok=True)
    global logger
    logger = util.get_logger(os.path.join(args.output_dir, "log.txt") if dist_info.rank == 0 else None)
    if dist_info.rank == 0:
        remove_stale_temporaries(args.output_dir)

    args.precision = resolve_precision(args.precision, dist_info.device)
    # Differs from the original, which divides by the visible GPU count (8 visible GPUs with 4 processes gave a
    # quarter batch): one process per device, so the per-process batch is batch_size // world_size.
    args.n_gpu = dist_info.world_size
    if args.batch_size % args.n_gpu != 0:
        raise UsageError(
            f"Invalid batch_size parameter: {args.batch_size} (after gradient accumulation) is not a "
            f"multiple of the {args.n_gpu} processes"
        )
    if dist_info.rank == 0:
        logger.info("Effective parameters:")
        for key in sorted(args.__dict__):
            logger.info(f"  <<< {key}: {args.__dict__[key]}")
    logger.info(f"device: {dist_info.device} n_gpu: {args.n_gpu}")

    tokenizer = ClipTokenizer()
    model = init_model(args, dist_info.device)
    freeze_clip_layers(model, args.freeze_layer_num, args.linear_patch)
    args.image_resolution = model.clip.visual.input_resolution
    return dist_info, model, tokenizer


@contextmanager
def startup_checks() -> Iterator[None]:
    """Errors raised while a run is set up come from its flags and input files: they become one usage line.

    Errors raised later, while training or evaluating, keep their traceback.
    """
    try:
        yield
    except UsageError:
        raise
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(str(error)) from error


def run(args: argparse.Namespace) -> None:
    with startup_checks():
        dist_info, model, tokenizer = prepare(args)
        is_main = dist_info.rank == 0

        loaders = DATALOADER_DICT[args.datatype]
        test_dataloader, test_length = None, 0
        if loaders["test"] is not None:
            test_dataloader, test_length = loaders["test"](args, tokenizer)
        val_dataloader, val_length = loaders["val"](args, tokenizer, subset="val")
        if test_dataloader is None:
            test_dataloader, test_length = val_dataloader, val_length
        frames_as_uint8(test_dataloader)
        frames_as_uint8(val_dataloader)
        if is_main:
            logger.info("***** Running test *****")
            logger.info("  Num examples = %d", test_length)
            logger.info("  Batch size = %d", args.batch_size_val)
            logger.info("  Num steps = %d", len(test_dataloader))
            logger.info("***** Running val *****")
            logger.info("  Num examples = %d", val_length)

    run_log = RunLog(args.output_dir, args.tensorboard) if is_main else None
    try:
        train_and_evaluate(args, dist_info, model, tokenizer, loaders, test_dataloader, run_log)
    finally:
        if run_log is not None:
            run_log.close()


def train_and_evaluate(
    args: argparse.Namespace,
    dist_info: util.DistInfo,
    model: CLIP4Clip,
    tokenizer: ClipTokenizer,
    loaders: dict,
    test_dataloader: DataLoader,
    run_log: RunLog | None,
) -> None:
    """Evaluate the model (``--do_eval``), or train it, evaluating after each epoch (``--do_train``)."""
    device = dist_info.device
    is_main = dist_info.rank == 0
    if not args.do_train:
        eval_epoch(args, model, test_dataloader, device, tag="eval", model_file=args.init_model, run_log=run_log)
        return

    with startup_checks():
        train_dataloader, train_length, train_sampler = loaders["train"](args, tokenizer)
        frames_as_uint8(train_dataloader)
        if len(train_dataloader) == 0:
            raise UsageError(
                f"the training set has {train_length} samples, fewer than one batch of "
                f"{args.batch_size // args.n_gpu} per process"
            )
        gas = args.gradient_accumulation_steps
        num_train_optimization_steps = (int(len(train_dataloader) + gas - 1) / gas) * args.epochs
        optimizer = prep_optimizer(args, model, num_train_optimization_steps, coef_lr=args.coef_lr)
        if args.compile:
            compile_model(model)
        model = wrap_ddp(model, dist_info)
        scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
        if is_main:
            logger.info("***** Running training *****")
            logger.info("  Num examples = %d", train_length)
            logger.info("  Batch size = %d", args.batch_size)
            logger.info("  Num steps = %d", num_train_optimization_steps * gas)

        best_score, best_output_model_file = 0.00001, "None"
        resumed_epoch, global_step = 0, 0
        if args.resume_model:
            checkpoint = load_resume_state(args.resume_model)
            optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
            resumed_epoch = checkpoint["epoch"] + 1
            global_step = checkpoint.get("global_step", 0)
            if "scaler" in checkpoint:
                scaler.load_state_dict(checkpoint["scaler"])
            rng_states = checkpoint.get("rng_states")
            if rng_states:
                if len(rng_states) != dist_info.world_size:
                    logger.warning(
                        "resuming %d processes from a run of %d: the data order continues, the "
                        "random streams do not match an uninterrupted run",
                        dist_info.world_size,
                        len(rng_states),
                    )
                util.set_rng_state(rng_states[dist_info.rank % len(rng_states)])
            elif is_main:
                logger.warning(
                    "%s holds no RNG state (an original checkpoint): training continues, but not "
                    "bit-identically to an uninterrupted run",
                    args.resume_model,
                )
            best_score, best_output_model_file = previous_best(args.output_dir, resumed_epoch)
            if is_main:
                logger.info("Resumed from %s: continuing at epoch %d", args.resume_model, resumed_epoch + 1)

    for epoch in range(resumed_epoch, args.epochs):
        train_sampler.set_epoch(epoch)
        with logging_redirect_tqdm(loggers=[logger.root]):
            tr_loss, global_step = train_epoch(
                epoch, args, model, train_dataloader, device, optimizer, scaler, global_step, run_log
            )
        # State of every rank at the start of the next epoch: the evaluation below draws nothing.
        rng_states = util.all_gather_objects(util.get_rng_state())
        output_model_file = None
        if is_main:
            logger.info("Epoch %d/%s Finished, Train Loss: %f", epoch + 1, args.epochs, tr_loss)
            run_log.epoch(epoch + 1, global_step, tr_loss)
            output_model_file = save_model(
                epoch,
                args,
                model,
                optimizer,
                tr_loss,
                {"rng_states": rng_states, "global_step": global_step, "scaler": scaler.state_dict()},
            )
        with logging_redirect_tqdm(loggers=[logger.root]):
            R1 = eval_epoch(
                args,
                model,
                test_dataloader,
                device,
                tag=f"epoch{epoch}",
                model_file=output_model_file,
                run_log=run_log,
                global_step=global_step,
            )
        if is_main:
            if best_score <= R1:
                best_score, best_output_model_file = R1, output_model_file
            logger.info(f"The best model is: {best_output_model_file}, the R1 is: {best_score:.4f}")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = get_args(argv)
        run(args)
    except UsageError as error:
        print(f"main_task_retrieval.py: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except RunError as error:  # a run that cannot go on: a non-finite loss, a failed save
        print(f"main_task_retrieval.py: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    finally:
        util.cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
