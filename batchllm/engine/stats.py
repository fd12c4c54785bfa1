"""What one run counts, and why it stopped: read by the progress display and the summary."""

from __future__ import annotations

import enum
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import APIError, FatalAPIError, RetryableAPIError

if TYPE_CHECKING:
    from .member import Counts

FIRST_ROWS = 5  # rows that all fail alike before a run stops (``FirstFailures``)
# What tells one request's error message from another's when they fail for the same reason: the
# numbers in it (llama.cpp names each request's token count) and request ids (a hex run).
_PARTICULARS = re.compile(r"\b(?=[0-9a-fA-F]*\d)[0-9a-fA-F]{6,}\b|\d+")


def error_shape(message: str) -> str:
    """``message`` with its numbers and ids masked: two rows failing alike share a shape."""
    return _PARTICULARS.sub("N", message)


class StopReason(enum.Enum):
    INTERRUPTED = "interrupted"
    API = "api"
    ERROR_RATE = "error_rate"
    BUDGET = "budget"
    RUNTIME = "runtime"
    JOURNAL = "journal"


@dataclass(slots=True)
class Stats:
    """Counters of this run, read by the progress display; plain ints, updated per row."""

    ok: int = 0
    error: int = 0
    invalid: int = 0  # labeling rows whose answers never validated
    rejected: int = 0  # recorded as errors without a request (over the window, null prompt)
    requests: int = 0
    retries: int = 0
    throttled: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_pico: int = 0
    cached_tokens: int = 0  # prompt tokens served from the server's prompt cache
    cached_saved_pico: int = 0  # what they cost less than at the input price
    started: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> int:
        return self.ok + self.error + self.invalid

    def unsent(self, retry: bool, member: Counts | None = None) -> int:
        """Take back a request counted as it left that never did (no connection): the run's
        counts, and its fleet endpoint's (``member``), are of requests a server received. 1, the
        request taken back."""
        self.requests -= 1
        self.retries -= retry
        if member is not None:
            member.requests -= 1
        return 1


class ErrorWindow:
    """The last ``size`` sent rows, failed or not: too large a share failed stops the run."""

    def __init__(self, size: int, max_rate: float) -> None:
        self.window = [False] * size
        self.pos = self.filled = self.errors = 0
        self.max_errors = max_rate * size

    def add(self, failed: bool) -> bool:
        """Record one row; True when the share of failures is over the limit."""
        if not failed and not self.errors:  # all successes: where the next failure goes is moot
            if self.filled < len(self.window):
                self.filled += 1
            return False
        window, pos = self.window, self.pos
        if self.filled == len(window):
            self.errors -= window[pos]
        else:
            self.filled += 1
        window[pos] = failed
        self.errors += failed
        self.pos = (pos + 1) % len(window)
        return failed and self.filled == len(window) and self.errors > self.max_errors

    def message(self) -> str:
        return (
            f"too many errors: {self.errors} of the last {len(self.window)} rows failed or were invalid "
            "(--max-error-rate); see the error column"
        )


class FirstFailures:
    """The first rows of a run: when each of the first ``FIRST_ROWS`` fails with the same client
    error (a 4xx with one status, code and message, its numbers and ids aside: ``error_shape``),
    the job is wrong, not the rows, and every further request would be paid for nothing. Off
    after the first row that does not."""

    def __init__(self, rows: int = FIRST_ROWS) -> None:
        self.rows = rows
        self.seen = 0
        self.active = True
        self.error: APIError | None = None
        self.varied = False  # the messages differ in their numbers or ids
        self.row_ids: list[str] = []  # the rows that failed so: pending again after the stop
        self.stopped = False

    def add(self, error: APIError | None, row_id: str | None = None) -> bool:
        """Record one finished row (its final error, or None); True when the run should stop."""
        same = (
            isinstance(error, FatalAPIError)
            and error.status is not None
            and 400 <= error.status < 500
            and (
                self.error is None
                or (error.status, error.code, error_shape(error.message))
                == (self.error.status, self.error.code, error_shape(self.error.message))
            )
        )
        if self.stopped:  # in flight at the stop, refused alike: pending too
            if same and row_id is not None:
                self.row_ids.append(row_id)
            return False
        if not same:
            self.active = False
            return False
        assert error is not None
        self.varied = self.varied or (self.error is not None and error.message != self.error.message)
        self.error = self.error or error
        self.seen += 1
        if row_id is not None:
            self.row_ids.append(row_id)
        if self.seen >= self.rows:
            self.active = False
            self.stopped = True
            return True
        return False

    def message(self) -> str:
        assert self.error is not None
        return (
            f"each of the first {self.seen} rows failed with the same error"
            + (" but for its numbers (the first: " if self.varied else " (")
            + f"{self.error.describe()}): "
            "the job, not the rows, looks wrong (model, parameters, endpoint), so nothing more was sent "
            "(the server billed none of it: those rows are pending); fix it, then run the command again"
        )


class Unreached:
    """One endpoint that no request has connected to, or that has answered nothing (a server
    that takes connections and hangs): after ``seconds`` of that the run stops, saying why, as
    every request would only fail the same way (a wrong endpoint, a server down or hung), its
    rows pending for the run after the fix."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.since: float | None = None  # the first failure to connect since one connected
        self.heard_at = time.monotonic()  # the last answer, or the run's start

    def heard(self) -> None:
        """The server answered (a reply, or an error status)."""
        self.since = None
        self.heard_at = time.monotonic()

    def failed(self, exc: RetryableAPIError, last: bool = False) -> str | None:
        """A request failed: the stop message once nothing has connected, or nothing has been
        answered, for ``seconds``; or when a row gives up (``last``) on attempts none of which
        connected: unpaced (--rpm 0), a row's attempts end well before ``seconds``, and every
        row would fail so."""
        if exc.status is not None:  # an answer, if an error one
            self.heard()
            return None
        now = time.monotonic()
        if not exc.unsent:  # connected, and no answer in time (a timeout, a dropped connection)
            self.since = None
            if now - self.heard_at >= self.seconds:
                return (
                    f"the server has answered nothing for {now - self.heard_at:.0f} s ({exc.message}): "
                    "is it up, and --timeout long enough for a reply?"
                )
            return None
        if self.since is None:
            self.since = now
        if now - self.since >= self.seconds:
            return f"{exc.message}, for {now - self.since:.0f} s: is the endpoint right and its server up?"
        if last:
            return f"{exc.message}: a row's every attempt failed so: is the endpoint right and its server up?"
        return None
