"""What the worker pool (dispatch.py) needs of its parts: a limiter, a budget, a ledger and,
on a cluster, a gate. One machine hands it the local ones (ratelimit.py, budget.py, journal.py);
a Ray actor hands it leases of the cluster's (cluster/seams.py).
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from ..records import Entry


class Pacer(Protocol):
    """What the pool needs of a rate limiter: ``ratelimit.RateLimiter`` on one machine, a lease
    of the cluster's limiter on Ray (cluster/seams.py)."""

    async def acquire(self, tokens: int = 0) -> None: ...
    def on_throttle(self, retry_after: float | None) -> float: ...
    def on_success(self) -> None: ...
    def refund_tokens(self, reserved: int, used: int) -> None: ...


class Purse(Protocol):
    """What the pool needs of a budget: ``budget.Budget``, or the cluster's (cluster/seams.py)."""

    @property
    def active(self) -> bool: ...
    async def reserve(self, worst_pico: int) -> bool: ...
    def settle(self, reserved_pico: int, actual_pico: int) -> None: ...


class Gate(Protocol):
    """Holds a new row back while too many rows are begun and not yet durable (cluster/seams.py:
    an actor killed then loses at most that many replies)."""

    async def enter(self, row_id: str, stopped: asyncio.Event) -> None: ...
    def done(self, row_id: str) -> None: ...


class Ledger(Protocol):
    """Where finished rows go: the journal, or a cluster actor's batch (cluster/seams.py)."""

    write_error: BaseException | None

    def add(self, record: Entry) -> None: ...
    def add_attempt(self, row_id: str, seq: int, a: Any) -> None: ...
    def sent(self, row_id: str, worst_pico: int, again: bool = False) -> None: ...
    def leaving(self, row_id: str) -> None: ...
    def resumed(self, row_id: str) -> None: ...
    def flush(self) -> None: ...
