"""The command line's layout: its groups in order, a help text on every flag, the [new] marks, the early checks."""

from __future__ import annotations

import argparse

import pytest

from engine.flags import get_parser, parse_flags
from errors import UsageError

GROUPS = [
    "mode",
    "data",
    "model",
    "optimisation",
    "evaluation",
    "distributed (set by the launcher)",
    "accepted for the original's scripts, no effect",
]
NEW_FLAGS = {
    "frame_cache",
    "skip_missing",
    "precision",
    "grad_checkpointing",
    "compile",
    "tuning",
    "eval_dsl",
    "dsl_temperature",
    "qb_norm",
    "qb_norm_beta",
    "eval_report",
    "tensorboard",
}
REQUIRED = ["--do_train", "--loose_type", "--output_dir", "out"]


def test_groups_in_order_every_flag_with_help_and_the_new_ones_marked():
    parser = get_parser()
    titles = [g.title for g in parser._action_groups if g.title not in ("positional arguments", "options")]
    assert titles == GROUPS
    shown = [a for a in parser._actions if a.help is not argparse.SUPPRESS and a.dest != "help"]
    assert all(a.help for a in shown)
    assert {a.dest for a in shown if a.help.startswith("[new]")} == NEW_FLAGS
    assert len(shown) == 3 + 15 + 12 + 12 + 6 + 4 + 1  # counted group by group in the --help output


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max_frames", "0"], "--max_frames must be >= 1, got 0"),
        (["--feature_framerate", "-2"], "--feature_framerate must be >= 1, got -2"),
        (["--max_words", "0"], "--max_words must be >= 1, got 0"),
    ],
)
def test_a_bad_count_is_one_usage_error(flags, message):
    with pytest.raises(UsageError) as caught:
        parse_flags(REQUIRED + flags)
    assert str(caught.value) == message


def test_the_accumulation_steps_divide_the_batch():
    args = parse_flags(REQUIRED + ["--batch_size", "12", "--gradient_accumulation_steps", "3"])
    assert args.batch_size == 4 and args.max_frames == 100 and args.feature_framerate == 1
