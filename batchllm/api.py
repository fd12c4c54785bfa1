"""The library's entry point: run a job against its endpoint, or against a sandbox started for it.

The engine is handed an ``Endpoint``; deciding which one (the job's URL and key, or an in-process
sandbox for ``sandbox = true``) happens here, so the engine never imports the emulator and the CLI
is one more caller of ``run_job``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from . import __version__
from .access import resolve_api_key
from .engine.checks import prepare
from .engine.journal import Journal
from .engine.observer import Observer, Silent
from .engine.runner import Endpoint, RunResult
from .engine.runner import run_job as run_engine
from .errors import BatchLLMError, ExitCode
from .folders import made_note, make_folders
from .job import Job
from .notify import notify
from .reports.estimate import pilot_positions
from .reports.eval import pilot_accuracy
from .reports.expected import Observed
from .reports.pilot import pilot_dir, recommend, size_line
from .sandbox import SandboxConfig, endpoint_for, start_sandbox
from .sandbox.fleet import sandbox_fleet


@contextlib.asynccontextmanager
async def open_endpoint(job: Job, sandbox: SandboxConfig | None = None) -> AsyncIterator[Endpoint]:
    """The URL and key to use: an in-process sandbox for ``--sandbox``, else the job's."""
    if job.fleet is not None and job.sandbox:  # a sandbox for each endpoint (sandbox/fleet.py)
        async with sandbox_fleet(job.fleet, sandbox) as served:
            yield Endpoint("fleet", None, served.endpoints, served.keys)
        return
    if job.fleet is not None:  # each endpoint has its own URL and key (engine/router.py)
        yield Endpoint("fleet", None, job.fleet)
        return
    if not job.sandbox:
        yield Endpoint(job.endpoint, resolve_api_key(job))
        return
    runner, box, base = await start_sandbox(sandbox or SandboxConfig())
    try:
        yield Endpoint(endpoint_for(base, job.provider), box.config.api_key)
    finally:
        await runner.cleanup()


async def run_job(
    job: Job,
    *,
    observer: Observer | None = None,
    sandbox: SandboxConfig | None = None,
    command: str = "batchllm run",
    handle_signals: bool = False,
    only: frozenset[int] | None = None,
    write_output: bool = True,
) -> RunResult:
    """Run a job to the end (or to a stop) and write its output; see ``engine.runner.run_job``
    (``--engine ray``: ``cluster.driver.run_on_ray``). With ``job.notify``, the summary is
    POSTed there when the run ends, whatever its exit code (notify.py)."""
    if job.notify is None:
        return await _run(job, observer, sandbox, command, handle_signals, only, write_output)
    warn = (observer or Silent()).warning
    try:
        result = await _run(job, observer, sandbox, command, handle_signals, only, write_output)
    except BatchLLMError as exc:  # stopped before sending: say so all the same
        await notify(job.notify, failure_summary(job, exc), warn)
        raise
    await notify(job.notify, result.summary, warn)
    return result


def failure_summary(job: Job, exc: BatchLLMError) -> dict[str, Any]:
    """What ``--notify`` POSTs for a run that stopped before it could send (locked, bad input)."""
    return {
        "batchllm_version": __version__,
        "job": job.name,
        "input": str(job.input),
        "output": str(job.output),
        "complete": False,
        "exit_code": int(exc.exit_code),
        "message": str(exc),
    }


async def _run(
    job: Job,
    observer: Observer | None,
    sandbox: SandboxConfig | None,
    command: str,
    handle_signals: bool,
    only: frozenset[int] | None,
    write_output: bool,
    scratch: bool = False,
) -> RunResult:
    if job.engine == "ray":
        from .cluster.driver import check_input, run_on_ray

        check_input(job)  # bad input is reported before a missing key
        _make_output_folder(job, observer)
        async with open_endpoint(job, sandbox) as endpoint:
            return await run_on_ray(
                job, endpoint=endpoint, observer=observer, command=command, handle_signals=handle_signals
            )
    prepared = prepare(job)  # bad input is reported before a missing key
    _make_output_folder(job, observer)
    async with open_endpoint(job, sandbox) as endpoint:
        return await run_engine(
            prepared,
            endpoint,
            observer=observer,
            command=command,
            handle_signals=handle_signals,
            only=only,
            write_output=write_output,
            scratch=scratch,
        )


def _make_output_folder(job: Job, observer: Observer | None) -> None:
    """The output's missing folders, once the input is known good (folders.py), said."""
    made = make_folders(job.output, "--output")
    if made is not None:
        (observer or Silent()).warning(made_note(made, job.output))


class PilotStopped(Exception):
    """A pilot of ``run_pack_pilots`` did not finish: its exit code and why."""

    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code


async def run_pilot(
    job: Job,
    rows: int,
    observer: Observer | None = None,
    command: str = "batchllm estimate",
    gold: str | None = None,
) -> tuple[ExitCode, str | None, Observed, dict[str, Any] | None]:
    """``estimate --pilot``: run ``rows`` sampled rows for real into the output's journal.

    Returns the exit code, the stop message, and the completion lengths the journal now holds
    (the pilot's and any earlier run's), and with ``gold`` the pilot's accuracy; no output file
    is written, and the full run will not send those rows again.
    """
    code, message, observed, accuracy, _ = await _pilot(job, rows, observer, command, gold)
    return code, message, observed, accuracy


async def _pilot(
    job: Job, rows: int, observer: Observer | None, command: str, gold: str | None, scratch: bool = False
) -> tuple[ExitCode, str | None, Observed, dict[str, Any] | None, dict[str, Any]]:
    prepared = prepare(job)
    positions = pilot_positions(prepared.rows, rows)
    # A pilot is no run to notify anyone of: _run, not run_job.
    result = await _run(job, observer, None, command, False, positions, False, scratch)
    journal = Journal.open_readonly(job.journal_dir)
    try:
        observed = Observed(*journal.observed())
        accuracy = pilot_accuracy(prepared, journal, positions, gold) if gold else None
    finally:
        journal.conn.close()
    return result.exit_code, result.summary.get("message"), observed, accuracy, result.summary


async def run_pack_pilots(
    job: Job,
    rows: int,
    sizes: list[int],
    gold: str,
    observer: Observer | None = None,
    command: str = "batchllm estimate",
) -> dict[str, Any]:
    """``estimate --pilot M --gold COLUMN --pack 1,5,20``: the same M rows at each pack size,
    each into a scratch journal of its own (reports/pilot.py); one line per size."""
    assert job.labeling is not None
    prepared = prepare(job)
    rpm = job.rpm or int(prepared.provider.documented_rpm)
    lines = []
    for size in sizes:
        sized = dataclasses.replace(
            job,
            labeling=dataclasses.replace(job.labeling, pack=size),
            checkpoint=pilot_dir(job.journal_dir, size),
        )
        code, message, _, accuracy, _ = await _pilot(sized, rows, observer, command, gold, scratch=True)
        if code not in (ExitCode.OK, ExitCode.ROW_ERRORS):
            raise PilotStopped(code, f"the pilot at --pack {size} stopped: {message}")
        assert accuracy is not None
        lines.append(size_line(size, sized.journal_dir, accuracy, prepared.rows, rpm))
    return {
        "input": str(job.input),
        "gold": gold,
        "pilot_rows": rows,
        "rows": prepared.rows,
        "rpm": rpm,
        "sizes": lines,
        "recommended": recommend(lines),
    }
