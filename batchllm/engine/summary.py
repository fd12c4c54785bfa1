"""What a run says when it ends: the summary (JSON; the text a person reads is summary_text.py)
and stop advice.

The summary is built from the output's exact totals (output.py) and this run's counters
(dispatch.py); it is stored in the output file's metadata, printed, and written by
``--summary-json``. Money stays exact: every figure is formatted from integer picodollars.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import ExitCode
from ..pricing import usd_text
from ..tokens import counter_for
from .budget import Budget, advice
from .client import all_played
from .counts import plural
from .dispatch import Dispatcher, Stats, StopReason
from .journal import Journal
from .journal_schema import SANDBOX_ANSWERS
from .left import again, note
from .output import Totals
from .ratelimit import RateLimiter
from .stops import next_step

if TYPE_CHECKING:
    from .checks import Prepared
    from .plan import Setup
    from .reuse import Reuse


def build_summary(
    p: Prepared | Setup,
    totals: Totals | None,
    stats: Stats,
    reason: StopReason | None,
    message: str | None,
    started_at: float,
    code: ExitCode | None,
    warnings: list[str],
    journal: Journal,
    command: str,
) -> dict[str, Any]:
    job, model = p.job, p.model
    finished = time.time()
    if message is None and code == ExitCode.ROW_ERRORS and totals is not None:
        # Said in the summary and the ledger (`spend`), in the words of the "done" line.
        failed, invalid, empty = totals.failed - totals.invalid, totals.invalid, totals.no_prompt
        message = (
            ", ".join(
                ([f"{plural(failed, 'row')} failed"] if failed else [])
                + ([f"{plural(invalid, 'row')} invalid"] if invalid else [])
                + ([f"{empty:,} without a prompt (not sent)"] if empty else [])
            )
            + " (see the error column)"
            + totals.refused_advice(job.labeling, job.max_tokens)
            + (
                f"; {plural(totals.transient, 'row')} failed for the server's reasons (5xx, timeouts, "
                "no connection): the same command sends them again"
                if totals.transient
                else ""
            )
        )
    priced = model.prices is not None
    out: dict[str, Any] = {
        "batchllm_version": __version__,
        "job": job.name,
        "input": str(job.input),
        "output": str(job.output),
        "checkpoint": str(job.journal_dir.absolute()),  # found from anywhere (status OUT)
        "provider": p.provider.name,
        "model": model.name,
        "settings": job.request_settings(),
        "prices": model.prices.as_dict() if model.prices else None,
        "complete": reason is None and (totals is None or totals.pending == 0),
        "stop_reason": reason.value if reason else None,
        "message": message,
        "started_at": _iso(started_at),
        "finished_at": _iso(finished),
        "duration_s": round(finished - started_at, 3),
        "this_run": {
            "rows_sent_ok": stats.ok,
            "rows_failed": stats.error,
            "rows_invalid": stats.invalid,
            "rows_rejected_unsent": stats.rejected,
            "requests": stats.requests,
            "retries": stats.retries,
            "throttled": stats.throttled,
            "prompt_tokens": stats.prompt_tokens,
            "completion_tokens": stats.completion_tokens,
            "cached_tokens": stats.cached_tokens,
            "cached_saved_usd": usd_text(stats.cached_saved_pico if priced else None),
            "cost_usd": usd_text(stats.cost_pico if priced else None),
        },
        "warnings": warnings,
    }
    if estimate := journal.get_meta("estimate"):
        out["estimate"] = estimate
    lost = journal.maybe_billed()
    if lost["requests"]:
        out["maybe_billed"] = {"requests": lost["requests"], "worst_case_usd": usd_text(lost["worst_pico"])}
    if totals is not None:
        left = 0 if reason is None else again(totals, job)  # left as pending rows are (left.py)
        if reason is not None:
            note(journal, left)
        out["rows"] = {
            "total": totals.rows,
            "ok": totals.ok,
            "error": totals.error,
            "invalid": totals.invalid,
            "no_prompt": totals.no_prompt,  # of the errors: never sent, nothing to ask
            "over_window": totals.over_window,  # of the errors: never sent, max_tokens too high
            "transient": totals.transient,  # of the errors: the server's, the next run sends them
            # What to alert on: errors and invalid rows a rerun may mend (--retry-errors), not the
            # rows with no prompt, which leave the exit code 0 (output.py ``Totals.failed``).
            "failed": totals.failed,
            "pending": totals.pending,
            "to_send_again": left,  # a stopped run's rows it was asked to send again (left.py)
            "truncated": totals.truncated,
            "from_cache": totals.from_cache,
            "answered_by_identical_rows": totals.copied,
        }
        out["tokens"] = {
            "prompt": totals.prompt_tokens,
            "completion": totals.completion_tokens,
            "total": totals.prompt_tokens + totals.completion_tokens,
            # Of the prompt tokens, served from the server's prompt cache, and what that saved:
            # each row at the prices it was answered at (live, a batch's, a fleet endpoint's).
            "cached": totals.cached_tokens,
            "cached_saved_usd": usd_text(
                totals.cached_saved(None if job.fleet else model.prices) if priced or totals.priced else None
            ),
        }
        if totals.counted:  # the server reported no usage for them: their figures are batchllm's count
            out["tokens"]["counted_rows"] = totals.counted
            out["tokens"]["counted_exactly"] = counter_for(model.name).exact
        # Unknown, not $0, when the model has no price and no row brought one (a batch import can).
        known = priced or totals.priced > 0
        out["cost_usd"] = {
            "input": usd_text(totals.cost_or_none(totals.input_cost_pico) if known else None),
            "output": usd_text(totals.cost_or_none(totals.output_cost_pico) if known else None),
            "total": usd_text(totals.cost_or_none(totals.cost_pico) if known else None),
        }
        if gone := totals.outside:  # paid for, in the journal, not rows of this input (outside.py)
            out["outside_input"] = {
                "rows": gone.rows,
                "prompt_tokens": gone.prompt_tokens,
                "completion_tokens": gone.completion_tokens,
                "cost_usd": usd_text(gone.cost_pico if known else None),
                "paid_in_all_usd": usd_text(
                    totals.cost_or_none(totals.cost_pico + gone.cost_pico) if known else None
                ),
            }
    if job.max_cost_pico is not None:
        out["max_cost_usd"] = usd_text(job.max_cost_pico)
    if job.max_cost_per_run_pico is not None:
        out["max_cost_per_run_usd"] = usd_text(job.max_cost_per_run_pico)
    if job.max_cost_per_month_pico is not None:
        out["max_cost_per_month_usd"] = usd_text(job.max_cost_per_month_pico)
    if code is not None:
        out["exit_code"] = int(code)
    if not out["complete"]:
        out["resume"] = command
    return out


def cap_advice(
    out: dict[str, Any],
    totals: Totals,
    paid_rows: int,
    spent_pico: int,
    refused_pico: int,
    command: str,
    journal: Journal,
    cap_pico: int | None,
) -> None:
    """After a --max-cost stop, the summary's next step: the command with a cap over
    ``cap_pico`` that finishes the rows left, pending and to send again (budget.advice), kept in
    the journal for ``status`` until the next run starts (reopen.py). ``paid_rows``: the rows
    answered by a request of their own."""
    rows = totals.pending, out["rows"]["to_send_again"]
    found = advice(spent_pico, refused_pico, rows, totals.cost_pico, paid_rows, command, cap_pico)
    if found is not None:
        out["next"], out["resume"] = found
        journal.set_meta(
            "last_run", {**(journal.get_meta("last_run") or {}), "next": found[0], "resume": found[1]}
        )


def run_summary(
    p: Prepared,
    totals: Totals | None,
    code: ExitCode | None,
    dispatcher: Dispatcher,
    reason: StopReason | None,
    budget: Budget,
    reuse: Reuse | None,
    started_at: float,
    warnings: list[str],
    journal: Journal,
    command: str,
) -> dict[str, Any]:
    """A local run's summary: ``build_summary`` with what only its live parts know (the next
    step after a stop, each fleet endpoint's counts, the concurrency window, rows reused)."""
    out = build_summary(
        p,
        totals,
        dispatcher.stats,
        reason,
        dispatcher.stop_message,
        started_at,
        code,
        warnings,
        journal,
        command,
    )
    if not out["complete"]:
        stop = dispatcher.stop_error
        quota = stop is not None and stop.reason == "quota"
        out["next"] = next_step(
            reason, run_cap=budget.run_cap_reached, quota=quota, month=budget.month_reached
        )
        if (
            reason is StopReason.BUDGET
            and totals is not None
            and not budget.month_reached
            and not budget.run_cap_reached
        ):
            paid = totals.ok + totals.invalid - totals.from_cache - totals.copied
            cap_advice(out, totals, paid, budget.spent, budget.refused, command, journal, budget.cap)
    if dispatcher.router is not None:
        out["endpoints"] = dispatcher.router.summary()
    clients = [m.client for m in dispatcher.router.members] if dispatcher.router else [dispatcher.client]
    if all_played(clients) or journal.get_meta(SANDBOX_ANSWERS):  # its answers now or before
        out["play_money"] = True
    if (w := dispatcher.window) is not None:
        out["concurrency"] = {"ceiling": w.ceiling, "server_slots": w.hint, "last": w.limit, "peak": w.peak,
                              "most_in_flight": dispatcher.most_on_wire,
                              "held_the_pace": held_the_pace(dispatcher)}  # fmt: skip
    if reuse is not None:
        out["this_run"].update(
            answered_by_other_rows=reuse.copies,
            cache_hits=reuse.hits,
            cache_saved_usd=usd_text(reuse.saved_pico),
        )
    return out


def held_the_pace(dispatcher: Dispatcher) -> bool:
    """Did --concurrency, not the rate, set the run's pace? Every place it allowed was in use and
    requests left well under the rate the limiter kept: at these round trips, more in flight would
    have gone faster. Judged over at least two windows' worth of requests, a single endpoint's."""
    w, limiter, stats = dispatcher.window, dispatcher.limiter, dispatcher.stats
    rate = limiter.rate if isinstance(limiter, RateLimiter) else None  # a cluster's lease: not here
    if w is None or rate is None or dispatcher.router is not None or stats.requests < 2 * w.ceiling:
        return False
    per_minute = stats.requests / max(time.monotonic() - stats.started, 1e-9) * 60.0
    return dispatcher.most_on_wire >= w.ceiling and per_minute < 0.8 * rate


def snapshot(s: Stats) -> dict[str, Any]:
    """This run's counters for the progress display."""
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
