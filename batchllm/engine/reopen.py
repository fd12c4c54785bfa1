"""Opening a run's journal: what an earlier run left in it, said as warnings (requests in flight
with no saved reply, replies it could not write to the journal, rows done without a price, which
are priced now; what ``--restart`` discards), and this run's start recorded as ``last_run``
(``status`` reads it).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import JobError
from ..job import Job
from ..ledger import Sent, Snapshot
from ..pricing import Prices, cached_saving, format_usd
from . import outside
from .checks import Prepared
from .client import Client
from .counts import plural
from .journal import DB_NAME, Journal
from .journal_schema import SANDBOX_ANSWERS
from .output import read_summary

DISCARDED = "discarded_by_restart"  # meta: the totals of the journal --restart replaced


def open_journal(p: Prepared, warn: Callable[[str], None]) -> tuple[Journal, tuple[int, int]]:
    """The run's journal, open, and the requests an earlier run left in flight and their worst
    case (inflight.py)."""
    job = p.job
    before = _totals(job) if job.restart else None  # what --restart discards, read once
    if discarded := restart_notice(job, before):
        warn(discarded)
    if not job.restart and not (job.journal_dir / DB_NAME).is_file():
        refuse_orphaned_output(job)
    journal = Journal.open(job.journal_dir, job.request_settings(), restart=job.restart, relabel=job.reparse)
    if before is not None:  # the ledger's killed runs of it are measured against it (take_discarded)
        journal.set_meta(DISCARDED, before)
    lost, lost_pico = journal.start_inflight()
    outside.on_open(journal, job.input)
    estimate = journal.get_meta("estimate")  # of another input: no figure to compare this run with
    if estimate and (estimate.get("input") != str(job.input) or estimate.get("rows") != p.rows):
        journal.conn.execute("DELETE FROM meta WHERE key = 'estimate'")
    if lost:
        warn(
            f"an earlier run stopped with {plural(lost, 'request')} in flight and no saved reply: they may have "
            f"been billed (at most {format_usd(lost_pico)}); they are sent again"
        )
    if journal.discarded is not None:
        failed, diffs = journal.discarded
        warn(
            f"discarded the {plural(failed, 'failed row')} of {job.journal_dir} written with other "
            f"settings ({diffs}): nothing in it was answered or paid for; sent again with these"
        )
    if journal.resized is not None:
        old, new, reweighed = journal.resized
        answered = _answered(journal)
        again = (
            f"; {plural(reweighed, 'row')} refused over the context window weighed again" if reweighed else ""
        )
        cut = journal.conn.execute(
            "SELECT COUNT(*) FROM rows WHERE status = 'invalid' AND truncated"
        ).fetchone()[0]
        cut_note = (
            f"; {plural(cut, 'invalid row')} cut at {old:,}: --retry-errors sends them at {new:,}"
            if cut
            else ""
        )
        warn(
            f"max_tokens is {new:,}, the journal's was {old:,}: its {plural(answered, 'answered row')} "
            f"keep their replies, the rows sent now use {new:,}{again}{cut_note} (--restart sends "
            "every row again, paid again)"
        )
    if journal.imported:
        warn(f"imported {journal.imported:,} replies an earlier run could not write to the journal")
    prices = p.model.prices
    if prices is not None and (
        priced := journal.price_unpriced(prices.input_pico, prices.output_pico, prices.cached_input_pico)
    ):
        warn(f"priced the {priced:,} rows done earlier without a price at this run's prices")
    if changed := price_change(journal, prices):
        warn(changed)
    return journal, (lost, lost_pico)


def record_run(p: Prepared, journal: Journal, command: str, started_at: float, kind: str = "run") -> None:
    """This run, as ``status`` reads it (its command is the one to resume with): written once
    nothing refuses it (``refuse_mixed_answers``), so a refused command never replaces the last
    good one. ``kind``: a run, a pilot (``status`` says how its rest is sent)..."""
    job, prices = p.job, p.model.prices
    journal.set_meta(
        "last_run",
        {
            "command": command,
            "kind": kind,
            "input": str(job.input),
            "input_rows": p.rows,
            "started_at": started_at,
            "retry_errors": job.retry_errors,  # ``status`` adds it to the command only if not set
            # What a cached prompt token costs less (``status`` prices the saving).
            "cached_discount_pico": cached_saving(prices, 1) if prices is not None else None,
            "prices": prices.as_dict() if prices is not None else None,
        },
    )


def price_change(journal: Journal, prices: Prices | None) -> str | None:
    """Said when this run's prices differ from the last run's on a journal with answered rows:
    their costs stay what they were (what was billed then), the rows answered now cost these, so
    the output's total mixes both."""
    last = journal.get_meta("last_run") or {}
    before = Prices.from_dict(last.get("prices"))
    answered = _answered(journal)
    if before is None or prices is None or before == prices or not answered:
        return None
    return (
        f"prices changed since the last run ({_per_million(before)} -> {_per_million(prices)}): "
        f"the {plural(answered, 'row')} answered before keep their costs, the rows answered now "
        "cost the new prices"
    )


