"""One run, start to finish: validate, lock, resume from the journal, dispatch, write, summarise.

    input + job -> PromptBuilder -> plan (skip what the journal has; refuse what cannot fit)
                -> Dispatcher (limiter, retries, budget) -> Journal -> write_output -> summary

``run_job`` is the library's entry point (the CLI is a thin client of it): it returns a
``RunResult`` with the exit code and the summary, and raises ``BatchLLMError`` only for problems
found before anything was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from . import __version__
from .budget import Budget
from .client import QUOTA_CODES, Client
from .dispatch import Dispatcher, StopReason, WorkItem
from .errors import ExitCode, JobError, RunStopError
from .inputs import InputFile
from .job import MAX_CONTENT_CHARS, PROVIDER_RPM, Job, resolve_api_key
from .journal import RESCUE_NAME, Journal
from .lock import RunLock
from .output import Totals, check_no_clash, write_output
from .pricing import Model, format_usd, get_model
from .progress import Reporter
from .prompts import PromptBuilder, RequestEncoder
from .ratelimit import Backoff, RateLimiter
from .sandbox import SandboxConfig, start_sandbox
from .tokens import TokenCounter, get_counter

_STOP_EXIT = {
    StopReason.INTERRUPTED: ExitCode.INTERRUPTED,
    StopReason.API: ExitCode.API_STOP,
    StopReason.ERROR_RATE: ExitCode.API_STOP,
    StopReason.BUDGET: ExitCode.BUDGET,
    StopReason.RUNTIME: ExitCode.TEMPFAIL,
    StopReason.JOURNAL: ExitCode.IO_ERROR,
}


@dataclass
class RunResult:
    exit_code: ExitCode
    summary: dict[str, Any]
    output: Path | None


@dataclass
class Prepared:
    """Everything checked before a request may leave."""

    job: Job
    model: Model
    source: InputFile
    builder: PromptBuilder
    rows: int


def prepare(job: Job) -> Prepared:
    """Check the job against its input: model, file, columns, ids. Raises ``JobError``."""
    model = get_model(job.model)
    if job.max_tokens >= model.context_window:
        raise JobError(
            f"--max-tokens {job.max_tokens} leaves no room in {model.name}'s window of {model.context_window:,} tokens"
        )
    source = InputFile(job.input, job.input_format)
    builder = PromptBuilder(job, source.columns, str(job.input))
    check_no_clash(source.columns, str(job.input))
    rows = source.count_rows()
    if rows == 0:
        raise JobError(f"{job.input}: the file has a header but no rows")
    if job.id_column is not None:
        _check_unique_ids(source, job.id_column)
    return Prepared(job, model, source, builder, rows)


def _check_unique_ids(source: InputFile, column: str) -> None:
    chunks = [b.column(0).cast(pa.string()) for b in source.batches([column])]
    ids = pa.chunked_array(chunks, type=pa.string())
    if pc.count_distinct(ids, mode="all").as_py() == len(ids):
        return
    counts = pc.value_counts(ids)
    dup = next(v["values"] for v in counts.to_pylist() if v["counts"] > 1)
    first = pc.index(ids, dup).as_py()
    raise JobError(
        f"{source.path}: the --id-column {column!r} value {dup!r} appears more than once "
        f"(first at row {first + 1}); ids must be unique"
    )


class Run:
    """The state of one run; ``execute`` drives it."""

    def __init__(self, prepared: Prepared, reporter: Reporter, command: str) -> None:
        self.p = prepared
        self.job = prepared.job
        self.reporter = reporter
        self.command = command
        self.counter: TokenCounter | None = None
        self.hard_stop = asyncio.Event()
        self.journal: Journal | None = None
        self.dispatcher: Dispatcher | None = None
        self.todo = 0
        self.warnings: list[str] = []
        # A pilot runs only these input positions and writes no output (estimate.py).
        self.only: frozenset[int] | None = None
        self.write = True

    def _counter(self) -> TokenCounter:
        if self.counter is None:
            self.counter = get_counter()
            if not self.counter.exact:
                self.warn(f"token counts are {self.counter.label}")
        return self.counter

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        self.reporter.warning(message)

    # -- the plan: which rows to send, lazily, a batch at a time ----------------------------

    def _decide(
        self, journal: Journal
    ) -> Iterator[tuple[int, list[str], list[str], list[str | None], Sequence[int]]]:
        """Per input batch: its start, ids, hashes, prompts, and the indexes of rows to send."""
        job, builder = self.job, self.p.builder
        position = shared = changed_kept = 0
        resuming = journal.rows_before > 0
        for batch in self.p.source.batches(builder.read_columns):
            pb = builder.build(batch, position)
            position += batch.num_rows
            if not resuming:
                every: Sequence[int] = range(len(pb.row_ids))
                if self.only is not None:
                    every = [i for i in every if pb.start + i in self.only]
                yield pb.start, pb.row_ids, pb.hashes, pb.users, every
                continue
            # Position-derived ids embed the content hash; --id-column values do not.
            unfinished = journal.unfinished(pb.row_ids, pb.hashes if job.id_column else None)
            send: list[int] = []
            new = 0
            for i, status in unfinished:
                if status is None:
                    new += 1
                elif status == "ok":  # same id, other content
                    if not job.refresh_changed:
                        changed_kept += 1
                        continue
                elif not job.retry_errors:
                    continue
                send.append(i)
            shared += len(pb.row_ids) - new
            if self.only is not None:
                send = [i for i in send if pb.start + i in self.only]
            yield pb.start, pb.row_ids, pb.hashes, pb.users, send
        if resuming and shared == 0:
            self.warn(
                f"the input shares no rows with the journal in {journal.directory} "
                "(did the input or --id-column change?): every row is sent as new"
            )
        if changed_kept:
            self.warn(
                f"{changed_kept:,} rows changed under the same --id-column value and kept their "
                "earlier results; pass --refresh-changed to send them again"
            )

    def estimate_todo(self, journal: Journal) -> int:
        """Rows left to send, for the progress bar: without a second pass over the input."""
        if self.only is not None:
            return len(self.only)
        if journal.rows_before == 0:
            return self.p.rows
        counts = journal.counts_before
        done = counts.get("ok", 0) + (0 if self.job.retry_errors else counts.get("error", 0))
        return max(0, self.p.rows - done)

    def plan(self, journal: Journal, dispatcher: Dispatcher) -> Iterator[WorkItem]:
        job, model = self.job, self.p.model
        encoder = RequestEncoder(job)
        window, max_tokens = model.context_window, job.max_tokens
        count_all = job.max_cost_pico is not None or job.tpm is not None
        system_bound = 4 * len(job.system or "") + 2
        bound_overhead = 14 + system_bound  # template tokens, an upper bound without the tokenizer
        in_pico, out_pico = model.input_pico_per_token, model.output_pico_per_token
        budget = job.max_cost_pico is not None
        column = job.prompt_column

        def needs_count(text: str | None) -> bool:
            # Without a budget or tpm, only rows that might not fit the window are counted:
            # a token is at least one UTF-8 byte, and a character at most four.
            if text is None or len(text) > MAX_CONTENT_CHARS:
                return False
            return count_all or bound_overhead + 4 * len(text) + 2 + max_tokens > window

        for start, row_ids, hashes, users, send in self._decide(journal):
            exact: dict[int, int] = {}
            countable = [i for i in send if needs_count(users[i])]
            if countable:
                counter = self._counter()
                overhead = counter.overhead(job.system)
                counts = counter.texts_tokens([users[i] or "" for i in countable])
                exact = {i: overhead + n for i, n in zip(countable, counts, strict=True)}
            for i in send:
                user = users[i]
                if user is None:
                    dispatcher.record_rejected(
                        row_ids[i],
                        hashes[i],
                        "NoPrompt",
                        f"column {column!r} is null in row {start + i + 1} (not sent)",
                    )
                    continue
                if len(user) > MAX_CONTENT_CHARS:
                    dispatcher.record_rejected(
                        row_ids[i],
                        hashes[i],
                        "PromptTooLong",
                        f"the prompt has {len(user):,} characters, over the API's {MAX_CONTENT_CHARS:,} (not sent)",
                    )
                    continue
                prompt_tokens = exact.get(i, 0)
                if prompt_tokens + max_tokens > window:
                    dispatcher.record_rejected(
                        row_ids[i],
                        hashes[i],
                        "ContextWindowExceeded",
                        f"{prompt_tokens:,} prompt tokens + max_tokens {max_tokens:,} = "
                        f"{prompt_tokens + max_tokens:,} exceed {model.name}'s context window of "
                        f"{window:,} (not sent)",
                    )
                    continue
                worst = 0
                if budget:
                    reserve_tokens = prompt_tokens
                    if not (self.counter and self.counter.exact):
                        reserve_tokens = bound_overhead + len(user.encode("utf-8")) + 2
                    worst = reserve_tokens * in_pico + max_tokens * out_pico
                yield WorkItem(row_ids[i], hashes[i], encoder.encode(user), prompt_tokens, worst)

    # -- executing ---------------------------------------------------------------------------

    async def execute(self, sandbox: SandboxConfig | None = None) -> RunResult:
        job = self.job
        started_at = time.time()
        lock = RunLock(job.journal_dir)
        lock.acquire(self.command)
        try:
            if lock.took_over_from:
                self.warn(
                    f"took over the lock left by a run that is no longer running ({lock.took_over_from})"
                )
            journal = Journal.open(job.journal_dir, job.request_settings(), restart=job.restart)
            if journal.imported:
                self.warn(
                    f"imported {journal.imported:,} replies an earlier run could not write to the journal"
                )
            self.journal = journal
            journal.set_meta(
                "last_run",
                {
                    "command": self.command,
                    "input": str(job.input),
                    "input_rows": self.p.rows,
                    "started_at": started_at,
                },
            )
            try:
                return await self._execute(journal, sandbox, started_at)
            finally:
                journal.close()
        finally:
            lock.release()

    async def _execute(self, journal: Journal, sandbox: SandboxConfig | None, started_at: float) -> RunResult:
        job, model = self.job, self.p.model
        async with _endpoint(job, sandbox) as (endpoint, key):
            self.todo = self.estimate_todo(journal)
            self.reporter.start(
                {
                    "input": str(job.input),
                    "output": str(job.output),
                    "rows": self.p.rows,
                    "todo": self.todo,
                    "done_before": journal.rows_before,
                    "model": model.name,
                    "endpoint": endpoint,
                    "checkpoint": str(job.journal_dir),
                    "version": __version__,
                }
            )
            limiter = RateLimiter(
                None if job.rpm is None else job.rpm, job.tpm, auto=job.rpm is None, start_rpm=PROVIDER_RPM
            )
            budget = Budget(job.max_cost_pico, journal.spent_pico())
            async with Client(endpoint, key, concurrency=job.concurrency, timeout=job.timeout) as client:
                dispatcher = Dispatcher(
                    client=client,
                    journal=journal,
                    model=model,
                    max_tokens=job.max_tokens,
                    concurrency=job.concurrency,
                    limiter=limiter,
                    backoff=Backoff(job.max_attempts),
                    budget=budget,
                    counter=self.counter,
                    max_error_rate=job.max_error_rate,
                    error_window=job.error_window,
                    tpm_enabled=job.tpm is not None,
                    grace=job.grace,
                )
                self.dispatcher = dispatcher
                ticker = asyncio.create_task(self._tick(dispatcher))
                deadline = None
                if job.max_runtime is not None:
                    deadline = asyncio.get_running_loop().call_later(
                        job.max_runtime,
                        dispatcher.request_stop,
                        StopReason.RUNTIME,
                        f"--max-runtime {job.max_runtime:g} s reached",
                    )
                try:
                    await dispatcher.run(self.plan(journal, dispatcher), self.hard_stop)
                finally:
                    ticker.cancel()
                    self.reporter.progress(snapshot(dispatcher))
                    if deadline is not None:
                        deadline.cancel()
        return self._finish(journal, dispatcher, budget, started_at)

    async def _tick(self, dispatcher: Dispatcher) -> None:
        while True:
            await asyncio.sleep(self.reporter.interval)
            self.reporter.progress(snapshot(dispatcher))

    def _finish(
        self, journal: Journal, dispatcher: Dispatcher, budget: Budget, started_at: float
    ) -> RunResult:
        job = self.job
        reason = dispatcher.stop_reason
        if reason is StopReason.BUDGET:
            dispatcher.stop_message = (
                f"budget reached: this output has cost {format_usd(budget.spent)} of the "
                f"{format_usd(job.max_cost_pico or 0)} cap; run again with a higher --max-cost to continue"
            )
        if reason is StopReason.API and dispatcher.stop_error is not None:
            dispatcher.stop_message = self._run_stop_advice(dispatcher.stop_error)
        if reason is StopReason.JOURNAL:
            journal.flush()
            dispatcher.stop_message = (
                f"cannot write the journal in {journal.directory} ({journal.write_error}): stopped sending; "
                f"{journal.rescued:,} replies were saved to {journal.directory / RESCUE_NAME} and the next run "
                "imports them"
                + (
                    f"; {len(journal.unsaved):,} replies could not be saved anywhere"
                    if journal.unsaved
                    else ""
                )
            )
        if reason is not None:
            self.reporter.stopped(reason.value, dispatcher.stop_message or reason.value)
        totals: Totals | None = None
        output: Path | None = None
        summary: dict[str, Any] = {}
        # With the journal unwritable the disk is likely full: leave the output as it was.
        if self.write and not self.hard_stop.is_set() and reason is not StopReason.JOURNAL:
            journal.flush()
            totals = write_output(
                job.output,
                self.p.source,
                self.p.builder,
                journal,
                job.max_tokens,
                lambda t: self._summary(t, dispatcher, reason, started_at, None),
            )
            output = job.output
        if reason is not None:
            code = _STOP_EXIT[reason]
        elif totals is not None and totals.error:
            code = ExitCode.ROW_ERRORS
        else:
            code = ExitCode.OK
        summary = self._summary(totals, dispatcher, reason, started_at, code)
        return RunResult(code, summary, output)

    def _run_stop_advice(self, exc: RunStopError) -> str:
        job = self.job
        if exc.code in QUOTA_CODES:
            return (
                f"the API says the quota is used up ({exc.describe()}); rows not yet sent stay "
                "pending: run the same command again once the quota resets or is raised"
            )
        source = (
            f"--api-key-file {job.api_key_file}"
            if job.api_key_file
            else f"the environment variable {job.api_key_env}"
        )
        return (
            f"the API rejected the key ({exc.describe()}): check {source}, then run the same "
            "command again to resume"
        )

    def _summary(
        self,
        totals: Totals | None,
        dispatcher: Dispatcher,
        reason: StopReason | None,
        started_at: float,
        code: ExitCode | None,
    ) -> dict[str, Any]:
        job, model, stats = self.job, self.p.model, dispatcher.stats
        finished = time.time()
        out: dict[str, Any] = {
            "batchllm_version": __version__,
            "input": str(job.input),
            "output": str(job.output),
            "checkpoint": str(job.journal_dir),
            "model": model.name,
            "settings": job.request_settings(),
            "prices": model.prices(),
            "complete": reason is None,
            "stop_reason": reason.value if reason else None,
            "message": dispatcher.stop_message,
            "started_at": _iso(started_at),
            "finished_at": _iso(finished),
            "duration_s": round(finished - started_at, 3),
            "this_run": {
                "rows_sent_ok": stats.ok,
                "rows_failed": stats.error,
                "rows_rejected_unsent": stats.rejected,
                "requests": stats.requests,
                "retries": stats.retries,
                "throttled": stats.throttled,
                "prompt_tokens": stats.prompt_tokens,
                "completion_tokens": stats.completion_tokens,
                "cost_usd": format_usd(stats.cost_pico).lstrip("$"),
            },
            "warnings": self.warnings,
        }
        if self.journal is not None and (estimate := self.journal.get_meta("estimate")):
            out["estimate"] = estimate
        if totals is not None:
            out["rows"] = {
                "total": totals.rows,
                "ok": totals.ok,
                "error": totals.error,
                "pending": totals.pending,
                "truncated": totals.truncated,
            }
            out["tokens"] = {
                "prompt": totals.prompt_tokens,
                "completion": totals.completion_tokens,
                "total": totals.prompt_tokens + totals.completion_tokens,
            }
            out["cost_usd"] = {
                "input": format_usd(totals.input_cost_pico).lstrip("$"),
                "output": format_usd(totals.output_cost_pico).lstrip("$"),
                "total": format_usd(totals.cost_pico).lstrip("$"),
            }
        if job.max_cost_pico is not None:
            out["max_cost_usd"] = format_usd(job.max_cost_pico).lstrip("$")
        if code is not None:
            out["exit_code"] = int(code)
        if not out["complete"]:
            out["resume"] = self.command
        return out


def snapshot(dispatcher: Dispatcher) -> dict[str, Any]:
    s = dispatcher.stats
    elapsed = max(time.monotonic() - s.started, 1e-9)
    return {
        "done": s.done,
        "ok": s.ok,
        "error": s.error,
        "requests": s.requests,
        "retries": s.retries,
        "throttled": s.throttled,
        "tokens": s.prompt_tokens + s.completion_tokens,
        "cost_pico": s.cost_pico,
        "rows_per_s": s.done / elapsed,
    }


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


@contextlib.asynccontextmanager
async def _endpoint(job: Job, sandbox: SandboxConfig | None) -> AsyncIterator[tuple[str, str]]:
    """The URL and key to use: an in-process sandbox for ``--sandbox``, else the job's."""
    if not job.sandbox:
        yield job.endpoint, resolve_api_key(job)
        return
    runner, box, url = await start_sandbox(sandbox or SandboxConfig())
    try:
        yield url, box.config.api_key
    finally:
        await runner.cleanup()


