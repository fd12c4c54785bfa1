"""The seams of the local engine's dispatcher on a cluster actor (worker.py), each talking to the
coordinator (coordinator.py) instead of a local object:

- ``LeasedLimiter`` (the dispatcher's limiter): departure slots leased for the requests waiting
  in this actor, slept on locally; 429s, ``Retry-After`` and stated limits go to the coordinator,
  so one 429 slows the whole cluster;
- ``LeasedBudget``: each row's worst case reserved against the one budget, settled with its cost;
- ``RowGate``: at most a share of ``--concurrency`` rows begun and not yet durable, so a killed
  actor loses at most those;
- ``BatchLedger`` (the dispatcher's journal): finished rows go to the coordinator's journal in
  small groups as they arrive (every ``FLUSH_EVERY`` s), and all of them before the batch is
  returned, so a killed actor loses at most the replies of its last moments.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from typing import TYPE_CHECKING, Any

from ..engine.budget import grown_margin
from ..engine.stats import StopReason
from ..records import Entry, RateHints
from .coordinator import FREE_FOR

if TYPE_CHECKING:
    from ..engine.dispatch import Dispatcher

FLUSH_EVERY = 0.005  # seconds between groups of replies sent to the journal
LATE = 0.01  # seconds: a slot this late is not used (taking it would bunch departures)
MAX_WAIT_ROUNDS = 10_000  # waits on the coordinator (leases, rows another actor holds): bounded


class LeasedLimiter:
    """The dispatcher's limiter on a cluster: slots leased from the coordinator, FIFO."""

    def __init__(self, coordinator: Any, owner: str) -> None:
        self.coordinator = coordinator
        self.owner = owner
        self._waiters: deque[tuple[asyncio.Future[float], int]] = deque()
        self._leasing: asyncio.Task[None] | None = None
        self._free_until = 0.0
        self._paused_until = 0.0
        self._successes = 0
        self._refunded = 0
        self._stated: int | None = None
        self.stop: tuple[str, str] | None = None
        self.dispatchers: set[Dispatcher] = set()

    async def acquire(self, tokens: int = 0) -> None:
        for _ in range(MAX_WAIT_ROUNDS):
            now = time.monotonic()
            if now < self._paused_until:
                await asyncio.sleep(self._paused_until - now)
                now = time.monotonic()
            if now < self._free_until or self.stop is not None:
                return
            future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
            self._waiters.append((future, tokens))
            if self._leasing is None:
                self._leasing = asyncio.create_task(self._lease())
            at = await future
            delay = at - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if at == 0.0 or time.time() - at <= LATE:
                return
            # Woken too late (a busy loop): leaving now would bunch departures; take a new slot.

    async def _lease(self) -> None:
        try:
            for _ in range(MAX_WAIT_ROUNDS):
                if not self._waiters:
                    return
                batch = [t for _, t in list(self._waiters)[:256]]
                successes, refunded = self._successes, self._refunded
                self._successes = self._refunded = 0
                slots, paced, stop = await self.coordinator.lease.remote(
                    self.owner, batch, successes, refunded
                )
                if stop is not None:
                    self.stopped(stop)
                if not paced or stop is not None:
                    if not paced:
                        self._free_until = time.monotonic() + FREE_FOR
                    while self._waiters:
                        future, _ = self._waiters.popleft()
                        if not future.done():
                            future.set_result(0.0)
                    return
                now = time.time()
                for at in slots:
                    if not self._waiters:
                        break
                    if now - at > LATE:
                        continue  # arrived too late to use: lost capacity, never a burst
                    future, _ = self._waiters.popleft()
                    if not future.done():
                        future.set_result(at)
        finally:
            self._leasing = None

    def stopped(self, stop: tuple[str, str]) -> None:
        self.stop = stop
        for d in self.dispatchers:
            d.request_stop(StopReason(stop[0]), stop[1])

    def on_throttle(self, retry_after: float | None) -> float:
        pause = retry_after if retry_after is not None else 0.25
        self._paused_until = max(self._paused_until, time.monotonic() + pause)
        self._free_until = 0.0
        self.coordinator.throttled.remote(retry_after)
        return pause

    def on_success(self) -> None:
        self._successes += 1

    def refund_tokens(self, reserved: int, used: int) -> None:
        if used < reserved:
            self._refunded += reserved - used

    def on_hints(self, hints: RateHints) -> None:
        if hints.limit_requests and hints.limit_requests != self._stated:
            self._stated = hints.limit_requests
            self.coordinator.hints.remote(hints)


