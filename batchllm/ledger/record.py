"""One run's record in the ledger (``RunRecord``) and its hold on the job's month
(``MonthAllowance``, ``--max-cost-per-month``); the file itself is store.py's."""

from __future__ import annotations

import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..errors import JobError
from ..pricing import parse_usd
from .recover import UNKNOWN, Sent, recover, reprice
from .store import MONTH_USED, Snapshot, connect, is_alive, ledger_path, month_bounds, proc_start

if TYPE_CHECKING:
    from ..job import Job

# Seconds between a running run's progress updates: what a killed run's open record (and the
# month's cap, until the next run of its output closes it) holds is at most this old.
PROGRESS_EVERY = 1.0
Part = tuple[str, str, str]  # provider, endpoint host, model


@dataclass
class MonthAllowance:
    """``--max-cost-per-month``: the part of the job's month this run holds.

    The budget (engine/budget.py) asks for more whenever a reservation would pass what it holds;
    each claim is one ``BEGIN IMMEDIATE`` transaction that counts every other run of the job this
    month (closed ones at their cost, open ones at their claim), so concurrent runs never hold
    more than the cap between them. A claim is taken in chunks, not one request at a time.
    """

    conn: sqlite3.Connection
    run_id: str
    job: str
    cap_pico: int
    month: tuple[float, float]
    sandbox: bool = False  # a sandbox run: its cap counts the real month and itself, never play money
    chunk_pico: int = 0  # claimed beyond the need each time: fewer transactions
    claimed: int = 0
    used_by_others: int = 0  # as of the last claim, for the stop message
    # As of the last refusal: what killed runs not recorded yet hold, by output (the stop message
    # names them: running such an output again closes the record and settles its claim).
    held_by_killed: list[tuple[str, int]] = field(default_factory=list)

    def extend(self, need_pico: int) -> bool:
        """Hold ``need_pico`` more of the month (and up to a chunk beyond); False if it does not fit."""
        conn = self.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                (others,) = conn.execute(MONTH_USED, self._month_used).fetchone()
                self.used_by_others = int(others)
                room = self.cap_pico - self.used_by_others - self.claimed
                if room < need_pico:
                    self.held_by_killed = killed_claims(conn, *self._month_used)
                    conn.execute("ROLLBACK")
                    return False
                grant = min(room, need_pico + self.chunk_pico)
                conn.execute(
                    "UPDATE runs SET claim_pico = ? WHERE run_id = ?", (self.claimed + grant, self.run_id)
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error:
            return False  # cannot be sure of the month: spend nothing more
        self.claimed += grant
        return True

    def claim_rest(self) -> int:
        """Hold all the month has left (Ray's runs cap themselves once, at the start); how much."""
        try:
            (others,) = self.conn.execute(MONTH_USED, self._month_used).fetchone()
        except sqlite3.Error:
            return 0
        room = max(0, self.cap_pico - int(others) - self.claimed)
        return room if room and self.extend(room) else 0

    @property
    def _month_used(self) -> tuple[Any, ...]:
        return (self.job, *self.month, self.run_id)

    @property
    def resets_at(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.month[1]))


def killed_claims(
    conn: sqlite3.Connection, job: str, since: float, until: float, run_id: str
) -> list[tuple[str, int]]:
    """The outputs of the job's real runs this month that were killed before they closed their
    record (``is_alive``) and hold part of its month (``MONTH_USED``: claim or progress), with
    what each holds, most first; the next run of such an output closes it (``recover``)."""
    found = conn.execute(
        "SELECT output, MAX(COALESCE(claim_pico, 0), cost_pico), host, pid, pid_start FROM runs "
        "WHERE job = ? AND started_at >= ? AND started_at < ? AND run_id != ? AND sandbox = 0 "
        "AND ended_at IS NULL ORDER BY 2 DESC",
        (job, since, until, run_id),
    ).fetchall()
    return [(output, int(held)) for output, held, *proc in found if held and not is_alive(*proc)]