def format_summary(summary: dict[str, Any]) -> str:
    """The human summary printed at the end of a run."""
    lines = []
    rows = summary.get("rows")
    if rows:
        state = "complete" if summary["complete"] else "INCOMPLETE"
        lines.append(
            f"done ({state}): {rows['ok']:,} ok, {rows['error']:,} failed"
            + (f", {rows['pending']:,} pending" if rows["pending"] else "")
            + f" of {rows['total']:,} rows"
            + (f"; {rows['truncated']:,} replies cut at max_tokens" if rows["truncated"] else "")
        )
        tok, cost = summary["tokens"], summary["cost_usd"]
        lines.append(
            f"tokens: {tok['prompt']:,} prompt + {tok['completion']:,} completion = {tok['total']:,}"
        )
        lines.append(
            f"cost: ${cost['total']} (input ${cost['input']}, output ${cost['output']}); this run ${summary['this_run']['cost_usd']}"
        )
    t = summary["this_run"]
    lines.append(
        f"this run: {t['requests']:,} requests, {t['retries']:,} retries, {t['throttled']:,} throttled, "
        f"{summary['duration_s']:,.1f} s"
    )
    if summary.get("message"):
        lines.append(f"stopped: {summary['message']}")
    if rows:
        lines.append(f"output: {summary['output']}")
    if not summary["complete"]:
        lines.append(f"to resume, run the same command again: {summary['resume']}")
    return "\n".join(lines)


