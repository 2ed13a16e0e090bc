"""The original's command line, every flag with its default and help: parsed and checked without importing torch,
so ``--help`` and a bad flag answer at once."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

from dataloaders import DATATYPES
from dataloaders.sampling import VideoSampling
from errors import UsageError, check_max_words
from modules.clip_names import available_models
from modules.names import LOOSE_HEADERS, SIM_HEADERS


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise UsageError(f"{message} (see --help)")


def get_parser() -> argparse.ArgumentParser:
    """Every flag of the original, with its default; the new ones are marked [new]."""
    p = _Parser(description="CLIP4Clip on Retrieval Task", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_mode_flags(p)
    _add_data_flags(p)
    _add_model_flags(p)
    _add_optimisation_flags(p)
    _add_evaluation_flags(p)
    _add_distributed_flags(p)
    _add_compatibility_flags(p)
    return p


def _add_mode_flags(p: argparse.ArgumentParser) -> None:
    """What the run does."""
    g = p.add_argument_group("mode")
    g.add_argument("--do_train", action="store_true", help="train, evaluating the test set after each epoch")
    g.add_argument("--do_eval", action="store_true", help="evaluate --init_model (ignored with --do_train)")
    g.add_argument("--task_type", default="retrieval", choices=["retrieval"], help="only retrieval exists")


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    """Where the data set is and how its videos are sampled."""
    g = p.add_argument_group("data")
    g.add_argument("--datatype", default="msrvtt", choices=list(DATATYPES), help="data set")
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


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    """The CLIP weights, the similarity head and how the model is trained."""
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


def _add_optimisation_flags(p: argparse.ArgumentParser) -> None:
    """The optimiser, the schedule and the checkpoints."""
    g = p.add_argument_group("optimisation")
    g.add_argument("--output_dir", required=True, help="log, checkpoints and metrics go here")
    g.add_argument("--epochs", type=int, default=20, help="passes over the training set")
    g.add_argument("--batch_size", type=int, default=256, help="global train batch, split over the processes")
    g.add_argument("--batch_size_val", type=int, default=3500, help="eval batch of each process")
    g.add_argument("--lr", type=float, default=1e-4, help="base learning rate")
    g.add_argument("--coef_lr", type=float, default=1.0, help="lr multiplier for CLIP parameters")
    g.add_argument("--warmup_proportion", type=float, default=0.1, help="share of steps with linear warm-up")
    g.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=1,
        help="batches whose gradients add up to one optimizer step",
    )
    g.add_argument("--seed", type=int, default=42, help="seed of every random generator")
    g.add_argument("--n_display", type=int, default=100, help="log every N optimizer steps")
    g.add_argument(
        "--resume_model",
        default=None,
        help="pytorch_opt.bin.N to continue from; pass the matching pytorch_model.bin.N as --init_model",
    )
    g.add_argument("--cache_dir", default="", help="accepted for compatibility; nothing is downloaded")


def _add_evaluation_flags(p: argparse.ArgumentParser) -> None:
    """What an evaluation reports."""
    g = p.add_argument_group("evaluation")
    g.add_argument(
        "--eval_dsl", action="store_true", help="[new] also report dual-softmax re-ranked metrics, on separate lines"
    )
    g.add_argument("--dsl_temperature", type=float, default=1.0, help="[new] temperature of --eval_dsl")
    g.add_argument(
        "--qb_norm",
        action="store_true",
        help="[new] also report text-to-video metrics after QB-Norm (dynamic inverted softmax against a bank of the "
        "training captions), on a separate line; needs the training split's annotations and videos",
    )
    g.add_argument(
        "--qb_norm_beta",
        type=float,
        default=20.0,
        help="[new] QB-Norm's inverse temperature, applied to cosine similarities (the logits divided by "
        "exp(logit_scale)); 20 is the paper's",
    )
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


def _add_distributed_flags(p: argparse.ArgumentParser) -> None:
    """The process layout, as the launchers pass it."""
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


def _add_compatibility_flags(p: argparse.ArgumentParser) -> None:
    """The original's flags that nothing reads, accepted so that its scripts still run."""
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


def parse_flags(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and run the original's checks, in its order; the paths are checked when the run config is built."""
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
    for name in ("epochs", "batch_size", "batch_size_val", "n_display", "max_words"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    # The sampling checks its own fields; built here, and dropped, so that a bad count fails before anything loads.
    VideoSampling(max_frames=args.max_frames, feature_framerate=args.feature_framerate)
    if args.num_thread_reader < 0:
        raise UsageError(f"--num_thread_reader must be >= 0, got {args.num_thread_reader}")
    if args.batch_size < args.gradient_accumulation_steps:
        raise UsageError(
            f"--batch_size {args.batch_size} is smaller than --gradient_accumulation_steps "
            f"{args.gradient_accumulation_steps}"
        )
    for name in ("lr", "coef_lr", "dsl_temperature", "qb_norm_beta"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            raise UsageError(f"--{name} must be a positive finite number, got {value}")
    if not 0 <= args.warmup_proportion < 1:  # NaN fails this too
        raise UsageError(f"--warmup_proportion must be in [0, 1), got {args.warmup_proportion}")
    check_max_words(args.max_words)
    if not 0 <= args.seed < 2**32:
        raise UsageError(f"--seed must be in [0, 2**32), got {args.seed}")
    args.batch_size = int(args.batch_size / args.gradient_accumulation_steps)
    return args
