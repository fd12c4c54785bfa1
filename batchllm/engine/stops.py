"""Why a run stopped, said once: the exit code of each stop, the one line that says what
stopped it (figures exact, from the budget and the journal), and what to do before running the
same command again. The summary (summary.py) carries all three.
"""

from __future__ import annotations

from ..errors import ExitCode
from ..job import Job
from ..pricing import format_usd
from ..providers import Provider
from .budget import Budget
from .dispatch import Dispatcher, StopReason
from .inflight import causes
from .journal import RESCUE_NAME, Journal

__all__ = ["STOP_EXIT", "next_step", "stop_message"]

STOP_EXIT = {  # how a stop ends the process (errors.ExitCode)
    StopReason.INTERRUPTED: ExitCode.INTERRUPTED,
    StopReason.API: ExitCode.API_STOP,
    StopReason.ERROR_RATE: ExitCode.API_STOP,
    StopReason.BUDGET: ExitCode.BUDGET,
    StopReason.RUNTIME: ExitCode.TEMPFAIL,
    StopReason.JOURNAL: ExitCode.IO_ERROR,
}


def stop_message(
    reason: StopReason,
    dispatcher: Dispatcher,
    budget: Budget,
    job: Job,
    journal: Journal,
    provider: Provider,
    key_source: str,
) -> str:
    """One line saying why the run stopped and what to do next."""
    if reason is StopReason.BUDGET and budget.month is not None and budget.month_reached:
        month = budget.month
        others, this_run, cap = month.used_by_others, budget.spent_run, month.cap_pico
        if month.sandbox:  # play money: the real month's runs, and this run against itself
            whose = (
                f"job {month.job!r}: its real runs have spent or hold {format_usd(others)} of its "
                f"{format_usd(cap)} cap this month and this sandbox run {format_usd(this_run)} "
                "(--max-cost-per-month; play money counts in no cap but its own)"
            )
        else:
            whose = (
                f"job {month.job!r} has spent or holds {format_usd(others + this_run)} of its "
                f"{format_usd(cap)} cap this month (--max-cost-per-month; this run {format_usd(this_run)})"
            )
        refused = budget.refused
        nxt = (
            f"; the next request may cost up to {format_usd(refused)}, more than the "
            f"{format_usd(max(0, cap - others - this_run))} left"
            if refused
            else ""
        )
        held = _held_by_killed(month.held_by_killed)
        return f"monthly budget reached: {whose}{held}{nxt}; the month resets {month.resets_at}"
    if reason is StopReason.BUDGET and budget.run_cap_reached:
        return (
            f"budget reached: this run has spent {format_usd(budget.spent_run)} of its "
            f"{format_usd(job.max_cost_per_run_pico or 0)} cap (--max-cost-per-run); the next run continues"
        )
    if reason is StopReason.BUDGET:
        lost = journal.maybe_billed(current=False)
        worst, cap = lost["worst_pico"], job.max_cost_pico or 0
        refused = budget.refused
        over = budget.margin and (  # the server counts more prompt tokens than batchllm
            f"; replies cost up to {format_usd(budget.margin)} more than their worst case, so requests "
            "now reserve that much more"
        )
        if job.max_cost_pico is not None and refused > cap:  # no spending would ever make room
            return (
                f"budget reached: one request may cost up to {format_usd(refused)} (its prompt and "
                f"max_tokens at the prices), more than the whole {format_usd(cap)} cap; run again with "
                "a higher --max-cost (or a lower --max-tokens)"
            )
        return (
            f"budget reached: this output has cost {format_usd(budget.spent - worst)}"
            + (f" and {causes(lost)} may have been billed up to {format_usd(worst)} more," if worst else "")
            + f" of the {format_usd(cap)} cap"
            + (
                f"; the next request may cost up to {format_usd(refused)}, more than the "
                f"{format_usd(max(0, cap - budget.spent))} left"
                if refused
                else ""
            )
            + (over or "")
        )
    if reason is StopReason.API and dispatcher.stop_error is not None:
        return provider.advice(dispatcher.stop_error, key_source)
    if reason is StopReason.JOURNAL:
        unsaved = len(journal.unsaved)
        return (
            f"cannot write the journal in {journal.directory} ({journal.write_error}): stopped sending; "
            f"{journal.rescued:,} replies were saved to {journal.directory / RESCUE_NAME} and the next run "
            "imports them" + (f"; {unsaved:,} replies could not be saved anywhere" if unsaved else "")
        )
    return dispatcher.stop_message or reason.value


def _held_by_killed(held: list[tuple[str, int]]) -> str:
    """What runs killed before recording their spend hold of the month, and how to settle it."""
    if not held:
        return ""
    named = ", ".join(f"{output} ({format_usd(pico)})" for output, pico in held[:3])
    if len(held) > 3:
        named += f" and {len(held) - 3:,} more (batchllm spend --runs lists them)"
    if len(held) == 1:
        output = held[0][0]
        return (
            f"; of that, {format_usd(held[0][1])} is held by a run of {output} that was killed before "
            f"it recorded what it spent: running that output again (batchllm run ... -o {output}) "
            "records it and settles its claim"
        )
    return (
        f"; of that, {format_usd(sum(p for _, p in held))} is held by runs killed before they recorded "
        f"what they spent, of {named}: running each output again (batchllm run ... -o OUTPUT) "
        "records it and settles its claim"
    )


def next_step(
    reason: StopReason | None, *, run_cap: bool = False, quota: bool = False, month: bool = False
) -> str:
    """What the person should do before running the command again (said with the command):
    ``run_cap``, the budget that stopped it was --max-cost-per-run's; ``month``,
    --max-cost-per-month's; ``quota``, the API's."""
    if reason is StopReason.BUDGET:
        if month:
            return "when the month resets (or with a higher --max-cost-per-month), run the same command again"
        if run_cap:
            return "the next run continues"
        return "to continue, run it with a higher --max-cost"
    if reason is StopReason.ERROR_RATE:  # the same command would pay for the same failures again
        return "once the cause in the error column is fixed (or with a higher --max-error-rate), run it again"
    if reason is StopReason.API:
        if quota:
            return "once the quota resets or is raised, run the same command again"
        return "once the cause above is fixed, run the command again"
    if reason is StopReason.JOURNAL:
        return "once there is room on the disk, run the same command again"
    return "to resume, run the same command again"
