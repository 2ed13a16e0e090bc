"""One run per output folder: a lock file held for the run's life, so two runs never write into each other's files."""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from errors import UsageError

LOCK_NAME = ".run.lock"


def _holder(fd: int) -> str:
    return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()


def _open_locked(path: str, output_dir: str) -> int:
    """An open descriptor of ``path`` under an exclusive lock, or a UsageError naming the run that holds it.

    The lock is the kernel's (``flock``): it goes with the process, however the process ends, so a killed run leaves
    a file but never a held lock. A file removed by its releasing owner between our open and our lock is opened again.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd) or "a process"
            os.close(fd)
            raise UsageError(
                f"--output_dir {output_dir}: another run ({holder}) is writing there; wait for it to end or give "
                f"another --output_dir"
            ) from None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextmanager
def run_lock(output_dir: str) -> Iterator[str | None]:
    """Hold ``<output_dir>/.run.lock`` for the block; yields the holder of a stale lock taken over (its process gone,
    a run killed), or None. The file records this run's process and host, and is removed when the block ends."""
    path = os.path.join(output_dir, LOCK_NAME)
    fd = _open_locked(path, output_dir)
    try:
        stale = _holder(fd) or None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield stale
    finally:
        # Removed while still locked: a run that opens the old file after this finds it gone and opens a new one.
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(fd)
