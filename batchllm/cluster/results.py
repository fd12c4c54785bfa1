"""What a Ray run says when it ends, or without starting: the result, its summary, and the
last run's answer when nothing is left to send.

The driver (driver.py) runs the job; this module turns what the coordinator reports into the
``RunResult`` a local run returns (row counts from the output directory, tokens and costs exact
from the journal) and writes the summary where ``report`` reads it.
"""

from __future__ import annotations

import dataclasses
import resource
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq

from ..engine.counts import plural
from ..engine.journal import DB_NAME, TRANSIENT, Journal
from ..engine.journal_schema import SANDBOX_ANSWERS
from ..engine.member import Counts
from ..engine.observer import Observer
from ..engine.output import SUMMARY_NAME, Totals, read_summary
from ..engine.runner import RunResult
from ..engine.stats import Stats, StopReason
from ..engine.stops import STOP_EXIT, next_step
from ..engine.summary import build_summary, cap_advice
from ..errors import ExitCode
from ..folders import write_atomic
from ..inputs import InputFile
from ..job import Job
from ..pricing import Model, format_usd
from ..prompts import PromptBuilder
from ..providers import Provider


@dataclasses.dataclass
class ClusterSetup:
    """What a summary needs of the run's preparation (engine/plan.Setup)."""

    job: Job
    provider: Provider
    model: Model


def answered_already(job: Job, files: list[str], source: InputFile) -> RunResult | None:
    """The last run's result, when its output is complete and the journal holds every input row
    as a run would leave it (rows that failed are sent again only with --retry-errors)."""
    summary = read_summary(job.output) if job.output.is_dir() else None
    if summary is None or not summary.get("complete") or job.restart or job.refresh_changed:
        return None
    if not (job.journal_dir / DB_NAME).is_file():
        return None
    journal = Journal.open_readonly(job.journal_dir)
    try:
        if journal.get_meta("settings") != job.request_settings():
            return None  # the run says what differs
        builder = PromptBuilder(job, source.columns, str(job.input))
        for name in files:
            position = 0
            for batch in InputFile(Path(name), source.format, source.delimiter).batches(builder.read_columns):
                pb = builder.build(batch, position)
                position += batch.num_rows
                ids = pb.row_ids if job.id_column is not None else [f"p-{h}" for h in pb.hashes]
                for _, status, _ in journal.unfinished(ids):
                    if status in (None, TRANSIENT) or (status == "error" and job.retry_errors):
                        return None
    finally:
        journal.conn.close()
    return RunResult(ExitCode(summary.get("exit_code", 0)), summary, job.output)


def result(
    job: Job, setup: ClusterSetup, done: dict[str, Any], started_at: float, command: str, observer: Observer
) -> RunResult:
    counts = done["counts"]
    stats = Stats(
        ok=counts.get("ok", 0),
        error=counts.get("error", 0),
        invalid=counts.get("invalid", 0),
        rejected=counts.get("rejected", 0),
        requests=counts.get("requests", 0),
        retries=counts.get("retries", 0),
        throttled=counts.get("throttled", 0),
        prompt_tokens=counts.get("prompt_tokens", 0),
        completion_tokens=counts.get("completion_tokens", 0),
        cost_pico=counts.get("cost_pico", 0),
    )
    totals = _totals(job.output, done["totals"])
    reason = message = None
    if done["stop"] is not None:
        reason, message = StopReason(done["stop"][0]), done["stop"][1]
        if reason is StopReason.BUDGET:
            message = _budget_message(job, done)
        observer.stopped(reason.value, message)
    if reason is not None:
        code = STOP_EXIT[reason]
    elif totals.failed:
        code = ExitCode.ROW_ERRORS
    else:
        code = ExitCode.OK
    warnings = []
    lost, lost_pico = done["lost_before"]
    if lost:
        warnings.append(
            f"an earlier run stopped with {plural(lost, 'request')} in flight and no saved reply: they may have "
            f"been billed (at most {format_usd(lost_pico)}); they are sent again"
        )
        observer.warning(warnings[-1])
    # The coordinator has closed the journal: the advice after a budget stop is kept in it.
    journal = Journal.open(job.journal_dir, job.request_settings())
    try:
        summary = build_summary(
            setup, totals, stats, reason, message, started_at, code, warnings, journal, command
        )
        if journal.get_meta(SANDBOX_ANSWERS):  # marked before the run sent (opening.py)
            summary["play_money"] = True
        if not summary["complete"]:
            summary["next"] = next_step(reason, run_cap=bool(done["run_cap_reached"]))
            if reason is StopReason.BUDGET and not done["run_cap_reached"]:
                # Rows answered by a request of their own: the journal's (copies are output rows).
                paid = done["totals"]["ok"] + done["totals"]["invalid"]
                cap_advice(
                    summary, totals, paid, done["spent_pico"], done["refused_pico"], command, journal,
                    job.max_cost_pico,
                )  # fmt: skip
    finally:
        journal.close()
    if job.fleet is not None:
        summary["endpoints"] = endpoints(counts, [e.name for e in job.fleet])
    summary["engine"] = {
        "name": "ray",
        "actors": job.actors,
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    }
    text = orjson.dumps(summary, option=orjson.OPT_INDENT_2)
    write_atomic(
        job.output / SUMMARY_NAME, text, "--output"
    )  # what `report` reads, as from a file's metadata
    if job.summary_json is not None:
        write_atomic(job.summary_json, text, "--summary-json")
    return RunResult(code, summary, job.output)


def _totals(output: Path, journal_totals: dict[str, int]) -> Totals:
    """Row counts from the output's status column; tokens and costs, exact, from the journal."""
    totals = Totals()
    table = pq.read_table(output, columns=["status", "truncated"])
    statuses = table.column("status").to_pylist()
    totals.rows = len(statuses)
    totals.ok = statuses.count("ok")
    totals.error = statuses.count("error")
    totals.invalid = statuses.count("invalid")
    totals.pending = statuses.count("pending")
    totals.truncated = sum(1 for t in table.column("truncated").to_pylist() if t)
    totals.prompt_tokens = journal_totals["prompt_tokens"]
    totals.completion_tokens = journal_totals["completion_tokens"]
    totals.input_cost_pico = journal_totals["input_cost_pico"]
    totals.output_cost_pico = journal_totals["output_cost_pico"]
    totals.unpriced = journal_totals["unpriced"]
    totals.priced = journal_totals["ok"] - journal_totals["unpriced"]
    return totals


def _budget_message(job: Job, done: dict[str, Any]) -> str:
    if done["run_cap_reached"]:
        return (
            f"budget reached: this run has spent {format_usd(done['spent_run_pico'])} of its "
            f"{format_usd(job.max_cost_per_run_pico or 0)} cap (--max-cost-per-run); the next run continues"
        )
    return (
        f"budget reached: this output has cost {format_usd(done['spent_pico'])} of the "
        f"{format_usd(job.max_cost_pico or 0)} cap; run again with a higher --max-cost to continue"
    )


def endpoints(counts: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """A fleet's summary lines from the actors' counters (worker.py, ``_endpoint_counts``)."""
    out = {}
    for name in names:
        fields = {f.name: counts.get(f"endpoint/{name}/{f.name}", 0) for f in dataclasses.fields(Counts)}
        out[name] = Counts(**fields).describe()
    return out
