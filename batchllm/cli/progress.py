"""What a run tells the person or the scheduler watching it, on stderr.

Three shapes, chosen once: a tqdm bar when stderr is a terminal; plain progress lines every few
seconds when it is not (cron, CI, a pipe); or with ``--log-format json`` one JSON object per line
(start, progress, warning, error, summary), for log collectors. The reporter only reads the
dispatcher's counters on a timer; nothing here runs per row.

A progress line's rate and time left are the last minute's (``RECENT``), not the run's average:
against an API that takes 20 s a reply, the first round trip answers nothing, and an average
that counts it put the time left at three times the truth a minute in.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TextIO

import orjson
from tqdm import tqdm

from ..engine.counts import plural
from ..pricing import format_usd

RECENT = 60.0  # seconds of progress a line's rate and time left are taken over


class Recent:
    """Rows a second over the last ``RECENT`` seconds, from the (time, rows done) of the lines
    written (one every ``line_interval``: a handful kept); the run's own rate until a line is."""

    def __init__(self, now: float) -> None:
        self._marks: deque[tuple[float, int]] = deque([(now, 0)])

    def rate(self, now: float, done: int) -> float | None:
        marks = self._marks
        marks.append((now, done))
        while len(marks) > 2 and marks[1][0] <= now - RECENT:
            marks.popleft()  # one mark at or before the window's start stays
        then, before = marks[0]
        return (done - before) / (now - then) if now > then else None


class Reporter:
    """Text reporter: a bar on a terminal, else a line every ``line_interval`` seconds."""

    interval = 0.25

    def __init__(
        self,
        mode: str = "auto",
        stream: TextIO | None = None,
        line_interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream or sys.stderr
        tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.mode = ("bar" if tty else "lines") if mode == "auto" else mode
        self.line_interval = line_interval
        self.clock = clock
        self._bar: tqdm | None = None
        self._last_line = 0.0
        self._total = 0
        self._recent = Recent(clock())

    def _write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            self._out(text + "\n")

    def _out(self, text: str) -> None:
        """Write to the stream, unless its reader has gone (``| head``): the run goes on, and
        ends with its own exit code, not a broken pipe's."""
        if self.stream is None:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except (BrokenPipeError, ValueError):  # ValueError: the stream was closed
            self.stream = None  # type: ignore[assignment]

    def start(self, info: dict[str, Any]) -> None:
        self._total = info["todo"]
        done_before = info["done_before"]
        pilot = f"pilot at pack {info['pack']}: " if "pack" in info else ""  # one line per size
        self._write(
            f"batchllm: {pilot}{plural(info['rows'], 'row')} in {info['input']}, {info['todo']:,} to send"
            + (f" ({done_before:,} already done)" if done_before else "")
            + (
                f"; fleet: {info['fleet']}"
                if info.get("fleet")
                else f"; {info['provider']} model {info['model']}"
            )
            + f"; output {info['output']}"
        )
        if self.mode == "bar":
            # A terminal that reports its size as 0x0 (a fresh pty, `script`) would make tqdm
            # hide the bar as if it were below the screen: give it a size then.
            width, height = _terminal_size(self.stream)
            self._bar = tqdm(
                total=self._total,
                file=self.stream,
                unit="row",
                dynamic_ncols=width > 0,
                ncols=None if width > 0 else int(os.environ.get("COLUMNS") or 100),
                nrows=None if height > 0 else 24,
                smoothing=0.1,
            )
        self._last_line = self.clock()
        self._recent = Recent(self._last_line)

    def progress(self, snap: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.n = snap["done"]
            self._bar.set_postfix_str(
                f"tok {snap['tokens']:,} {format_usd(snap['cost_pico'])} err {snap['error']}", refresh=False
            )
            self._bar.refresh()
            return
        if self.mode != "lines":
            return
        now = self.clock()
        if now - self._last_line >= self.line_interval:
            self._last_line = now
            self._write(_progress_line(snap, self._total, self._recent.rate(now, snap["done"])))

    def warning(self, message: str) -> None:
        self._write(f"warning: {message}")

    def error(self, message: str) -> None:
        self._write(f"error: {message}")

    def stopped(self, reason: str, message: str) -> None:
        """A run-level stop; the text summary says it, so only machine logs get an event."""

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def summary(self, summary: dict[str, Any], text: str) -> None:
        self.close()
        self._out(text + "\n")


class JsonReporter(Reporter):
    """``--log-format json``: one object per line on stderr, never a bar, never colour."""

    def __init__(
        self,
        stream: TextIO | None = None,
        line_interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__("none", stream, line_interval, clock)

    def _emit(self, event: str, **fields: Any) -> None:
        record = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": event, **fields}
        self._out(orjson.dumps(record).decode() + "\n")

    def start(self, info: dict[str, Any]) -> None:
        self._total = info["todo"]
        self._last_line = self.clock()
        self._recent = Recent(self._last_line)
        self._emit("start", **info)

    def progress(self, snap: dict[str, Any]) -> None:
        now = self.clock()
        if now - self._last_line >= self.line_interval:
            self._last_line = now
            rate = self._recent.rate(now, snap["done"])
            left = _seconds_left(snap["done"], self._total, rate)
            self._emit(
                "progress",
                total=self._total,
                **_public(snap),
                recent_rows_per_s=None if rate is None else round(rate, 2),
                seconds_left=None if left is None else round(left),
            )

    def warning(self, message: str) -> None:
        self._emit("warning", message=message)

    def error(self, message: str) -> None:
        self._emit("error", message=message)

    def stopped(self, reason: str, message: str) -> None:
        self._emit(
            "error" if reason in ("api", "error_rate", "journal") else "warning",
            reason=reason,
            message=message,
        )

    def summary(self, summary: dict[str, Any], text: str) -> None:
        self._emit("summary", **summary)


def _terminal_size(stream: TextIO) -> tuple[int, int]:
    try:
        size = os.get_terminal_size(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return 0, 0
    return size.columns, size.lines


def _public(snap: dict[str, Any]) -> dict[str, Any]:
    out = dict(snap)
    out["cost_usd"] = format_usd(out.pop("cost_pico")).lstrip("$")
    return out


def _seconds_left(done: int, total: int, rate: float | None) -> float | None:
    return (total - done) / rate if rate and total > done else None


def _progress_line(snap: dict[str, Any], total: int, recent: float | None) -> str:
    """``recent``: the last minute's rows/s (``Recent``); the run's own when None."""
    rate = snap["rows_per_s"] if recent is None else recent
    left = _seconds_left(snap["done"], total, rate)
    return (
        f"progress: {snap['done']:,}/{total:,} rows (ok {snap['ok']:,}, errors {snap['error']:,}), "
        f"{rate:,.1f} rows/s, {snap['tokens']:,} tokens, {format_usd(snap['cost_pico'])}"
        + (f", ~{left:,.0f} s left" if left is not None else "")
    )


def make_reporter(log_format: str, progress: str) -> Reporter:
    return JsonReporter() if log_format == "json" else Reporter(progress)
