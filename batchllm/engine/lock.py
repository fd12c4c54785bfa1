"""One run at a time per checkpoint: an advisory ``flock`` on ``<journal>/lock``.

The kernel drops a ``flock`` when its process dies, however it dies, so a lock is never left held
by a dead run and is never waited on: a second run fails at once (``LockedError``, exit 75) naming
the live holder. The holder writes its pid and command into the file and empties it on a clean
exit, so finding the file non-empty when taking the lock means the previous run died (SIGKILL,
power loss): that is reported as a take-over warning.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from ..errors import JobError, LockedError

LOCK_NAME = "lock"


class RunLock:
    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_NAME
        self._fd: int | None = None
        self.took_over_from: str | None = None

    def acquire(self, command: str) -> RunLock:
        try:  # the output's folder was checked (folders.py); this is what a race may leave
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise JobError(
                f"{self.path.parent}: cannot write the run's journal here ({exc.strerror})"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise LockedError(
                f"another batchllm run holds {self.path.parent} ({holder or 'pid unknown'}); "
                "try again when it has finished"
            ) from None
        previous = _read(fd)
        if previous:
            self.took_over_from = previous
        os.ftruncate(fd, 0)
        os.pwrite(
            fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: {command}\n".encode(), 0
        )
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def holder(directory: Path) -> str | None:
    """Who holds the lock now (its line), or None when no live run does."""
    path = directory / LOCK_NAME
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(fd) or "a running process"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
