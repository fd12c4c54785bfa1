"""Requests in flight, written down before they leave: what a crash may have been billed for.

An append-only log beside the journal (``inflight.log``): ``S <row_id> <worst_pico>`` is written
(one ``os.write``, no commit to wait for) before a request goes out, ``D <row_id>`` once its row's
reply or error is committed (all of a commit's in one write). The kernel keeps what was written when the process dies, however it
dies, so replaying the log after a crash leaves exactly the requests that were sent without a
saved reply, with the most each could cost. The log is rewritten with only what is in flight
whenever it grows past a few megabytes, so it stays small however long the run.
"""

from __future__ import annotations

import os
from pathlib import Path

LOG_NAME = "inflight.log"
_ROTATE_BYTES = 4 << 20


def replay(path: Path) -> dict[str, int]:
    """The requests a log says are in flight: row_id -> worst-case picodollars."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    out: dict[str, int] = {}
    for line in data.split(b"\n"):
        parts = line.split(b"\t")
        if parts[0] == b"S" and len(parts) == 3:
            out[parts[1].decode("utf-8", "replace")] = int(parts[2])
        elif parts[0] == b"D" and len(parts) == 2:
            out.pop(parts[1].decode("utf-8", "replace"), None)
    return out


class InflightLog:
    def __init__(self, directory: Path) -> None:
        self.path = directory / LOG_NAME
        self.pending: dict[str, int] = {}
        self._written = 0
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)

    def sent(self, row_id: str, worst_pico: int) -> None:
        self.pending[row_id] = worst_pico
        self._write(f"S\t{_clean(row_id)}\t{worst_pico}\n".encode())

    def done(self, row_ids: list[str]) -> None:
        """Rows whose replies were just committed (one write for all of them)."""
        lines = [f"D\t{_clean(r)}\n" for r in row_ids if self.pending.pop(r, None) is not None]
        if lines:
            self._write("".join(lines).encode())

    def _write(self, line: bytes) -> None:
        os.write(self._fd, line)
        self._written += len(line)
        if self._written > _ROTATE_BYTES:
            self._rotate()

    def _rotate(self) -> None:
        tmp = self.path.with_name(LOG_NAME + ".tmp")
        tmp.write_bytes(b"".join(f"S\t{_clean(r)}\t{w}\n".encode() for r, w in self.pending.items()))
        os.replace(tmp, self.path)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._written = 0

    def close(self) -> None:
        """A clean end: what is still in flight was cancelled (the caller keeps its count)."""
        os.close(self._fd)
        self.path.unlink(missing_ok=True)


def _clean(row_id: str) -> str:
    return row_id.replace("\t", " ").replace("\n", " ")