def _per_million(prices: Prices) -> str:
    cached = prices.cached_input_per_million
    return (
        f"${prices.input_per_million} in / ${prices.output_per_million} out"
        + ("" if cached is None else f" / ${cached} cached")
        + " per million tokens"
    )


def answers_mark(journal: Journal, mark: Callable[[bool], None], declared: bool) -> Callable[[bool], None]:
    """``mark`` (the ledger's), and the journal's own: whether the answers in it are batchllm's
    sandbox's (play money) or a real server's, as the run's servers answer for the first time
    (client.py ``watch_played``; ``declared``: a ``--sandbox`` run, whose built-in sandbox is
    known without its answers' mark). ``refuse_mixed_answers`` reads it on the next run."""

    def both(played: bool) -> None:
        played = played or declared
        mark(played)
        if journal.get_meta(SANDBOX_ANSWERS) != played:
            journal.set_meta(SANDBOX_ANSWERS, played)

    return both


async def refuse_mixed_answers(journal: Journal, clients: list[Client], output: Path, declared: bool) -> None:
    """Refuse a run whose servers are batchllm's sandbox when the journal holds a real server's
    answers, or the other way round, or a fleet of both: an output's answers are all play money or
    all real. A served sandbox (``batchllm sandbox``) is found by asking it (``identify``) before
    anything is sent; a public host is never the sandbox; ``declared``: ``--sandbox``. A journal
    written before the mark is not checked."""
    await asyncio.gather(*(c.identify() for c in clients))
    kinds = [
        (c, True if declared else c.played if c.played is not None or c.local else False) for c in clients
    ]
    play, real = [c for c, k in kinds if k is True], [c for c, k in kinds if k is False]
    if play and real:
        raise JobError(
            f"the fleet mixes batchllm's sandbox ({_hosts(play)}) with real servers ({_hosts(real)}): "
            f"play answers would mix with real ones in {output}; run them as two fleets"
        )
    before = journal.get_meta(SANDBOX_ANSWERS)
    answered = _answered(journal)
    now = bool(play) if play or real else None  # None: servers here that did not say what they are
    # Paid with no row answered (replies refused as changed, counted in the output's cost): theirs too.
    if before is None or now is None or now == before or not (answered or journal.spent_pico()):
        return
    rows = plural(answered, "answered row") if answered else "replies paid for"
    if before:
        raise JobError(
            f"{output} holds {rows} from batchllm's sandbox (play money, not the model's answers); "
            f"the server at {_hosts(real)} is not the sandbox, and its answers would mix with them. Give "
            "another -o, or --restart to send every row to it"
        )
    raise JobError(
        f"{output} holds {rows} from a real server, and the server at {_hosts(play)} is batchllm's "
        "sandbox: its play answers would mix with them. Give another -o for the sandbox's answers"
    )


def imported_answers_are_real(journal: Journal, output: Path, answers: bool) -> None:
    """A batch API's results are a real server's answers: refuse to put them beside the
    sandbox's, and mark the journal as holding real ones, so a served sandbox run on the same
    output after the import is refused as it is after a real run (``refuse_mixed_answers``).
    Refused, the journal is closed: the import stops before anything of it is read."""
    answered = _answered(journal)
    if journal.get_meta(SANDBOX_ANSWERS) and answered:
        journal.close()
        raise JobError(
            f"{output} holds {plural(answered, 'answered row')} from batchllm's sandbox (play money, not the "
            "model's answers): the batch's real answers would mix with them. Give another -o"
        )
    if answers and journal.get_meta(SANDBOX_ANSWERS) is not False:
        journal.set_meta(SANDBOX_ANSWERS, False)


