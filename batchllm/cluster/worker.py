"""The Ray Data UDF: one batch of rows in, the same rows with the output columns out.

``Completer`` is an async callable class run by ``map_batches`` on an actor pool; Ray gives each
actor one event loop, on which the actor keeps one ``Client`` (one aiohttp session) for all its
batches. A batch goes through the local engine's own code: ``PromptBuilder`` and ``Admission``
(plan.py) make the requests and refuse what cannot fit, and a ``Dispatcher`` (dispatch.py) sends
them with its retries, backoff, labeling re-asks and error rows. Only its seams differ: the limiter, the
budget and the journal, leased from or sent to one coordinator (seams.py).

A row that fails is an error row; nothing a row does fails the batch (which would fail the job).
Without ``--id-column`` a row's id is the hash of its prompt: identical prompts are one row,
sent once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import uuid
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from ..access import key_source
from ..engine.admission import Admission
from ..engine.checks import check_model
from ..engine.client import Client
from ..engine.dispatch import Dispatcher
from ..engine.labeled import label_row
from ..engine.output import RESULT_FIELDS, Totals, _result_columns, label_columns
from ..engine.packed import Packs
from ..engine.plan import WorkItem
from ..engine.ratelimit import Backoff
from ..engine.refusable import insisted_fields, optional_fields, refusable
from ..engine.router import Router, fleet_router
from ..errors import BatchLLMError, JobError
from ..fleet import FleetEndpoint
from ..job import Job
from ..pricing import cost
from ..prompts import PromptBatch, PromptBuilder, RequestMaker
from ..providers import get_provider
from ..records import Entry, Message
from .seams import MAX_WAIT_ROUNDS, BatchLedger, LeasedBudget, LeasedLimiter, RowGate

HEARTBEAT = 1.0  # seconds between "still alive" calls while the actor holds claims or budget


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
        fleet: tuple[FleetEndpoint, ...] | None = None,
        keys: dict[str, str] | None = None,
    ) -> None:
        try:
            self._setup(job, url, key, coordinator, columns, examples, concurrency, fleet, keys)
        except BatchLLMError as exc:  # the driver reports it as itself (cluster/opening.py)
            import ray

            with contextlib.suppress(ray.exceptions.RayError):  # told before the job fails
                ray.get(coordinator.fail.remote(exc), timeout=5.0)
            raise

    def _setup(
        self,
        job: Job,
        url: str,
        key: str | None,
        coordinator: Any,
        columns: list[str],
        examples: tuple[Message, ...],
        concurrency: int,
        fleet: tuple[FleetEndpoint, ...] | None,
        keys: dict[str, str] | None,
    ) -> None:
        self.job = job
        self.fleet, self.keys = fleet, keys
        self.router: Router | None = None
        self._reported: dict[str, float] = {}  # the router's counts the coordinator has
        self.url = url
        self.key = key
        self.coordinator = coordinator
        self.provider = get_provider(job.provider)
        self.model = check_model(job, self.provider)
        self.builder = PromptBuilder(job, columns, str(job.input))
        self.packing = job.labeling is not None and job.labeling.pack > 1
        self.maker = RequestMaker(job, examples)
        self.admission = Admission(
            job,
            self.provider,
            self.model,
            self.maker.prefix,
            count_all=self.model.prices is not None or job.tpm is not None or self.packing,
        )
        # Several rows per request (--pack): the same packing as one machine's (engine/packed.py).
        self.packs = Packs(job, self.model, examples, self.admission) if self.packing else None
        # response_format and logprobs given up for the actor's batches once its server refuses
        # them (unsaid: an actor's warnings have no display; engine/refusable.py); a fleet's
        # endpoints each give up their own (engine/member.py).
        self.refusable = (
            refusable(
                job.structured_output,
                job.logprobs,
                lambda m: None,
                insisted_fields(job.structured, job.logprobs_insisted),
            )
            if job.fleet is None
            else None
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
        try:
            return await self._call(batch)
        except BatchLLMError as exc:  # it fails the Ray job: the driver reports it as itself
            await self.coordinator.fail.remote(exc)  # told before the job fails
            raise

    async def _call(self, batch: pa.Table) -> pa.Table:
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
            if self.fleet is not None:  # this actor's share of each endpoint (fleet_share)
                log = logging.getLogger("batchllm")
                self.router = fleet_router(
                    self.fleet, self.job.timeout, self.provider, self.model.name, log.warning, self.keys,
                    optional_fields(self.job.structured_output, self.job.logprobs),
                    insisted_fields(self.job.structured, self.job.logprobs_insisted),
                )  # fmt: skip
                await self.router.__aenter__()
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
            label=self.packs.label if self.packs else label_row if job.labeling is not None else None,
            tpm_enabled=job.tpm is not None,
            grace=job.grace,
            gate=self.gate,
        )
        d.router = self.router
        d.refusable = self.refusable
        row_ids = pb.row_ids
        ready = self.admission.admit(pb, send, self.maker, d.record_rejected, lambda m: None)
        encode = self.provider.encode
        items = [
            WorkItem(row_ids[i], pb.hashes[i], request, encode(request), tokens, worst)
            for i, request, tokens, worst in ready
        ]
        self.limiter.dispatchers.add(d)
        try:
            await d.run(self.packs.groups(iter(items)) if self.packs else iter(items))
        finally:
            self.limiter.dispatchers.discard(d)
            await ledger.drain()
            self.gate.recorded([row_ids[i] for i in send])  # none may stay held past its batch
            stats = d.stats
            counts = {"requests": stats.requests, "retries": stats.retries, "rejected": stats.rejected}
            counts.update(self._endpoint_counts())
            self.coordinator.record.remote(ledger.owner, [], counts)
        if d.stop_reason is not None and self.limiter.stop is None:
            # This actor's own stop (a bad key, too many errors): the whole run stops, and this
            # actor's other batch at once.
            message = d.stop_message or d.stop_reason.value
            if d.stop_error is not None:
                message = self.provider.advice(d.stop_error, key_source(job))
            self.limiter.stopped((d.stop_reason.value, message))
            self.coordinator.stop.remote(d.stop_reason.value, message)

    def _endpoint_counts(self) -> dict[str, Any]:
        """What each fleet endpoint did since the last report (``results.endpoints`` adds the
        actors' up): ``endpoint/NAME/FIELD`` keys of the coordinator's counters."""
        if self.router is None:
            return {}
        out: dict[str, Any] = {}
        for m in self.router.members:
            for field_name, value in dataclasses.asdict(m.counts).items():
                key = f"endpoint/{m.name}/{field_name}"
                out[key] = value - self._reported.get(key, 0)
                self._reported[key] = value
        return out

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
        if self.fleet is not None:
            names.append("endpoint")
            results.append(
                pa.array([e.endpoint if (e := entries.get(r)) else None for r in row_ids], pa.string())
            )
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
                cached_tokens=0 if billed else None,
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


def fleet_share(fleet: tuple[FleetEndpoint, ...], actors: int) -> tuple[FleetEndpoint, ...]:
    """Each actor's share of a fleet: every endpoint's rpm, tpm and concurrency over the actors.
    The actors together stay within each endpoint's limits without asking anyone, and each
    fills the cheapest endpoint first; an actor that finds an endpoint benched or out tells only
    itself (each warns once)."""
    return tuple(
        dataclasses.replace(
            e,
            rpm=max(1, e.rpm // actors) if e.rpm else e.rpm,
            tpm=max(1, e.tpm // actors) if e.tpm else e.tpm,
            concurrency=per_actor(e.concurrency, actors),
        )
        for e in fleet
    )


def fleet_keys(fleet: tuple[FleetEndpoint, ...], given: Mapping[str, str] | None) -> dict[str, str]:
    """The keys a fleet's endpoints name, read here (the driver's environment, or a sandbox
    fleet's keys) for the actors; a missing one is the same usage error as a local run's."""
    source = os.environ if given is None else given
    keys = {}
    for e in fleet:
        if e.key_env:
            key = source.get(e.key_env)
            if not key:
                raise JobError(f"fleet endpoint {e.name!r}: the environment variable {e.key_env} is not set")
            keys[e.key_env] = key
    return keys
