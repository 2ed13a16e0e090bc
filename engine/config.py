"""The run config: the flags, checked, as one frozen value made of typed parts; built once by the entry script."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import util
from dataloaders.data_dataloaders import DataConfig
from dataloaders.sampling import VideoSampling
from modules.clip_names import TINY_MODELS, available_models
from modules.clip_weights import checkpoint_image_resolution, clip_weight_shapes
from modules.modeling import CLIP4ClipConfig
from modules.module_clip import clip_config_from_state_dict
from util import UsageError

logger = logging.getLogger("logger")

# The input size of OpenAI's ViT CLIPs (both are trained at 224 pixels); a weights file says its own.
OPENAI_IMAGE_RESOLUTION = 224


@dataclass(frozen=True)
class OptimConfig:
    """``batch_size`` is the global batch of one forward pass (the flag divided by the accumulation steps)."""

    epochs: int
    batch_size: int
    batch_size_val: int
    lr: float
    coef_lr: float
    warmup_proportion: float
    gradient_accumulation_steps: int
    n_display: int


@dataclass(frozen=True)
class RunOptions:
    """What the run does besides the model and the data. ``tuning`` is as asked (None: read off --init_model)."""

    do_train: bool
    seed: int
    output_dir: str
    init_model: str | None
    resume_model: str | None
    cross_model: str
    tuning: str | None
    compile: bool
    local_rank: int
    # The evaluation's extras, off unless asked for.
    eval_dsl: bool = False
    dsl_temperature: float = 1.0
    qb_norm: bool = False
    qb_norm_beta: float = 20.0
    eval_report: bool = False
    tensorboard: bool = False


@dataclass(frozen=True)
class RunConfig:
    """Everything a run is asked to do. ``flags`` are the parsed flags as logged under "Effective parameters"."""

    model: CLIP4ClipConfig
    train_sampling: VideoSampling
    eval_sampling: VideoSampling
    data: DataConfig
    optim: OptimConfig
    run: RunOptions
    flags: tuple[tuple[str, Any], ...]


def _part(cls: type, flags: Mapping[str, Any], **renamed: Any) -> Any:
    names = [f.name for f in dataclasses.fields(cls) if f.name not in renamed]
    return cls(**{name: flags[name] for name in names}, **renamed)


def build_config(flags: Mapping[str, Any]) -> RunConfig:
    """The run config of the parsed flags (name → value: ``vars()`` of the parser's namespace), after checking the
    optional packages and every path."""
    check_extras(flags)
    check_paths(flags)
    sampling = VideoSampling(
        max_frames=flags["max_frames"],
        feature_framerate=flags["feature_framerate"],
        slice_framepos=flags["slice_framepos"],
        image_resolution=clip_image_resolution(flags["pretrained_clip_name"], flags["init_model"]),
        frame_order=flags["train_frame_order"],
    )
    return RunConfig(
        model=CLIP4ClipConfig.from_args(SimpleNamespace(**flags)),
        train_sampling=sampling,
        eval_sampling=dataclasses.replace(sampling, frame_order=flags["eval_frame_order"]),
        data=_part(DataConfig, flags, num_workers=flags["num_thread_reader"]),
        optim=_part(OptimConfig, flags),
        run=_part(RunOptions, flags),
        flags=tuple(sorted(flags.items())),
    )


def clip_image_resolution(pretrained_clip_name: str, init_model: str | None = None) -> int:
    """The frame size the CLIP weights take, known before the model is built so the loaders need not wait: the
    checkpoint's own when it holds every CLIP weight (the model is then built on them), else the named CLIP's."""
    own = checkpoint_image_resolution(init_model) if init_model is not None else None
    if own is not None:
        return own
    if pretrained_clip_name in TINY_MODELS:
        return TINY_MODELS[pretrained_clip_name]["image_resolution"]
    if pretrained_clip_name in available_models():
        return OPENAI_IMAGE_RESOLUTION
    try:
        return clip_config_from_state_dict(clip_weight_shapes(pretrained_clip_name))["image_resolution"]
    except UsageError:
        raise
    except ValueError as error:  # the reader's and the shape check's own messages name the file
        raise UsageError(f"--pretrained_clip_name {pretrained_clip_name}: {error}") from None


def check_extras(flags: Mapping[str, Any]) -> None:
    """The optional packages the asked-for outputs need, named before anything is loaded."""
    for flag, package in (("eval_report", "matplotlib"), ("tensorboard", "tensorboard")):
        if flags[flag] and importlib.util.find_spec(package) is None:
            raise UsageError(f"--{flag} needs the {package} package: pip install -r requirements-report.txt")


def _need(path: str | None, flag: str, kind: str = "file") -> None:
    ok = path is not None and (os.path.isfile(path) if kind == "file" else os.path.isdir(path))
    if not ok:
        raise UsageError(f"{flag} {path}: no such {kind}")


def check_paths(flags: Mapping[str, Any]) -> None:
    """Every input path exists, so a typo fails in a second, not after the model is built."""
    if flags["pretrained_clip_name"] not in available_models() and not os.path.exists(flags["pretrained_clip_name"]):
        raise UsageError(
            f"--pretrained_clip_name {flags['pretrained_clip_name']}: neither a known name "
            f"({', '.join(available_models())}) nor an existing file or folder"
        )
    if flags["init_model"] is not None and not os.path.isdir(flags["init_model"]):  # a folder: an exported model
        _need(flags["init_model"], "--init_model")
    elif flags["do_eval"] and not flags["do_train"]:
        logger.warning("--do_eval without --init_model evaluates the untrained CLIP4Clip initialisation")
    if flags["resume_model"] is not None:
        _need(flags["resume_model"], "--resume_model")
        if flags["init_model"] is None:
            raise UsageError("--resume_model needs the matching --init_model (pytorch_model.bin.N of the same epoch)")
    if flags["datatype"] == "msrvtt":
        _need(flags["val_csv"], "--val_csv")
        if flags["do_train"]:
            _need(flags["train_csv"], "--train_csv")
            if os.path.isdir(flags["data_path"]):
                raise UsageError(
                    f"--data_path {flags['data_path']}: is a folder; MSR-VTT wants the MSRVTT_data.json file"
                )
            _need(flags["data_path"], "--data_path")
    else:
        _need(flags["data_path"], "--data_path", "folder")
    if flags["datatype"] == "msvd":
        _need_msvd_lists(flags["data_path"], flags["do_train"])
    _need(flags["features_path"], "--features_path", "folder")
    if (
        flags["frame_cache"] is not None
        and os.path.exists(flags["frame_cache"])
        and not os.path.isdir(flags["frame_cache"])
    ):
        raise UsageError(f"--frame_cache {flags['frame_cache']}: exists and is not a folder")
    if os.path.exists(flags["output_dir"]) and not os.path.isdir(flags["output_dir"]):
        raise UsageError(f"--output_dir {flags['output_dir']}: exists and is not a folder")
    _need_writable(flags["output_dir"], "--output_dir")
    if flags["frame_cache"] is not None:
        _need_writable(flags["frame_cache"], "--frame_cache")


def _need_msvd_lists(data_path: str, do_train: bool) -> None:
    """The captions and split lists the MSVD loaders read, named before the model is built."""
    names = ["raw-captions.pkl", "val_list.txt", "test_list.txt"] + (["train_list.txt"] if do_train else [])
    missing = [name for name in names if not os.path.isfile(os.path.join(data_path, name))]
    if missing:
        raise UsageError(
            f"--data_path {data_path}: no {', '.join(missing)} there (an MSVD folder holds raw-captions.pkl and the "
            f"split lists train_list.txt, val_list.txt, test_list.txt)"
        )


def _need_writable(directory: str, flag: str) -> None:
    """Create ``directory`` if needed and write a file there, so a read-only place fails now, not at the first save."""
    probe = util.temporary_path(os.path.join(directory, "write-test"))
    try:
        os.makedirs(directory, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UsageError(f"{flag} {directory}: cannot write there ({error.strerror or error})") from None
