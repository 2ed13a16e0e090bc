"""The two ways a run stops on purpose, importable without torch so the command line answers before it loads."""

from __future__ import annotations


class UsageError(ValueError):
    """A bad flag, path or input file found before the work starts; entry points print it as one line, exit 2."""


class RunError(RuntimeError):
    """The run cannot go on (a non-finite loss, a checkpoint that could not be written): one line, exit 1."""
