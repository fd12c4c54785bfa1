"""The Ray Data UDF: one batch of rows in, the same rows with the output columns out.

``Completer`` is an async callable class run by ``map_batches`` on an actor pool; Ray gives each
actor one event loop, on which the actor keeps one ``Client`` (one aiohttp session) for all its
batches. A batch goes through the local engine's own code: ``PromptBuilder`` and ``Admission``
(plan.py) make the requests and refuse what cannot fit, and a ``Dispatcher`` (dispatch.py) sends
them with its retries, backoff, labeling re-asks and error rows. Only three seams differ, each
talking to the coordinator (coordinator.py) instead of a local object:

- ``LeasedLimiter`` (the dispatcher's limiter): departure slots leased for the requests waiting
  in this actor, slept on locally; 429s, ``Retry-After`` and stated limits go to the coordinator,
  so one 429 slows the whole cluster;
- ``LeasedBudget``: each row's worst case reserved against the one budget, settled with its cost;
- ``BatchLedger`` (the dispatcher's journal): finished rows go to the coordinator's journal in
  small groups as they arrive (every ``FLUSH_EVERY`` s), and all of them before the batch is
  returned, so a killed actor loses at most the replies of its last moments.

A row that fails is an error row; nothing a row does fails the batch (which would fail the job).
Without ``--id-column`` a row's id is the hash of its prompt: identical prompts are one row,
sent once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
import uuid
from collections import Counter, deque
from typing import Any

import pyarrow as pa

from ..access import key_source
from ..engine.client import Client
from ..engine.dispatch import Dispatcher
from ..engine.output import RESULT_FIELDS, Totals, _result_columns, label_columns
from ..engine.plan import Admission, WorkItem, check_model
from ..engine.ratelimit import Backoff
from ..engine.stats import StopReason
from ..job import Job
from ..pricing import cost
from ..prompts import PromptBatch, PromptBuilder, RequestMaker
from ..providers import get_provider
from ..records import Entry, Message, RateHints
from .coordinator import FREE_FOR

FLUSH_EVERY = 0.005  # seconds between groups of replies sent to the journal
HEARTBEAT = 1.0  # seconds between "still alive" calls while the actor holds claims or budget
LATE = 0.01  # seconds: a slot this late is not used (taking it would bunch departures)
MAX_WAIT_ROUNDS = 10_000  # waiting for rows another actor holds: bounded (x 2 s each)


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

    @property
    def active(self) -> bool:
        return self._active

    async def reserve(self, worst_pico: int) -> bool:
        for _ in range(MAX_WAIT_ROUNDS):
            ok = await self.coordinator.reserve.remote(self.owner, worst_pico)
            if ok is not None:
                return bool(ok)
        return False

    def settle(self, reserved_pico: int, actual_pico: int) -> None:
        if self._active:
            self.coordinator.settle.remote(self.owner, reserved_pico, actual_pico)


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

    def add_attempt(self, row_id: str, seq: int, a: Any) -> None:
        """A labeling row's single requests are not kept apart: a row is redone whole."""

    def sent(self, row_id: str, worst_pico: int, again: bool = False) -> None:
        """Requests in flight are bounded by the lease; nothing to write per request."""

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


