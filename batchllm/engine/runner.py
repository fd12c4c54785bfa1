"""One run, wired: lock, journal, plan, limiter, client, dispatcher, output. Wiring only.

    input + job -> plan.py (prepare, admission, what the journal already has)
                -> dispatch.py (limiter, retries, budget) -> journal.py -> output.py
                -> summary.py

``run_job`` is the engine's entry point: it is handed the endpoint to talk to (the real API, or a
sandbox the caller started: see ``batchllm.api``) and an observer, and returns a ``RunResult``
with the exit code and the summary; it raises ``BatchLLMError`` for bad input, mid-run too.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from .. import __version__
from ..access import key_source
from ..errors import BatchLLMError, ExitCode
from ..fleet import FleetEndpoint, deadline_note, fleet_text, parse_deadline
from ..folders import write_atomic
from ..ledger import RunRecord, Snapshot, of_job
from ..prompts import PromptBuilder
from .budget import Budget
from .cache import ResponseCache, default_dir
from .checks import Prepared
from .client import Client, stop_asking, watch_played
from .concurrency import ConcurrencyLimit
from .dispatch import Dispatcher, StopReason
from .journal import Journal
from .labeled import label_row, reparse
from .lock import RunLock
from .observer import Observer, Silent
from .output import Totals, write_output
from .packed import packs_for
from .plan import Plan
from .ratelimit import Backoff, RateLimiter
from .refusable import insisted_fields, optional_fields, refusable
from .reopen import answers_mark, killed_sent, open_journal, record_run, refuse_mixed_answers
from .reuse import Reuse
from .router import fleet_router
from .stops import STOP_EXIT, stop_message
from .summary import run_summary, snapshot
from .warmup import Warmup


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where requests go and the key they carry (None: the server needs none). A fleet's run
    has ``fleet``, its endpoints as served (a sandbox's, for ``--sandbox``; else the job's), and
    ``keys``, where their ``key_env`` names are looked up (None: the environment)."""

    url: str
    key: str | None
    fleet: tuple[FleetEndpoint, ...] | None = None
    keys: Mapping[str, str] | None = None


@dataclass
class RunResult:
    exit_code: ExitCode
    summary: dict[str, Any]
    output: Path | None