def _answered(journal: Journal) -> int:
    """The rows the journal held answered (ok or invalid) when this run opened it."""
    return journal.counts_before.get("ok", 0) + journal.counts_before.get("invalid", 0)


def _hosts(clients: list[Client]) -> str:
    """The servers' hosts and ports (a URL may carry a user and password: never said)."""
    parts = [urlsplit(c.url) for c in clients]
    return ", ".join(dict.fromkeys(f"{u.hostname}:{u.port}" if u.port else str(u.hostname) for u in parts))


def refuse_orphaned_output(job: Job) -> None:
    """An output holding answers whose journal is gone (deleted as clutter, or the output copied
    without it): a run would send every row again, paid again, and write over them. Refused;
    ``--restart`` says that is meant."""
    summary = (read_summary(job.output) if job.output.exists() else None) or {}
    rows = summary.get("rows") or {}
    answered = int(rows.get("ok") or 0) + int(rows.get("invalid") or 0)
    if not answered:
        return
    paid = (summary.get("cost_usd") or {}).get("total")
    raise JobError(
        f"{job.output} holds {plural(answered, 'answered row')}"
        + (f" (${paid} paid)" if paid else "")
        + f" but its journal {job.journal_dir} is gone: this run would send every row again and "
        "write over them. Give another -o, or --restart to send them all again"
    )


def sandbox_answered(directory: Path) -> bool:
    """Did batchllm's sandbox answer into the journal in ``directory`` (``answers_mark``)?"""
    if not (directory / DB_NAME).is_file():
        return False
    journal = Journal.open_readonly(directory)
    try:
        return bool(journal.get_meta(SANDBOX_ANSWERS))
    finally:
        journal.conn.close()


def killed_sent(journal: Journal) -> Sent:
    """What the ledger closes the records of the output's killed runs with (ledger/recover.py):
    what the journal shows they sent, the journal a --restart discarded, and when the journal
    was made (a killed run older than it wrote in a journal since deleted)."""
    return Sent(
        journal.dead_sent, journal.requests_between, journal.cost_between, take_discarded(journal),
        journal.get_meta("created_at"),
    )  # fmt: skip


def take_discarded(journal: Journal) -> Snapshot | None:
    """The totals of the journal this run's ``--restart`` discarded, once (the run's start
    closes the ledger records of killed runs against them: ledger/recover.py)."""
    before = journal.get_meta(DISCARDED)
    if before is None:
        return None
    journal.conn.execute("DELETE FROM meta WHERE key = ?", (DISCARDED,))
    return Snapshot.of(before)


def _totals(job: Job) -> dict[str, int] | None:
    """The totals of the output's journal as it is (None: none, or unreadable)."""
    if not (job.journal_dir / DB_NAME).is_file():
        return None
    try:
        journal = Journal.open_readonly(job.journal_dir)
    except (JobError, sqlite3.Error):  # unreadable: discarded all the same, with nothing to say of it
        return None
    try:
        totals = journal.totals()  # its costs: rows', and what rows sent again paid before (spend.py)
        maybe = journal.maybe_billed()  # and what requests without a saved reply may have cost
        return {**totals, "maybe_requests": maybe["requests"], "maybe_pico": maybe["worst_pico"]}
    except sqlite3.Error:
        return None
    finally:
        journal.conn.close()


def restart_notice(job: Job, totals: dict[str, int] | None = None) -> str | None:
    """What ``--restart`` is about to discard, when the journal holds answered rows: they were
    paid for, and ``--max-cost`` (which counts the whole output's cost) counts from $0 again.
    ``totals``: the journal's, read already (else read here)."""
    if not job.restart or (t := totals or _totals(job)) is None:
        return None
    answered, paid = t["ok"] + t["invalid"], t["input_cost_pico"] + t["output_cost_pico"]
    maybe, maybe_pico = t.get("maybe_requests", 0), t.get("maybe_pico", 0)
    if not answered and not maybe:
        return None
    unsaved = (
        f"up to {format_usd(maybe_pico)} maybe billed for {plural(maybe, 'request')} with no saved reply"
    )
    if not answered:
        what = f"the journal of {job.output} ({unsaved}"
    else:
        besides = f", and {unsaved}" if maybe else ""
        what = f"{plural(answered, 'answered row')} of {job.output} ({format_usd(paid)} already paid for them{besides}"
    return f"--restart: discarding {what}; --max-cost counts from $0 again)"