class RunRecord:
    """One run's record in the ledger, from ``begin`` to ``finish``.

    Every write that fails is one warning (through ``warn``) and the record goes quiet: the
    ledger never stops a run, except that ``month_allowance`` raises when the cap cannot be
    checked.
    """

    def __init__(
        self, conn: sqlite3.Connection | None, run_id: str, path: Path | None, warn: Callable[[str], None]
    ) -> None:
        self.conn = conn
        self.run_id = run_id
        self.path = path
        self.warn = warn
        self.parts: Mapping[str, Part] = {}  # a fleet's endpoints: name -> provider, host, model
        self.own: Part = ("", "", "")  # the run's own provider, host and model
        self.sandbox = False  # against the built-in emulator: play money
        self.declared = False  # begun as play money (``--sandbox``): a served sandbox is found later
        self.month: MonthAllowance | None = None
        self.started_at = time.time()
        self._last_progress = time.monotonic()

    @classmethod
    def begin(
        cls,
        path: Path | None,
        *,
        kind: str,
        job: str,
        output: Path,
        checkpoint: Path,
        provider: str,
        endpoint: str,
        model: str,
        engine: str,
        rows_total: int | None,
        start: Snapshot,
        lost: tuple[int, int],
        warn: Callable[[str], None],
        month_cap_pico: int | None = None,
        parts: Mapping[str, Part] | None = None,
        sandbox: bool = False,
        priced: bool = True,
        sent: Sent = UNKNOWN,
    ) -> RunRecord:
        """Write the record of a run starting now, after closing the records of earlier runs of
        the same output that were killed (``recover``: from ``start``, and ``lost``, the requests
        and worst-case picodollars they left in flight; ``sent``, what they sent). ``priced``:
        the run's model has prices (the table's or given); without them its cost is unknown,
        which ``spend`` says."""
        run_id = uuid.uuid4().hex
        if path is None:
            if month_cap_pico is not None:
                raise JobError(
                    "--max-cost-per-month needs the ledger: it is off (--ledger off / BATCHLLM_LEDGER=off)"
                )
            return cls(None, run_id, None, warn)
        checkpoint_text = str(checkpoint.resolve())
        try:
            conn = connect(path)
            recover(conn, checkpoint_text, start, lost, run_id, sent)
            if priced:
                reprice(conn, checkpoint_text, sent)
            conn.execute(
                "INSERT INTO runs (run_id, kind, job, output, checkpoint, provider, endpoint_host, model, "
                "engine, host, pid, pid_start, started_at, rows_total, month_cap_pico, start_spent_pico, "
                "start_prompt_tokens, start_completion_tokens, start_ok, start_error, start_invalid, start_cached_tokens, "
                "start_cached_saved_pico, sandbox, priced) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id, kind, job, str(output.resolve()), checkpoint_text, provider,
                    urlsplit(endpoint).hostname or endpoint, model, engine, socket.gethostname(),
                    os.getpid(), proc_start(os.getpid()), time.time(), rows_total, month_cap_pico,
                    *start, int(sandbox), int(priced),
                ),
            )  # fmt: skip
        except (OSError, sqlite3.Error) as exc:
            if month_cap_pico is not None:
                raise JobError(
                    f"{path}: cannot write the ledger ({exc}); --max-cost-per-month needs it"
                ) from None
            warn(f"{path}: cannot write the ledger ({exc}): this run is not recorded in it")
            return cls(None, run_id, path, warn)
        record = cls(conn, run_id, path, warn)
        record.parts = parts or {}
        record.own = (provider, urlsplit(endpoint).hostname or endpoint, model)
        record.sandbox = record.declared = sandbox
        return record

    def month_allowance(self, job: str, cap_pico: int, chunk_pico: int) -> MonthAllowance:
        assert self.conn is not None  # begin raised otherwise
        self.month = MonthAllowance(
            self.conn, self.run_id, job, cap_pico, month_bounds(self.started_at), self.sandbox, chunk_pico
        )
        return self.month

    def mark_sandbox(self, played: bool) -> None:
        """Whether the servers that answered so far are all batchllm's sandbox (engine/client.py
        ``watch_played``: on each server's first answer, so a run killed later is marked already).
        Marked, its claim on the month counts in no real run's cap (store.py ``MONTH_USED``), and
        its own cap counts the real month and itself, as a ``--sandbox`` run's does."""
        played = played or self.declared
        if played == self.sandbox:
            return
        self.sandbox = played
        if self.month is not None:
            self.month.sandbox = played
        if self.conn is not None:
            self._write("UPDATE runs SET sandbox = ? WHERE run_id = ?", (int(played), self.run_id))

    def progress(
        self, requests: int, prompt_tokens: int, completion_tokens: int, cost_pico: int,
        rows: tuple[int, int, int] = (0, 0, 0),
    ) -> None:  # fmt: skip
        """What the run has spent so far, and its rows ok, failed and invalid, every
        ``PROGRESS_EVERY`` seconds at most (from the progress ticks, never per row): a killed
        run's open record shows them, and keeps them if its journal is gone (recover.py)."""
        now = time.monotonic()
        if self.conn is None or now - self._last_progress < PROGRESS_EVERY:
            return
        self._last_progress = now
        self._write(
            "UPDATE runs SET requests = ?, prompt_tokens = ?, completion_tokens = ?, cost_pico = ?, "
            "rows_ok = ?, rows_error = ?, rows_invalid = ? WHERE run_id = ?",
            (requests, prompt_tokens, completion_tokens, cost_pico, *rows, self.run_id),
        )

    def finish(
        self,
        summary: Mapping[str, Any],
        start: Snapshot,
        end: Snapshot | None,
        billed_before: Mapping[str, int] | None = None,
    ) -> None:
        """Close the record from the run's summary and the journal's totals at its end;
        ``billed_before``: the output's requests maybe billed when the run started (the summary
        counts every run's, the record only this run's)."""
        if self.conn is None:
            return
        this = summary.get("this_run", {})
        rows = summary.get("rows") or {}
        billed = summary.get("maybe_billed") or {}
        billed_requests, billed_pico = billed.get("requests", 0), _pico(billed.get("worst_case_usd"))
        if billed_before is not None:
            billed_requests = max(0, billed_requests - billed_before["requests"])
            billed_pico = max(0, billed_pico - billed_before["worst_pico"])
        if end is None:  # no journal totals (Ray's coordinator closed it): this run's counters
            cost = _pico(this.get("cost_usd"))
            delta = Snapshot(cost, this.get("prompt_tokens", 0), this.get("completion_tokens", 0),
                             this.get("rows_sent_ok", 0), this.get("rows_failed", 0), this.get("rows_invalid", 0))  # fmt: skip
        else:
            delta = Snapshot(*(b - a for a, b in zip(start, end, strict=True)))
        self._write(
            "UPDATE runs SET ended_at = ?, exit_code = ?, stop_reason = ?, message = ?, rows_total = "
            "COALESCE(?, rows_total), rows_ok = ?, rows_error = ?, rows_invalid = ?, rows_pending = ?, "
            "requests = ?, prompt_tokens = ?, completion_tokens = ?, cost_pico = ?, dedup_rows = ?, "
            "cache_hits = ?, cache_saved_pico = ?, maybe_billed_requests = ?, maybe_billed_pico = ?, "
            "cached_tokens = ?, cached_saved_pico = ? WHERE run_id = ?",
            (
                time.time(), summary.get("exit_code"), summary.get("stop_reason"), summary.get("message"),
                # A row answered again in place of its entry (--refresh-changed) adds no entry.
                rows.get("total"), max(delta.ok, this.get("rows_sent_ok", 0)), max(delta.error, 0), max(delta.invalid, 0),
                rows.get("pending"), this.get("requests", 0), delta.prompt_tokens, delta.completion_tokens,
                delta.spent_pico, this.get("answered_by_other_rows", 0), this.get("cache_hits", 0),
                _pico(this.get("cache_saved_usd")), billed_requests, billed_pico,
                this.get("cached_tokens", 0), _pico(this.get("cached_saved_usd")), self.run_id,
            ),
        )  # fmt: skip
        if summary.get("play_money"):  # a served sandbox answered it all (engine/client.py)
            self.sandbox = True
            self._write("UPDATE runs SET sandbox = 1 WHERE run_id = ?", (self.run_id,))
        if self.conn is not None and self.parts and summary.get("endpoints"):
            self._write_parts(summary["endpoints"], delta, this.get("requests", 0))
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _write_parts(self, endpoints: Mapping[str, Any], delta: Snapshot, requests: int) -> None:
        """A fleet run by endpoint, from the summary's per-endpoint counters; what they do not
        hold (the run's figures less theirs) is a part of its own, so the parts add up exactly."""
        names: list[tuple[str, Part]] = []
        figures: list[tuple[int, int, int, int]] = []  # requests, prompt and completion tokens, cost
        for name, e in endpoints.items():
            names.append((name, self.parts.get(name, self.own)))
            figures.append((int(e.get("requests", 0)), int(e.get("prompt_tokens", 0)),
                            int(e.get("completion_tokens", 0)), _pico(e.get("cost_usd"))))  # fmt: skip
        whole = (requests, delta.prompt_tokens, delta.completion_tokens, delta.spent_pico)
        r0, r1, r2, r3 = (w - sum(f[k] for f in figures) for k, w in enumerate(whole))
        if r0 or r1 or r2 or r3:
            names.append(("", self.own))
            figures.append((r0, r1, r2, r3))
        top = max(range(len(figures)), key=lambda i: figures[i][3])
        self._write_many(
            "INSERT OR REPLACE INTO run_parts (run_id, endpoint, provider, endpoint_host, model, main, requests, "
            "prompt_tokens, completion_tokens, cost_pico) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(self.run_id, n, *part, int(i == top), *figures[i]) for i, (n, part) in enumerate(names)],
        )

    def _write_many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        assert self.conn is not None
        try:
            self.conn.executemany(sql, rows)
        except sqlite3.Error as exc:
            self.warn(f"{self.path}: cannot write the ledger ({exc}): this run's record is incomplete")

    def _write(self, sql: str, args: tuple[Any, ...]) -> None:
        assert self.conn is not None
        try:
            self.conn.execute(sql, args)
        except sqlite3.Error as exc:
            self.warn(f"{self.path}: cannot write the ledger ({exc}): this run's record is incomplete")
            self.conn.close()
            self.conn = None


def _pico(text: str | None) -> int:
    """``"0.00123"`` (the summary's exact dollars) as picodollars; 0 for None."""
    return parse_usd(text) if text else 0


def of_job(job: Job, scratch: bool = False) -> dict[str, Any]:
    """``RunRecord.begin``'s arguments that a job decides: its ledger, name, output, journal,
    monthly cap, and whether it is play money (``--sandbox``). A ``scratch`` journal (a pack-size
    pilot's) is its own output: its rows and their cost are there, not in the output file."""
    parts = {
        e.name: (
            e.provider,
            "sandbox" if job.sandbox else urlsplit(e.endpoint).hostname or e.endpoint,
            e.model.name,
        )
        for e in job.fleet or ()
    }
    return {
        "path": ledger_path(job.ledger),
        "job": job.name,
        "output": job.journal_dir if scratch else job.output,
        "checkpoint": job.journal_dir,
        "month_cap_pico": job.max_cost_per_month_pico,
        "parts": parts,
        "sandbox": job.sandbox,
    }
