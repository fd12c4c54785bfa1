"""Requests in flight, written down before they leave: what a crash may have been billed for.

A log beside the journal (``inflight.log``): ``S <row_id> <worst_pico>`` is written before a
request goes out, ``D <row_id>`` once its reply (or its row's error) is committed (all of a
commit's at once). Replaying the log after a crash leaves exactly the requests that were sent
without a saved reply, with the most each could cost.

A labeling row sends its requests one after another, and its next request may leave before the
commit of the previous reply: so a row can have two ``S`` open, and a ``D`` closes the oldest.
A request the server answered with an error status (a 5xx, a 429, a rejected key, a model it
lacks), or that never connected, was not billed: it is closed at once (``unbilled``), and a
retry is a new request with its own ``S``. A request the client gave up on (a timeout, a dropped
connection) may have been computed and billed all the same: it is counted in ``maybe_billed`` at
once (``gave_up``), and its retry is a new request with its own ``S``.

The log is a memory-mapped file, so writing a line is a copy into the page cache, not a system
call (one per request was a tenth of batchllm's own cost per row: make bench). The kernel owns
those pages: they reach the file however the process dies, exactly like a ``write``. The file's
blocks are written out (zeros) when it is created, so a full disk fails then, cleanly, and never
later as a SIGBUS on a page of a sparse file. Lines are complete up to the first zero byte; a
line cut short by a kill (no newline yet) is one whose request had not left. When the file fills,
it is rewritten with only what is in flight, so it stays small however long the run; its first
line then says how many requests the lines it dropped had sent (``R <count>``), so the log always
knows how many requests its run sent (a killed run's record in the ledger: ledger/recover.py).
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Any

LOG_NAME = "inflight.log"
# Why requests were counted as maybe billed: the key each count is kept under, in words.
CAUSES = {
    "timeouts": "requests given up on (timeouts)",
    "crash": "requests in flight at a crash",
    "stop": "requests cancelled in flight at a stop",
}
_CAPACITY = 4 << 20


def replay(path: Path) -> dict[str, list[int]]:
    """The requests a log says are in flight: row_id -> their worst-case picodollars, oldest first."""
    return read_log(path)[0]


def read_log(path: Path) -> tuple[dict[str, list[int]], int | None]:
    """The requests a log says are in flight (as ``replay``), and how many its run sent in all;
    None for no log."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}, None
    data = data.split(b"\0", 1)[0]
    out: dict[str, Any] = {}
    sent = 0
    for line in data.split(b"\n")[:-1]:  # the last piece has no newline: not a whole line
        parts = line.split(b"\t")
        if parts[0] == b"S" and len(parts) == 3 and parts[2].isdigit():
            _open(out, parts[1].decode("utf-8", "replace"), int(parts[2]))
            sent += 1
        elif parts[0] == b"D" and len(parts) == 2:
            _close(out, parts[1].decode("utf-8", "replace"))
        elif parts[0] == b"R" and len(parts) == 2 and parts[1].isdigit():
            sent += int(parts[1])
    return {r: _worsts(v) for r, v in out.items()}, sent


def _close(open_: dict[str, Any], row_id: str) -> bool:
    """Close the oldest open request of a row; False when it had none."""
    worsts = open_.pop(row_id, None)
    if worsts is None:
        return False
    if type(worsts) is list:  # a row with two requests open (rare): the next one stays
        open_[row_id] = worsts[1] if len(worsts) == 2 else worsts[1:]
    return True


def _open(open_: dict[str, Any], row_id: str, worst: int) -> None:
    """One more open request; a row's first is a plain int (no list per request)."""
    before = open_.get(row_id)
    if before is None:
        open_[row_id] = worst
    elif type(before) is list:
        before.append(worst)
    else:
        open_[row_id] = [before, worst]


def _worsts(value: int | list[int]) -> list[int]:
    return value if type(value) is list else [value]  # type: ignore[list-item,return-value]


def count(open_: dict[str, Any]) -> tuple[int, int]:
    """(requests, their worst cases summed)."""
    values = [_worsts(v) for v in open_.values()]
    return sum(map(len, values)), sum(map(sum, values))


class InflightLog:
    def __init__(self, directory: Path) -> None:
        self.path = directory / LOG_NAME
        self.pending: dict[str, Any] = {}  # row_id -> worst case, or a list (oldest first)
        self._fd, self._map = _create(self.path, b"", _CAPACITY)
        self._pos = 0

    def sent(self, row_id: str, worst_pico: int, again: bool = False) -> None:
        """A request is leaving; ``again``: a retry of one already written down."""
        if again and row_id in self.pending:
            return
        _open(self.pending, row_id, worst_pico)
        self._write(f"S\t{_clean(row_id)}\t{worst_pico}\n".encode())

    def done(self, row_ids: list[str]) -> None:
        """Rows a commit just saved a reply (or an error) of (one copy for all of them); a row's
        entry and its last attempt, saved together, are one reply."""
        pending = self.pending
        lines = [f"D\t{_clean(r)}\n" for r in row_ids if _close(pending, r)]
        if lines:
            self._write("".join(lines).encode())

    def _write(self, line: bytes) -> None:
        start = self._pos
        end = start + len(line)
        if end > len(self._map):
            # ``pending`` has this line's change already: the rewrite holds it, the line is not
            # written again (an "S" twice would leave a request in flight for good).
            self._rotate(_sent(self._map[:start]) + _sent(line))
            return
        self._map[start:end] = line
        self._pos = end

    def _rotate(self, sent: int) -> None:
        """Rewrite the log with only the requests in flight, after ``sent`` requests in all; if
        that fails (a full disk) the old log is left as it was and the error stops the run."""
        kept = [f"S\t{_clean(r)}\t{w}\n" for r, v in self.pending.items() for w in _worsts(v)]
        content = f"R\t{sent - len(kept)}\n{''.join(kept)}".encode()
        tmp = self.path.with_name(LOG_NAME + ".tmp")
        fd, mapped = _create(tmp, content, max(_CAPACITY, 2 * len(content)))
        os.replace(tmp, self.path)
        self._map.close()
        os.close(self._fd)
        self._fd, self._map, self._pos = fd, mapped, len(content)

    def close(self) -> None:
        """A clean end: what is still in flight was cancelled (the caller keeps its count)."""
        self._map.close()
        os.close(self._fd)
        self.path.unlink(missing_ok=True)