class LeasedBudget:
    """The dispatcher's budget on a cluster: reservations held by the coordinator."""

    def __init__(self, coordinator: Any, owner: str, active: bool) -> None:
        self.coordinator = coordinator
        self.owner = owner
        self._active = active
        self.margin = 0  # budget.Budget's, learned from this actor's own replies

    @property
    def active(self) -> bool:
        return self._active

    def short(self) -> bool:
        """Not asked of the coordinator before each request: its reservations grow by the margin."""
        return False

    async def reserve(self, worst_pico: int) -> bool:
        return await self._reserve(worst_pico, False) is not None

    async def take(self, own_pico: int) -> int | None:
        """The request's worst case and this actor's margin as it stands at each ask."""
        return await self._reserve(own_pico, True)

    async def _reserve(self, pico: int, with_margin: bool) -> int | None:
        for _ in range(MAX_WAIT_ROUNDS):
            worst = pico + self.margin if with_margin else pico
            ok = await self.coordinator.reserve.remote(self.owner, worst)
            if ok is not None:
                return worst if ok else None
        return None

    def settle(self, reserved_pico: int, actual_pico: int, own_pico: int | None = None) -> None:
        if self._active:
            own = reserved_pico if own_pico is None else own_pico
            self.margin = grown_margin(self.margin, own, actual_pico)
            self.coordinator.settle.remote(self.owner, reserved_pico, actual_pico)

    def gave_up(self, worst_pico: int, renews: bool = False) -> bool:
        """The coordinator counts it as spent when its journal hears of it (``Ledger.gave_up``)."""
        return True

    async def renew(self, worst_pico: int) -> bool:
        """The retry keeps its reservation; the coordinator stops the run when what was given
        up on leaves no room (coordinator.py ``gave_up``)."""
        return True


class RowGate:
    """Rows an actor has begun whose entries the journal does not have yet, at most ``size``:
    what a killed actor had paid for and not kept is then at most its concurrency. A row leaves
    when the coordinator has its entry, or at once when it ends without one (a stop)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.open: set[str] = set()
        self.recording: set[str] = set()
        self._room = asyncio.Event()

    async def enter(self, row_id: str, stopped: asyncio.Event) -> None:
        for _ in range(MAX_WAIT_ROUNDS):
            if len(self.open) < self.size or stopped.is_set():
                break
            self._room.clear()
            room = asyncio.ensure_future(self._room.wait())
            stop = asyncio.ensure_future(stopped.wait())
            await asyncio.wait({room, stop}, return_when=asyncio.FIRST_COMPLETED)
            room.cancel()
            stop.cancel()
        self.open.add(row_id)

    def added(self, row_id: str) -> None:
        self.recording.add(row_id)

    def done(self, row_id: str) -> None:
        if row_id not in self.recording:
            self.open.discard(row_id)
            self._room.set()

    def recorded(self, row_ids: list[str]) -> None:
        for row_id in row_ids:
            self.recording.discard(row_id)
            self.open.discard(row_id)
        self._room.set()


class BatchLedger:
    """The dispatcher's journal on a cluster: entries kept for the batch's output and sent to
    the coordinator's journal in groups as they come."""

    def __init__(self, coordinator: Any, owner: str, gate: RowGate) -> None:
        self.coordinator = coordinator
        self.owner = owner
        self.gate = gate
        self.entries: dict[str, Entry] = {}
        self.write_error: BaseException | None = None
        self._unsent: list[Entry] = []
        self._flusher: asyncio.Task[None] | None = None

    def add(self, record: Entry) -> None:
        self.entries[record.row_id] = record
        self.gate.added(record.row_id)
        self._unsent.append(record)
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_soon())

    def add_attempt(self, row_id: str, seq: int, a: Any, confidence: str | None = None) -> None:
        """A labeling row's single requests are not kept apart: a row is redone whole."""

    def sent(self, row_id: str, worst_pico: int, again: bool = False) -> None:
        """Requests in flight are bounded by the lease; nothing to write per request."""

    def gave_up(self, row_id: str, worst_pico: int) -> None:
        """A request this actor stopped waiting for may have been billed: the journal counts it."""
        self.coordinator.gave_up.remote(row_id, worst_pico)

    def unbilled(self, row_id: str) -> None:
        """Nothing written per request (``sent``): nothing to close."""

    def leaving(self, row_id: str) -> None:
        """Rows sent again are redone whole on a cluster: no entry to supersede here."""

    def resumed(self, row_id: str) -> None:
        """Rows are redone whole on a cluster (``add_attempt``): nothing resumes."""

    def flush(self) -> None:
        """Sending happens in ``_flush_soon`` and ``drain``."""

    async def _flush_soon(self) -> None:
        try:
            await asyncio.sleep(FLUSH_EVERY)
        finally:
            self._flusher = None
        await self.drain()

    async def drain(self) -> None:
        """Send what is unsent, and wait until the journal has it."""
        while self._unsent:
            group, self._unsent = self._unsent, []
            counts: Counter[str] = Counter()
            for e in group:
                counts[e.status] += 1
                counts["prompt_tokens"] += e.prompt_tokens or 0
                counts["completion_tokens"] += e.completion_tokens or 0
                counts["cost_pico"] += (e.input_cost_pico or 0) + (e.output_cost_pico or 0)
            await self.coordinator.record.remote(self.owner, group, dict(counts))
            self.gate.recorded([e.row_id for e in group])