class Completer:
    """``map_batches`` UDF: a pyarrow batch of input rows -> the rows with the output columns."""

    def __init__(
        self,
        job: Job,
        url: str,
        key: str | None,
        coordinator: Any,
        columns: list[str],
        examples: tuple[Message, ...],
        concurrency: int,
    ) -> None:
        self.job = job
        self.url = url
        self.key = key
        self.coordinator = coordinator
        self.provider = get_provider(job.provider)
        self.model = check_model(job, self.provider)
        self.builder = PromptBuilder(job, columns, str(job.input))
        self.maker = RequestMaker(job, examples)
        self.admission = Admission(
            job,
            self.provider,
            self.model,
            self.maker.prefix,
            count_all=job.budgeted or job.tpm is not None,
        )
        self.concurrency = concurrency
        self.owner = uuid.uuid4().hex[:12]
        self.limiter = LeasedLimiter(coordinator, self.owner)
        self.budget = LeasedBudget(coordinator, self.owner, job.budgeted)
        self.gate = RowGate(concurrency)
        self.client: Client | None = None
        self.busy = 0
        self.calls = 0
        self.claimants: set[str] = set()
        self._heart: asyncio.Task[None] | None = None
        self.schema: pa.Schema | None = None

    async def __call__(self, batch: pa.Table) -> pa.Table:
        if self.client is None:
            self.client = Client(
                self.provider,
                self.url,
                self.key,
                concurrency=self.concurrency,
                timeout=self.job.timeout,
                on_hints=self.limiter.on_hints,
            )
            await self.client.__aenter__()
        self.busy += 1
        if self._heart is None:
            self._heart = asyncio.create_task(self._heartbeat())
        try:
            return await self._complete(batch)
        finally:
            self.busy -= 1

    async def _heartbeat(self) -> None:
        """Tell the coordinator this actor lives, while it has batches (its claims and budget)."""
        try:
            while self.busy:
                self.coordinator.hello.remote(self.owner, *self.claimants)
                await asyncio.sleep(HEARTBEAT)
        finally:
            self._heart = None

    async def _complete(self, table: pa.Table) -> pa.Table:
        job = self.job
        records = table.select(self.builder.read_columns).combine_chunks().to_batches()
        pb = self.builder.build(records[0], 0) if records else None
        row_ids: list[str] = []
        if pb is not None:
            if job.id_column is None:  # a position would not be stable here: the prompt's hash
                pb = dataclasses.replace(pb, row_ids=[f"p-{h}" for h in pb.hashes])
            row_ids = pb.row_ids
        # Claims are per batch: two batches of one actor must not send the same row either.
        self.calls += 1
        claimant = f"{self.owner}/{self.calls}"
        self.claimants.add(claimant)
        try:
            return await self._complete_as(claimant, table, pb, row_ids)
        finally:
            self.claimants.discard(claimant)

    async def _complete_as(
        self, claimant: str, table: pa.Table, pb: PromptBatch | None, row_ids: list[str]
    ) -> pa.Table:
        ledger = BatchLedger(self.coordinator, claimant, self.gate)
        entries: dict[str, Entry] = {}
        shown_elsewhere: set[str] = set()
        first: dict[str, int] = {}
        for i, row_id in enumerate(row_ids):
            first.setdefault(row_id, i)
        if first and self.limiter.stop is None:
            done, waiting, copies, stop = await self.coordinator.lookup.remote(claimant, list(first))
            entries.update(done)
            shown_elsewhere.update(copies)
            if stop is not None:
                self.limiter.stopped(stop)
            mine = (
                []
                if stop is not None
                else [i for r, i in first.items() if r not in done and r not in waiting]
            )
            await self._send(pb, mine, ledger)
            for _ in range(MAX_WAIT_ROUNDS):
                if not waiting or self.limiter.stop is not None:
                    break
                done, claimed, waiting, copies = await self.coordinator.wait.remote(claimant, waiting)
                entries.update(done)
                shown_elsewhere.update(copies)
                await self._send(pb, [first[r] for r in claimed], ledger)
            unsent = [r for r in first if r not in entries and r not in ledger.entries]
            if unsent:
                self.coordinator.release.remote(claimant, unsent)
        entries.update(ledger.entries)
        if first:
            await self.coordinator.finished.remote(claimant)
        return self._output(table, row_ids, entries, shown_elsewhere)

    async def _send(self, pb: PromptBatch | None, send: list[int], ledger: BatchLedger) -> None:
        if not send or pb is None:
            return
        job = self.job
        assert self.client is not None
        d = Dispatcher(
            client=self.client,
            provider=self.provider,
            journal=ledger,
            model=self.model,
            max_tokens=job.max_tokens,
            concurrency=min(self.concurrency, len(send)),
            limiter=self.limiter,
            backoff=Backoff(job.max_attempts),
            budget=self.budget,
            max_error_rate=job.max_error_rate,
            error_window=job.error_window,
            labeling=job.labeling,
            tpm_enabled=job.tpm is not None,
            grace=job.grace,
            gate=self.gate,
        )
        row_ids = pb.row_ids
        ready = self.admission.admit(pb, send, self.maker, d.record_rejected, job.budgeted, lambda m: None)
        encode = self.provider.encode
        items = [
            WorkItem(row_ids[i], pb.hashes[i], request, encode(request), tokens, worst)
            for i, request, tokens, worst in ready
        ]
        self.limiter.dispatchers.add(d)
        try:
            await d.run(iter(items))
        finally:
            self.limiter.dispatchers.discard(d)
            await ledger.drain()
            self.gate.recorded([row_ids[i] for i in send])  # none may stay held past its batch
            stats = d.stats
            counts = {"requests": stats.requests, "retries": stats.retries, "rejected": stats.rejected}
            self.coordinator.record.remote(ledger.owner, [], counts)
        if d.stop_reason is not None and self.limiter.stop is None:
            # This actor's own stop (a bad key, too many errors): the whole run stops, and this
            # actor's other batch at once.
            message = d.stop_message or d.stop_reason.value
            if d.stop_error is not None:
                message = self.provider.advice(d.stop_error, key_source(job))
            self.limiter.stopped((d.stop_reason.value, message))
            self.coordinator.stop.remote(d.stop_reason.value, message)

    def _output(
        self, table: pa.Table, row_ids: list[str], entries: dict[str, Entry], shown_elsewhere: set[str]
    ) -> pa.Table:
        labeling = self.job.labeling
        if self.job.id_column is None:
            entries = self._copies(row_ids, entries, shown_elsewhere)
            row_ids = [f"{r}#{i}" if f"{r}#{i}" in entries else r for i, r in enumerate(row_ids)]
        results = _result_columns(row_ids, entries, Totals())
        names = [f.name for f in RESULT_FIELDS]
        if labeling is not None:
            results += label_columns(row_ids, entries, labeling)
            names += [f.name for f in labeling.columns()]
        for name, column in zip(names, results, strict=True):
            if name == "row_id":  # the row's id, not the key of its copy
                column = pa.array([r.split("#", 1)[0] for r in row_ids], type=column.type)
            table = table.append_column(name, column)
        return table

    def _copies(self, row_ids: list[str], entries: dict[str, Entry], elsewhere: set[str]) -> dict[str, Entry]:
        """Identical prompts share a row id: one row in the output shows its cost, the others a
        copy at 0 naming it (``answered_by``), as on one machine (engine/reuse.py)."""
        free_in, free_out = cost(self.model.prices, 0, 0)
        out = dict(entries)
        seen: set[str] = set()
        for i, row_id in enumerate(row_ids):
            e = entries.get(row_id)
            if e is None:
                continue
            if row_id not in seen and row_id not in elsewhere:
                seen.add(row_id)
                continue
            billed = e.prompt_tokens is not None
            out[f"{row_id}#{i}"] = e._replace(
                prompt_tokens=0 if billed else None,
                completion_tokens=0 if billed else None,
                input_cost_pico=free_in if billed else None,
                output_cost_pico=free_out if billed else None,
                attempts=0,
                latency_ms=None,
                answered_by=e.answered_by or row_id,
            )
        return out


def per_actor(concurrency: int, actors: int) -> int:
    """The run's ``--concurrency`` split over its actors."""
    return max(1, math.ceil(concurrency / actors))
