"""Closing the ledger records of killed runs when the next run of their output starts.

A run killed before ``RunRecord.finish`` leaves its record open, with its last progress (rows,
requests, tokens and cost, written every second: record.py ``PROGRESS_EVERY``). The next run of
the same output holds the output's lock, so every open record of it is a run that died, and
``recover`` closes each from the output's journal: runs of one output never overlap, so a killed
run's part is what the journal gained between its start and the start of the run after it.

That needs the journal the killed run wrote in. ``--restart`` replaces it, and keeps its totals
for this (``Sent.discarded``); a user starting over may delete it (``rm -rf OUTPUT*``), and the
journal found then is a new one, which gained nothing while the killed run ran: measured against
it, a run that paid for replies would cost $0.00. Such a run (it started before the journal now
was made, ``Sent.made_at``) keeps what its record knew, its last progress, and says so: its cost
is a lower bound (up to a second of replies, and its requests in flight, are not in it).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import NamedTuple

from ..pricing import format_usd
from .store import Snapshot

RECOVERED = "killed: recorded from the journal by the next run of its output"
# A killed run whose journal was gone: its figures are its last progress (spend says "at least").
GONE = "killed: its journal was gone"


class Sent(NamedTuple):
    """What an output's journal shows its killed runs sent (engine/reopen.py): ``last``, the
    requests the last one wrote down in its in-flight log (engine/inflight.py: exact; None when it
    left no log), and ``between``, the requests the entries finished between two times took (a
    floor: a packed request counts once for each of its rows)."""

    last: int | None = None
    between: Callable[[float, float], int] | None = None
    # What the entries finished between two times cost now: a finished run's rows done without a
    # price and priced by the run starting now (engine/reopen.py) have a cost (``reprice``).
    cost_between: Callable[[float, float], int] | None = None
    # The journal a --restart discarded as the run starting now began: what the last killed run
    # is measured against (the new journal starts empty, and would give it nothing).
    discarded: Snapshot | None = None
    # When the journal now was made (its meta ``created_at``; None: not known): a killed run
    # that started before it, and whose next run started after it, wrote in a journal since gone.
    made_at: float | None = None


UNKNOWN = Sent()  # nothing known beyond the runs' own progress


def gone_message(cost_pico: int, priced: bool) -> str:
    """The message of a killed run closed from its last progress, its journal gone."""
    cost = f"at least {format_usd(cost_pico)}" if priced else "cost unknown (no price)"
    return f"{GONE} when the next run of its output started; {cost}, as last recorded"


def recover(
    conn: sqlite3.Connection,
    checkpoint: str,
    now: Snapshot,
    lost: tuple[int, int],
    by: str,
    sent: Sent = UNKNOWN,
) -> int:
    """Close the open records of killed runs of this output from its journal; how many.

    Called with the output's lock held, so every open record of it is a run that died.

    Runs of one output never overlap (the journal's lock), so each killed run's part is what the
    journal gained between its start and the start of the run after it; the last one also takes
    the requests the run starting now found in flight (they may have been billed). Its requests
    are what the journal shows it sent (``Sent``), never fewer than its last progress said.

    A killed run without prices whose rows the run starting now priced (engine/reopen.py prices
    every row done without a price) has a cost now: its part of the journal, priced.

    A killed run whose journal was gone by the next start (``Sent.made_at``, not a --restart,
    which kept its totals) keeps its last progress, marked (``GONE``). A run that recorded no
    progress (a Ray run, which makes its journal after its record) is measured as before.
    """
    open_ = conn.execute(
        "SELECT run_id, host, pid, pid_start, started_at, start_spent_pico, start_prompt_tokens, "
        "start_completion_tokens, start_ok, start_error, start_invalid, start_cached_tokens, start_cached_saved_pico, requests, "
        "cost_pico, priced FROM runs WHERE checkpoint = ? AND ended_at IS NULL ORDER BY started_at",
        (checkpoint,),
    ).fetchall()
    dead = open_  # the caller holds the output's lock: no run of it is alive
    if not dead:
        return 0
    later = conn.execute(
        "SELECT started_at, start_spent_pico, start_prompt_tokens, start_completion_tokens, start_ok, "
        "start_error, start_invalid, start_cached_tokens, start_cached_saved_pico FROM runs WHERE checkpoint = ? AND ended_at IS NOT NULL "
        "AND started_at > ? ORDER BY started_at",
        (checkpoint, dead[0][4]),
    ).fetchall()
    starts = sorted([(r[4], Snapshot(*r[5:13])) for r in dead] + [(r[0], Snapshot(*r[1:])) for r in later])
    now_at = time.time()
    for r in dead:
        began, start = r[4], Snapshot(*r[5:13])
        nxt = next(((t, s) for t, s in starts if t > began), (now_at, now))
        last = nxt[0] == now_at
        restarted = last and sent.discarded is not None
        gone = not restarted and sent.made_at is not None and began < sent.made_at <= nxt[0]
        if gone and (r[13] or r[14]):  # its progress is all that is left of what it paid
            conn.execute(
                "UPDATE runs SET ended_at = ?, message = ?, recovered_by = ? WHERE run_id = ?",
                (nxt[0], gone_message(int(r[14]), bool(r[15])), by, r[0]),
            )
            continue
        end = sent.discarded if restarted and sent.discarded is not None else nxt[1]
        delta = Snapshot(*(max(b - a, 0) for a, b in zip(start, end, strict=True)))
        requests = int(r[13])  # its last progress
        if last and sent.last is not None:
            requests = max(requests, sent.last)
        elif sent.between is not None:
            requests = max(requests, sent.between(began, nxt[0]))
        conn.execute(
            "UPDATE runs SET ended_at = ?, message = ?, rows_ok = ?, rows_error = ?, rows_invalid = ?, "
            "requests = ?, prompt_tokens = ?, completion_tokens = ?, cost_pico = ?, maybe_billed_requests = ?, "
            "maybe_billed_pico = ?, recovered_by = ?, priced = (priced OR ? > 0), cached_tokens = ?, cached_saved_pico = ? WHERE run_id = ?",
            (
                nxt[0], RECOVERED,
                delta.ok, delta.error, delta.invalid, requests, delta.prompt_tokens, delta.completion_tokens,
                delta.spent_pico, lost[0] if last else 0, lost[1] if last else 0, by, delta.spent_pico,
                delta.cached_tokens, delta.cached_saved_pico, r[0],
            ),
        )  # fmt: skip
    return len(dead)


def reprice(conn: sqlite3.Connection, checkpoint: str, sent: Sent) -> int:
    """Give finished runs of this output that had no prices the cost of their rows, which the
    run starting now priced (engine/reopen.py prices every row done without a price); how many.
    Runs of one output never overlap, so a run's rows are the entries finished while it ran."""
    if sent.cost_between is None:
        return 0
    done = 0
    for run_id, began, ended in conn.execute(
        "SELECT run_id, started_at, ended_at FROM runs WHERE checkpoint = ? AND priced = 0 "
        "AND ended_at IS NOT NULL",
        (checkpoint,),
    ).fetchall():
        pico = sent.cost_between(began, ended)
        if pico:
            conn.execute("UPDATE runs SET cost_pico = ?, priced = 1 WHERE run_id = ?", (pico, run_id))
            done += 1
    return done
