"""What a stopped run leaves to do besides its pending rows: the rows the journal holds an entry
for that the same command sends again.

A row the run was asked to send again keeps its entry until its new reply replaces it
(plan.py), so a run stopped halfway (a budget, a deadline, an interrupt) leaves those rows
looking done: ``invalid`` or ``error`` under ``--retry-errors``, ``ok`` with an input changed
since under ``--refresh-changed``, and a server's failure (5xx, a timeout) whatever the flags.
Counted as pending, they are what the summary says is left, what the cap after a budget stop
must pay for (budget.advice), and what ``status`` says is not done (kept in the journal's
``last_run`` until the next run starts, as the budget advice is).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..job import Job
    from .journal import Journal
    from .output import Totals

AGAIN = "again"  # key in the journal's ``last_run``: the rows a stopped run left to send again


def again(totals: Totals, job: Job) -> int:
    """The rows with an entry that the same command sends again. Rows refused before sending (no
    prompt, over the context window) are left out: a run refuses them again, at no cost."""
    rows = totals.transient  # the server's failures: every run sends them again
    if job.retry_errors:
        rows = totals.invalid + totals.error - totals.no_prompt - totals.over_window
    if job.refresh_changed:
        rows += totals.changed
    return rows


def note(journal: Journal, rows: int) -> None:
    """Keep what a stopped run left to send again for ``status`` (reports/status.py)."""
    last = journal.get_meta("last_run") or {}
    if last.get(AGAIN, 0) != rows:
        journal.set_meta("last_run", {**last, AGAIN: rows})
