"""The worker pool: N workers over one client, pulling work, pacing, retrying, journaling.

Work is pulled, not pushed: every worker takes the next ``WorkItem`` from one shared synchronous
iterator (the plan, plan.py, which reads the input a batch at a time and skips what the journal
already has). Tasks on one event loop never run it concurrently, so no queue is needed, and memory
holds one input batch however long the input is.

Per row: reserve its worst-case cost (``--max-cost``), wait for the rate limiter, send; on a
retryable failure back off and try again (429s pause the whole pool through the limiter and do not
count against ``--max-attempts``); on success or a final failure, record the row in the journal.
Nothing raised by one row escapes its worker: a row ends ``ok``, ``error`` (recorded), or, when
the run stops first, pending (not recorded, sent again by the next run).

A stop (signal, budget, ``--max-runtime``, bad key or quota, too many errors) stops new requests at
once; requests in flight get ``--grace`` seconds to finish and be recorded, then are cancelled.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from ..errors import APIError, FatalAPIError, RequestTimeout, RetryableAPIError, RunStopError
from ..labeling.spec import Labeling
from ..pricing import Model
from ..providers import Provider
from ..records import Completion, Entry
from .booking import Booking
from .budget import Budget
from .client import Client
from .concurrency import ConcurrencyLimit
from .journal import Journal
from .plan import Pack, WorkItem
from .ratelimit import Backoff, RateLimiter
from .refusable import Refusable
from .reuse import Reuse
from .router import GIVE_UP_S, Router
from .seams import Gate, Ledger, Pacer, Purse
from .stats import ErrorWindow, FirstFailures, Stats, StopReason, Unreached
from .warmup import Warmup

YOUNG_GC_THRESHOLD = 10_000  # net allocations between young-generation collections, during a run

__all__ = ["Dispatcher", "Stats", "StopReason"]


class Dispatcher(Booking):
    def __init__(
        self,
        *,
        client: Client,
        provider: Provider,
        journal: Journal | Ledger,
        model: Model,
        max_tokens: int,
        concurrency: int,
        limiter: RateLimiter | Pacer,
        backoff: Backoff,
        budget: Budget | Purse,
        max_error_rate: float,
        error_window: int,
        labeling: Labeling | None = None,
        label: Callable[[Dispatcher, Any], Awaitable[None]] | None = None,
        reuse: Reuse | None = None,
        tpm_enabled: bool = False,
        grace: float = 10.0,
        sleep: Callable[[float], Any] = asyncio.sleep,
        gate: Gate | None = None,
        warmup: Warmup | None = None,
        window: ConcurrencyLimit | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.client = client
        self.provider = provider
        self.journal = journal
        self.model = model
        self.max_tokens = max_tokens
        self.concurrency = concurrency
        self.limiter = limiter
        self.backoff = backoff
        self.budget = budget
        self.grace = grace
        self.tpm_enabled = tpm_enabled
        self.labeling = labeling
        # A labeling row's requests (labeled.py ``label_row``), or rows packed several to a
        # request (packed.py): handed in by the caller, as they build on this pool.
        self.label = label
        self.reuse = reuse
        self._sleep = sleep
        self.gate = gate
        self.warmup = warmup  # rows sharing a cacheable prefix wait for its first (warmup.py)
        self.window = window  # how many workers may have a request on the wire (concurrency.py)
        self.router: Router | None = None  # a fleet's endpoints (router.py), else one client
        self.refusable: Refusable | None = None  # optional fields a server may refuse (refusable.py)
        self._prices = model.prices
        self.warn = warn or (lambda message: None)  # no one to tell (tests, a cluster worker)
        self.served: set[str] = set()
        self.stats = Stats()
        self.stop_reason: StopReason | None = None
        self.stop_message: str | None = None
        self.failure: BaseException | None = None
        self.stop_error: RunStopError | None = None
        self._stopped = asyncio.Event()
        self.errors = ErrorWindow(error_window, max_error_rate)
        self.first = FirstFailures()
        self._items: Iterator[WorkItem | Pack] = iter(())
        # Requests awaiting a reply. A stop ends the workers that have none on the wire (waiting
        # for a slot, the budget or a backoff) once this is zero: ``_drained`` says so.
        self._on_wire = 0
        self.most_on_wire = 0  # the most requests on the wire at once (the summary's "in flight")
        self._drained = asyncio.Event()
        # One endpoint no request connects to stops the run (a fleet's are the router's).
        self.unreached = Unreached(GIVE_UP_S)

    # -- stopping ----------------------------------------------------------------------------

    def request_stop(self, reason: StopReason, message: str) -> None:
        """Stop sending; the first reason given is the one reported."""
        if self.stop_reason is None:
            self.stop_reason = reason
            self.stop_message = message
        self._stopped.set()

    @property
    def stopping(self) -> bool:
        return self.stop_reason is not None

    # -- the pool ----------------------------------------------------------------------------

    async def run(
        self, items: Iterator[WorkItem] | Iterator[Pack], hard_stop: asyncio.Event | None = None
    ) -> None:
        """Process ``items`` until they run out or a stop; returns when every worker is done."""
        self._items = items
        if self.router is not None:
            router = self.router
            router.on_down = lambda: self.request_stop(StopReason.API, router.none_left())
        # What is alive as the pool starts (modules, pandas and pyarrow, the job) is set aside
        # from the cyclic GC for the run: its full collections otherwise walk all of it again
        # every few thousand rows, about a tenth of batchllm's own cost per row (make bench).
        # And the young generation is collected every 10,000 net allocations, not 700: at 700 it
        # ran every ~70 rows, walking every request in flight, 12-16% of the client's CPU at zero
        # latency (gc.callbacks); reference counting frees what a row makes as it is done.
        thresholds = gc.get_threshold()
        gc.freeze()
        gc.set_threshold(YOUNG_GC_THRESHOLD, *thresholds[1:])
        workers = [asyncio.create_task(self._worker()) for _ in range(self.concurrency)]
        all_done = asyncio.ensure_future(asyncio.gather(*workers, return_exceptions=True))
        stopped: asyncio.Future[Any] = asyncio.create_task(self._stopped.wait())
        try:
            await asyncio.wait({all_done, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not all_done.done():
                # Stopping: a worker with no request on the wire (waiting for a slot, the budget,
                # or a retry's backoff) ends now; requests in flight get the grace period, or
                # less on a second signal. With nothing in flight, the run ends at once.
                if self._on_wire == 0:
                    for w in workers:
                        w.cancel()
                drained = asyncio.create_task(self._drained.wait())
                waits: set[asyncio.Future[Any]] = {all_done, drained}
                hard = asyncio.create_task(hard_stop.wait()) if hard_stop is not None else None
                if hard is not None:
                    waits.add(hard)
                await asyncio.wait(waits, timeout=self.grace, return_when=asyncio.FIRST_COMPLETED)
                drained.cancel()
                if hard is not None:
                    hard.cancel()
                for w in workers:
                    w.cancel()
                await all_done
        finally:
            stopped.cancel()
            for w in workers:
                w.cancel()
            self.journal.flush()
            self.forget_first_failures()
            gc.set_threshold(*thresholds)
            gc.unfreeze()
        if self.failure is not None:
            raise self.failure

    async def _worker(self) -> None:
        while not self.stopping:
            if self.journal.write_error is not None:
                # Replies can no longer be made durable: stop paying for more.
                self.request_stop(StopReason.JOURNAL, f"cannot write the journal: {self.journal.write_error}")
                return
            try:
                item = next(self._items, None)
            except BaseException as exc:  # noqa: BLE001 - bad input found mid-run stops the run
                self.failure = exc
                self.request_stop(StopReason.API, str(exc))
                return
            if item is None:
                return
            if self.gate is not None:
                await self.gate.enter(item.row_id, self._stopped)
            if self.warmup is not None:
                await self.warmup.enter(item, self._stopped)
            try:
                await self._one(item)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a bug must not lose the other rows
                self.failure = exc
                self.request_stop(StopReason.API, f"internal error: {exc!r}")
                return
            finally:
                if self.reuse is not None:
                    self.reuse.abandoned(item.key)  # ended without a reply: its followers stay pending
                if self.gate is not None:
                    self.gate.done(item.row_id)
                if self.warmup is not None:
                    self.warmup.done(item)

    def record(self, item: WorkItem, entry: Entry) -> None:
        """Journal a row's entry; rows waiting for the same request get its reply."""
        self.journal.add(entry)
        if self.reuse is not None and item.key:
            self.reuse.finished(item.key, entry)

    async def _one(self, item: WorkItem | Pack) -> None:
        if self.label is not None:
            await self.label(self, item)
            return
        assert isinstance(item, WorkItem)
        budget = self.budget
        reserved = 0
        worst = item.worst_pico
        if budget.active:
            taken = await budget.take(worst)  # with the margin as it stands once there is room
            if taken is None:
                self.request_stop(StopReason.BUDGET, "budget reached")
                return
            reserved = worst = taken
        billed = 0  # picodollars
        try:
            # Until it succeeds or fails for good; None when the run stopped first.
            tokens = (
                item.prompt_tokens + (item.request.max_tokens or self.max_tokens) if self.tpm_enabled else 0
            )
            result, attempts, latency_ms = await self.call(item.body, tokens, item.row_id, worst)
            if isinstance(result, Completion):
                billed = self._record_ok(item, result, attempts, latency_ms, tokens)
            elif result is not None:
                self._record_error(item, result, attempts)
        finally:
            if reserved or not budget.active:
                budget.settle(reserved, billed, item.worst_pico)

    async def call(
        self, body: bytes, tokens: int, row_id: str, worst_pico: int
    ) -> tuple[Completion | APIError | None, int, float]:
        """One request until it succeeds or fails for good: (completion or final error, attempts,
        latency of the last attempt in ms). None when the run stops first (the row stays pending).

        Each attempt is written down as sent before it leaves: what a crash may have been billed
        for is then known (inflight.py).
        """
        stats, limiter, backoff, router = self.stats, self.limiter, self.backoff, self.router
        window = self.window
        worst = worst_pico  # its prompt (counted, or a bound) and max_tokens at the prices
        refusable = self.refusable
        attempt = failures = 0
        # Given up on (a timeout): its retry reserves anew. Retrying: the next send is a retry.
        renew = retrying = False
        first = time.monotonic()
        while True:
            if self.stopping:
                return None, attempt, 0.0
            # A place on the wire before the pace: the limiter's departures are then the wire's,
            # never a burst of requests that were paced while waiting for a place.
            if window is not None and not window.try_take():
                await window.take()
            try:
                member = None if router is None else await router.acquire(tokens)
                if router is None:
                    await limiter.acquire(tokens)
            except BaseException:
                if window is not None:
                    window.release(None)
                raise
            if self.stopping or (self.budget.margin and self.budget.short()):
                if window is not None:
                    window.release(None)
                if member is not None:
                    router.release(member)  # type: ignore[union-attr]
                if not self.stopping:  # replies cost more than reserved: the cap is short
                    self.request_stop(StopReason.BUDGET, "budget reached")
                return None, attempt, 0.0
            if refusable is not None and not refusable.on:  # refused since, maybe as this one waited
                body = refusable.plain(body)
            self.journal.sent(row_id, worst)  # written down before it leaves (inflight.py)
            attempt += 1
            stats.requests += 1
            was_retry, retrying = retrying, False
            stats.retries += was_retry
            t0 = time.perf_counter()
            self._on_wire += 1
            if self._on_wire > self.most_on_wire:
                self.most_on_wire = self._on_wire
            trip: float | None = None  # seconds, when the server answered in time
            timed_out = False
            try:
                try:
                    if member is None:
                        completion = await self.client.complete(body)
                        self.unreached.heard()
                    else:
                        member.counts.requests += 1
                        completion = await member.complete(body)
                    trip = time.perf_counter() - t0
                except RequestTimeout:
                    timed_out = True
                    raise
                except FatalAPIError as exc:  # a field the job insists on, refused: a stop (refusable.py)
                    raise exc if (by := member or refusable) is None else by.insisted(exc) from None
                finally:
                    if window is not None:
                        window.release(trip, timed_out=timed_out)
                    self._on_wire -= 1
                    if not self._on_wire and self.stop_reason is not None:
                        self._drained.set()
                    if member is not None:
                        router.release(member)  # type: ignore[union-attr]
            except RetryableAPIError as exc:
                # An answer (an error status), or no connection at all: not billed. Given up on
                # (a timeout, a dropped connection), the server may have computed and billed it
                # all the same. Either way the same request may go again, as a new one.
                if exc.status is not None or exc.unsent:
                    self.journal.unbilled(row_id)
                    if exc.unsent:  # no connection, so no request: counted as none
                        attempt -= stats.unsent(was_retry, member.counts if member is not None else None)
                else:
                    self.journal.gave_up(row_id, worst)
                    renew = True
                    if not self.budget.gave_up(worst, renews=True):
                        self.request_stop(StopReason.BUDGET, "budget reached")
                elapsed = time.monotonic() - first
                if exc.throttled:
                    stats.throttled += 1
                    if member is None:
                        limiter.on_throttle(exc.retry_after)
                    else:
                        router.throttled(member, exc.retry_after)  # type: ignore[union-attr]
                    delay, give_up = 0.0, elapsed > backoff.max_total
                else:
                    if member is not None and not router.failed(member, exc):  # type: ignore[union-attr]
                        self.request_stop(StopReason.API, router.none_left())  # type: ignore[union-attr]
                        return None, attempt, 0.0  # the endpoints' fault, not the row's: pending
                    failures += 1
                    delay = backoff.delay(failures, exc.retry_after)
                    give_up = backoff.gives_up(failures, elapsed, delay)
                if member is None and (why := self.unreached.failed(exc, last=give_up)) is not None:
                    self.request_stop(StopReason.API, why)
                    return None, attempt, 0.0  # the endpoint's fault, not the row's: pending
                if give_up:
                    return exc, attempt, 0.0
                if self.stopping:
                    return None, attempt, 0.0
                retrying = True  # counted as it leaves: a stop or the cap may keep it
                if delay > 0:
                    await self._sleep(delay)
                if renew and not await self.budget.renew(worst):  # no room even alone
                    self.request_stop(StopReason.BUDGET, "budget reached")
                    return None, attempt, 0.0
                continue
            except RunStopError as exc:
                self.journal.unbilled(row_id)  # refused (a key, a quota, a model): not billed
                if member is not None:
                    if router.lose(member, exc):  # type: ignore[union-attr]
                        continue  # this endpoint is out: the row goes to another
                    self.request_stop(StopReason.API, router.none_left())  # type: ignore[union-attr]
                    return None, attempt, 0.0
                # Not the row's fault: leave it pending for the run that follows the fix.
                self.stop_error = exc
                self.request_stop(StopReason.API, exc.describe())
                return None, attempt, 0.0
            except FatalAPIError as exc:
                self.unreached.heard()
                if member is not None:
                    router.heard(member)  # type: ignore[union-attr]
                    if member.refused(exc, body):  # off for that endpoint alone (member.py)
                        self.journal.unbilled(row_id)  # refused, so not billed: sent again
                        continue
                elif refusable is not None and (plain := refusable.refused(exc, body)) is not None:
                    self.journal.unbilled(row_id)  # refused, so not billed: sent again without it
                    body = plain
                    continue
                return exc, attempt, 0.0
            latency_ms = (trip or 0.0) * 1000.0
            if member is not None:
                router.answered(member, latency_ms)  # type: ignore[union-attr]
            served = completion.model
            if served is not None and served not in self.served:
                self.note_served(served, completion)
            return completion, attempt, latency_ms