def command_line(argv: list[str] | None = None) -> str:
    """The command to resume with: as typed, less ``--restart`` (which would discard the journal).

    It never contains the key: keys come from the environment or a file, never from a flag.
    """
    args = sys.argv[1:] if argv is None else argv
    return " ".join(shlex.quote(a) for a in ["batchllm", *(a for a in args if a != "--restart")])


async def run_job(
    job: Job,
    *,
    reporter: Reporter | None = None,
    sandbox: SandboxConfig | None = None,
    command: str | None = None,
    handle_signals: bool = False,
    only: frozenset[int] | None = None,
    write_output: bool = True,
) -> RunResult:
    """Run a job to the end (or to a stop) and write its output. The library's entry point.

    ``only`` restricts the run to those input positions and ``write_output=False`` leaves the
    output file alone: together they are ``batchllm estimate --pilot``.
    """
    prepared = prepare(job)
    run = Run(prepared, reporter or Reporter("none"), command or command_line())
    run.only, run.write = only, write_output
    loop = asyncio.get_running_loop()
    installed = []
    if handle_signals and threading.current_thread() is threading.main_thread():

        def on_signal(signum: int) -> None:
            d = run.dispatcher
            if d is not None and d.stopping and d.stop_reason is StopReason.INTERRUPTED:
                run.hard_stop.set()
                run.reporter.warning("second interrupt: stopping now")
            elif d is not None:
                run.reporter.warning(
                    f"{signal.Signals(signum).name}: finishing requests in flight (up to "
                    f"{job.grace:g} s); interrupt again to stop at once"
                )
                d.request_stop(StopReason.INTERRUPTED, f"interrupted by {signal.Signals(signum).name}")
            else:
                raise KeyboardInterrupt

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
    try:
        result = await run.execute(sandbox)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
    if job.summary_json is not None:
        _write_atomic(job.summary_json, orjson.dumps(result.summary, option=orjson.OPT_INDENT_2))
    return result


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
