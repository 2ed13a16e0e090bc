"""The two ways a run stops on purpose, and the checks every command line shares; importable without torch, so the
command line answers before it loads."""

from __future__ import annotations


class UsageError(ValueError):
    """A bad flag, path or input file found before the work starts; entry points print it as one line, exit 2."""


class RunError(RuntimeError):
    """The run cannot go on (a non-finite loss, a checkpoint that could not be written): one line, exit 1."""

    def __init__(self, message: str = ""):
        # A DataLoader worker's error comes back as "Caught RunError in DataLoader worker ..." and the worker's
        # traceback, whose last line is the error itself: keep that line, the rest is no use to a user.
        marker = f"{type(self).__name__}: "
        if message.startswith("Caught ") and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


# Tokens CLIP's text tower reads, start and end included: its position table has this many rows.
CLIP_CONTEXT_LENGTH = 77


def check_max_words(max_words: int, flag: str = "--max_words") -> None:
    """A text length CLIP can read: the start and end tokens and at least one word, at most its context."""
    if max_words < 3:
        raise UsageError(f"{flag} must be >= 3 (the start and end tokens and at least one word), got {max_words}")
    if max_words > CLIP_CONTEXT_LENGTH:
        raise UsageError(f"{flag} must be <= {CLIP_CONTEXT_LENGTH} (CLIP's text context, in tokens), got {max_words}")