class Run:
    """The state of one run; ``execute`` drives it."""

    def __init__(
        self,
        prepared: Prepared,
        observer: Observer,
        command: str,
        only: frozenset[int] | None,
        write: bool,
        scratch: bool = False,
    ) -> None:
        self.p = prepared
        self.job = prepared.job
        self.observer = observer
        self.command = command
        self.hard_stop = asyncio.Event()
        self.dispatcher: Dispatcher | None = None
        self.reuse: Reuse | None = None
        self.warnings: list[str] = []
        self.plan = Plan(prepared, self.warn, only)
        self.packs = packs_for(prepared, self.plan.admission)  # a too small --pack-tokens: refused now
        self.write = write  # a pilot writes no output (reports/estimate.py)
        # A pilot's rows are the output's; a pack-size pilot's stay in a journal of their own.
        self.kind = "run" if only is None else "pack-pilot" if scratch else "pilot"
        self.lost = (0, 0)  # requests an earlier run left in flight, and their worst case

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        self.observer.warning(message)

    async def execute(self, endpoint: Endpoint) -> RunResult:
        job = self.job
        started_at = time.time()
        lock = RunLock(job.journal_dir)
        lock.acquire(self.command)
        try:
            if lock.took_over_from:
                self.warn(
                    f"took over the lock left by a run that is no longer running ({lock.took_over_from})"
                )
            journal, self.lost = open_journal(self.p, self.warn)
            try:
                return await self._execute(journal, endpoint, started_at)
            finally:
                journal.close()
        finally:
            lock.release()

    async def _execute(self, journal: Journal, endpoint: Endpoint, started_at: float) -> RunResult:
        job, p = self.job, self.p
        self.started_at = started_at
        todo = self.plan.todo(journal)
        self.observer.start(
            {
                "input": str(job.input),
                "output": str(job.output),
                "rows": p.rows,
                "todo": todo,
                # What is not sent is done (a pilot's: the journal's; what it leaves out is not).
                "done_before": journal.rows_before if self.kind != "run" else max(0, p.rows - todo),
                "provider": p.provider.name,
                "model": p.model.name,
                "endpoint": endpoint.url,
                "checkpoint": str(job.journal_dir),
                "version": __version__,
            }
            | ({"fleet": fleet_text(endpoint.fleet or job.fleet)} if job.fleet else {})  # its models
            | ({"pack": self.packs.size if self.packs else 1} if self.kind == "pack-pilot" else {})
        )
        if p.model.prices is None:
            self.warn(
                f"{p.model.name!r} has no price in the {p.provider.name} model table and none was "
                "given (--input-price/--output-price): cost columns will be null"
            )
        limiter = RateLimiter(
            job.rpm, job.tpm, auto=job.rpm is None, start_rpm=p.provider.documented_rpm,
            serverless=p.provider.serverless,
        )  # fmt: skip
        start = Snapshot.of(journal.totals())
        record = RunRecord.begin(
            **of_job(job, scratch=self.kind == "pack-pilot"), kind=self.kind, provider=p.provider.name, model=p.model.name, engine="local",
            endpoint="sandbox" if job.sandbox else endpoint.url, rows_total=p.rows, start=start,
            lost=self.lost, warn=self.warn, priced=p.model.prices is not None,
            sent=killed_sent(journal),
        )  # fmt: skip
        # What the cap counts: all this output paid for, and what a crash may have left billed.
        billed_before = journal.maybe_billed(current=False)
        committed = start.spent_pico + billed_before["worst_pico"]
        budget = Budget(job.max_cost_pico, committed, job.max_cost_per_run_pico)
        if job.max_cost_per_month_pico is not None:
            budget.month = record.month_allowance(
                job.name, job.max_cost_per_month_pico, job.max_cost_per_month_pico // 200
            )
        try:
            result = await self._dispatch(journal, endpoint, limiter, budget, record)
        except BaseException as exc:
            code = int(exc.exit_code) if isinstance(exc, BatchLLMError) else None  # bad input mid-run
            failed: dict[str, Any] = {"message": f"the run failed: {exc}" if code else "the run failed",
                                      "exit_code": code}  # fmt: skip
            try:
                end: Snapshot | None = Snapshot.of(journal.totals())
                failed["this_run"] = {"requests": journal.requests_between(self.started_at, time.time() + 1)}
            except sqlite3.Error:  # the record keeps what the run said; the journal is past reading
                end = None
            record.finish(failed, start, end, billed_before)
            raise
        record.finish(result.summary, start, Snapshot.of(journal.totals()), billed_before)
        return result

    def _prefixed(self) -> bool:
        """May rows share a prompt prefix the server caches (the warm-up's case, warmup.py)? The
        job's own prefix is long enough, or the input is a request file (each line its own)."""
        return self.p.maker().cache_key is not None or not isinstance(self.p.builder, PromptBuilder)

    async def _dispatch(
        self, journal: Journal, endpoint: Endpoint, limiter: RateLimiter, budget: Budget, record: RunRecord
    ) -> RunResult:
        job, p = self.job, self.p
        client = Client(
            p.provider,
            endpoint.url,
            endpoint.key,
            concurrency=job.concurrency,
            timeout=job.timeout,
            # Unpaced (--rpm 0) the limiter never paces: reading each reply's headers is waste.
            on_hints=limiter.on_hints if limiter.rate is not None else None,
        )
        cache = ResponseCache(job.cache_dir or default_dir(), job.cache) if job.cache != "off" else None
        labeling, packs = job.labeling, self.packs
        router = None
        if job.fleet is not None:  # each endpoint paces itself (router.py); the pool does not
            fleet = endpoint.fleet or job.fleet
            router = fleet_router(
                fleet, job.timeout, p.provider, p.model.name, self.warn, endpoint.keys,
                optional_fields(job.structured_output, job.logprobs),
                insisted_fields(job.structured, job.logprobs_insisted),
            )  # fmt: skip
            limiter = RateLimiter(None)
        async with client, router or contextlib.nullcontext():
            window = None
            clients = [m.client for m in router.members] if router else [client]
            await refuse_mixed_answers(journal, clients, job.output, job.sandbox)  # all play, or all real
            record_run(p, journal, self.command, self.started_at, self.kind)
            if router is None:  # --concurrency is the ceiling; the server's pace sets the limit
                probe = p.provider.slots_url(endpoint.url)
                if (hint := await client.server_slots(probe) if probe else None) is not None:
                    limiter.self_hosted()  # its slots, not a rate, set the pace
                window = ConcurrencyLimit(job.concurrency, job.timeout, hint=hint, pace=limiter.enforced_rps)
            dispatcher = Dispatcher(
                client=client,
                provider=p.provider,
                journal=journal,
                model=p.model,
                max_tokens=job.max_tokens,
                concurrency=router.concurrency if router is not None else job.concurrency,
                limiter=limiter,
                backoff=Backoff(job.max_attempts),
                budget=budget,
                max_error_rate=job.max_error_rate,
                error_window=job.error_window,
                labeling=job.labeling,
                label=packs.label if packs is not None else label_row if labeling is not None else None,
                tpm_enabled=job.tpm is not None,
                grace=job.grace,
                warmup=Warmup() if job.warmup and self._prefixed() else None,
                window=window,
                warn=self.warn,
            )
            dispatcher.router = router
            asking = watch_played(clients, answers_mark(journal, record.mark_sandbox, job.sandbox))
            if router is None:  # a fleet's endpoints each give up their own (member.py)
                insist = insisted_fields(job.structured, job.logprobs_insisted)
                dispatcher.refusable = refusable(job.structured_output, job.logprobs, self.warn, insist)
            self.dispatcher = dispatcher
            if router is not None and job.deadline is not None:
                seconds = parse_deadline(job.deadline) - (time.time() - self.started_at)
                if note := deadline_note(job.deadline, seconds):
                    self.warn(note)
                todo = self.plan.todo(journal)
                size = packs.size if packs is not None else 1  # the plan is in requests, not rows
                router.meet(seconds, lambda: -(-max(0, todo - dispatcher.stats.done) // size))
                if router.plan_note:
                    self.warn(router.plan_note)
            ticker = asyncio.create_task(self._tick(dispatcher, record))
            deadline = None
            if job.max_runtime is not None:
                deadline = asyncio.get_running_loop().call_later(
                    job.max_runtime,
                    dispatcher.request_stop,
                    StopReason.RUNTIME,
                    f"--max-runtime {job.max_runtime:g} s reached",
                )
            try:
                if job.reparse and job.labeling is not None:  # read stored replies again; send nothing
                    read = reparse(journal, job.labeling, p.model.name)
                    self.warn(
                        f"read {read:,} rows' replies again under the job's {'schema' if job.labeling.is_schema else 'labels'}"
                    )
                else:
                    played = job.sandbox or (router is None and await client.is_sandbox())
                    endpoint_id = "sandbox" if played else endpoint.url.rstrip("/")
                    reuse = Reuse(
                        journal,
                        cache,
                        endpoint_id,
                        p.model,
                        dispatcher.record_copy,
                        labeling=labeling is not None,
                        first_is_request=labeling is None or labeling.samples == 1,
                        packed=packs.size if packs is not None else 0,
                    )
                    dispatcher.reuse = self.reuse = reuse
                    items = self.plan.items(journal, dispatcher.record_rejected, reuse)
                    await dispatcher.run(items if packs is None else packs.groups(items), self.hard_stop)
            finally:
                if cache is not None:
                    cache.close()
                ticker.cancel()
                self.observer.progress(snapshot(dispatcher.stats))
                if deadline is not None:
                    deadline.cancel()
            await stop_asking(asking)
        journal.flush()
        journal.stop_inflight()  # requests with no saved reply were cancelled: maybe billed (inflight.py)
        return self._finish(journal, dispatcher, budget, self.started_at)

    async def _tick(self, dispatcher: Dispatcher, record: RunRecord) -> None:
        while True:
            await asyncio.sleep(self.observer.interval)
            s = dispatcher.stats
            self.observer.progress(snapshot(s))
            record.progress(s.requests, s.prompt_tokens, s.completion_tokens, s.cost_pico, (s.ok, s.error, s.invalid))  # fmt: skip

    def _finish(
        self, journal: Journal, dispatcher: Dispatcher, budget: Budget, started_at: float
    ) -> RunResult:
        job = self.job
        reason = dispatcher.stop_reason
        if reason is not None:
            if reason is StopReason.JOURNAL:
                journal.flush()
            message = stop_message(reason, dispatcher, budget, job, journal, self.p.provider, key_source(job))
            dispatcher.stop_message = message
            self.observer.stopped(reason.value, message)
        totals: Totals | None = None
        output: Path | None = None

        def summary(t: Totals | None, code: ExitCode | None) -> dict[str, Any]:
            return run_summary(
                self.p, t, code, dispatcher, reason, budget, self.reuse, started_at, self.warnings,
                journal, self.command,
            )  # fmt: skip

        if self.reuse is not None and reason is not StopReason.JOURNAL:
            self.reuse.remember(journal)
        # With the journal unwritable the disk is likely full: leave the output as it was.
        if self.write and not self.hard_stop.is_set() and reason is not StopReason.JOURNAL:
            journal.flush()
            totals = write_output(
                job.output,
                self.p.source,
                self.p.builder,
                journal,
                lambda t: summary(t, None),
                job.labeling,
                fleet=job.fleet is not None,
            )
            output = job.output
        if reason is not None:
            code = STOP_EXIT[reason]
        elif totals is not None and totals.failed:
            code = ExitCode.ROW_ERRORS
        else:
            code = ExitCode.OK
        return RunResult(code, summary(totals, code), output)


async def run_job(
    prepared: Prepared,
    endpoint: Endpoint,
    *,
    observer: Observer | None = None,
    command: str = "batchllm run",
    handle_signals: bool = False,
    only: frozenset[int] | None = None,
    write_output: bool = True,
    scratch: bool = False,
) -> RunResult:
    """Run a prepared job (plan.prepare) against ``endpoint`` to the end (or a stop); write its output.
    ``only`` restricts the run to those input positions and ``write_output=False`` leaves the
    output file alone: together they are ``batchllm estimate --pilot``; ``scratch``: a pilot
    of one pack size whose journal is not the output's (``estimate --pilot M --pack 1,5,10``)."""
    job = prepared.job
    run = Run(prepared, observer or Silent(), command, only, write_output, scratch)
    loop = asyncio.get_running_loop()
    installed = []
    if handle_signals and threading.current_thread() is threading.main_thread():

        def on_signal(signum: int) -> None:
            d = run.dispatcher
            name = signal.Signals(signum).name
            if d is not None and d.stopping and d.stop_reason is StopReason.INTERRUPTED:
                run.hard_stop.set()
                run.observer.warning("second interrupt: stopping now")
            elif d is not None:
                run.observer.warning(
                    f"{name}: finishing requests in flight (up to {job.grace:g} s); interrupt again to stop at once"
                )
                d.request_stop(StopReason.INTERRUPTED, f"interrupted by {name}")
            else:
                raise KeyboardInterrupt

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
    try:
        result = await run.execute(endpoint)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
    if job.summary_json is not None:
        write_atomic(
            job.summary_json, orjson.dumps(result.summary, option=orjson.OPT_INDENT_2), "--summary-json"
        )
    return result