class InflightBook:
    """What a journal knows of requests that may have been billed without a saved reply: mixed
    into ``journal.Journal``, whose ``meta`` keeps the count across runs."""

    directory: Path
    inflight_log: InflightLog | None
    dead_sent: int | None = None  # requests the run that left the log sent in all (``start_inflight``)

    def get_meta(self, key: str) -> Any:
        raise NotImplementedError  # the journal's

    def set_meta(self, key: str, value: Any) -> None:
        raise NotImplementedError

    def inflight(self) -> tuple[int, int]:
        """Requests a dead run left sent without a saved reply: (count, worst-case picodollars)."""
        if self.inflight_log is not None:  # this run's own are in flight, not lost
            return 0, 0
        return count(replay(self.directory / LOG_NAME))

    def maybe_billed(
        self, current: bool = True, add: tuple[int, int] = (0, 0), cause: str = "crash"
    ) -> dict[str, int]:
        """Every crash's unsaved requests so far (taken in by ``start_inflight``), with
        ``current`` those of a run that died and no run has taken in yet, and ``add`` (counted
        under ``cause``, a key of ``CAUSES``, as the others are under theirs)."""
        kept = self.get_meta("maybe_billed") or {"requests": 0, "worst_pico": 0}
        now, worst = self.inflight() if current else (0, 0)
        out = {
            **kept,
            "requests": kept["requests"] + now + add[0],
            "worst_pico": kept["worst_pico"] + worst + add[1],
        }
        for key, n in (("crash", now), (cause, add[0])):
            if n:
                out[key] = out.get(key, 0) + n
        return out

    def gave_up(self, row_id: str, worst_pico: int) -> None:
        """A request the client stopped waiting for (a timeout, a dropped connection): the server
        may have computed and billed it all the same, so it leaves the log for ``maybe_billed``,
        kept before the log says it is done (a crash between the two counts it twice, never not)."""
        self.set_meta("maybe_billed", self.maybe_billed(current=False, add=(1, worst_pico), cause="timeouts"))
        if self.inflight_log is not None:
            self.inflight_log.done([row_id])

    def unbilled(self, row_id: str) -> None:
        """A request the server refused (an error status) or never got (a refused connection): not
        billed, so it leaves the log uncounted, whatever ends its row after."""
        if self.inflight_log is not None:
            self.inflight_log.done([row_id])

    def start_inflight(self) -> tuple[int, int]:
        """At the start of a run: what a dead run left in flight goes into ``maybe_billed``, and a
        fresh log is opened for this run's requests. Returns the dead run's (count, worst)."""
        lost, worst = 0, 0
        if self.inflight_log is None:  # this run's own are in flight, not lost
            left, self.dead_sent = read_log(self.directory / LOG_NAME)
            lost, worst = count(left)
        if lost:
            self.set_meta("maybe_billed", self.maybe_billed(current=False, add=(lost, worst)))
        self.inflight_log = InflightLog(self.directory)
        return lost, worst

    def stop_inflight(self) -> None:
        """At the end of a run: requests cancelled in flight (a stop) may have been billed too."""
        log, self.inflight_log = self.inflight_log, None
        if log is None:
            return
        if log.pending:
            lost = count(log.pending)
            self.set_meta("maybe_billed", self.maybe_billed(current=False, add=lost, cause="stop"))
        log.close()


def causes(lost: dict[str, int]) -> str:
    """What the requests counted as maybe billed were, in words (a journal from before the
    causes were kept says none)."""
    said = [text for key, text in CAUSES.items() if lost.get(key)]
    return " and ".join(said) if said else "requests without a saved reply"


def _create(path: Path, content: bytes, capacity: int) -> tuple[int, mmap.mmap]:
    """A new log file holding ``content``, its ``capacity`` bytes written out, and its map."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        data = memoryview(content)
        while data:
            data = data[os.write(fd, data) :]
        zeros = bytes(1 << 20)
        left = capacity - len(content)
        while left > 0:
            left -= os.write(fd, zeros[: min(left, len(zeros))])
        return fd, mmap.mmap(fd, capacity)
    except BaseException:
        os.close(fd)
        raise


def _sent(lines: bytes) -> int:
    """The requests whole lines of a log say were sent: a line starts the log or follows a
    newline (a row id has none, nor a tab), and an "R" line can only be the first."""
    sent = lines.count(b"\nS\t") + lines.startswith(b"S\t")
    if lines.startswith(b"R\t"):
        sent += int(lines[2 : lines.index(b"\n")])
    return sent


def _clean(row_id: str) -> str:
    return row_id.replace("\t", " ").replace("\n", " ")
