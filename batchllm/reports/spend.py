"""``batchllm spend``: what runs cost across outputs, jobs and months, from the ledger.

    ledger (ledger/store.py) -> load (one SELECT of the window) -> groups, total, month, per
    1,000 rows (spend_figures.py), problems -> text | markdown | json | csv (and spend_html.py's page)

Money stays integer picodollars until it is printed (``format_usd``: exact dollars, the same
format in every table). A run counts in the window, the groups and the month by its start.

Sandbox runs (``--sandbox``, play money) are left out of everything unless asked for, and then
they are all the report holds (``only``: every query reads the runs through one view).

A run whose model had no price (``priced`` 0 in the ledger) cost an unknown amount, not $0: it
is shown as unknown, and the totals, the month, its forecast and the cost per 1,000 rows are of
the priced runs, saying how many runs (and rows) they leave out (spend_figures.py).

The month's forecast is the spend so far plus the recent daily rate (the last 7 days' runs, or
the days since the ledger's first run when it is younger) times the days left: a run rate, not a
model of the schedule, and said so next to the figure.
"""

from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ..errors import JobError
from ..ledger import month_bounds, open_readonly
from ..ledger.record import PROGRESS_EVERY
from ..ledger.store import ADDED, SANDBOX_BEFORE_MARK, added_default, is_alive
from ..pricing import usd_text
from .spend_figures import Cell, groups, per_thousand, sums

RATE_DAYS = 7
MAX_PROBLEMS = 20
_COLUMNS = (
    "run_id, kind, job, output, provider, model, engine, started_at, ended_at, exit_code, message, "
    "rows_ok, rows_error, rows_invalid, rows_pending, requests, prompt_tokens, completion_tokens, "
    "cost_pico, maybe_billed_pico, recovered_by, host, pid, pid_start, endpoint_host"
)


@dataclass(slots=True)
class Run:
    run_id: str
    kind: str
    job: str
    output: str
    provider: str
    model: str
    engine: str
    started_at: float
    ended_at: float | None
    exit_code: int | None
    message: str | None
    rows_ok: int
    rows_error: int
    rows_invalid: int
    rows_pending: int | None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_pico: int
    maybe_billed_pico: int
    recovered_by: str | None
    host: str | None
    pid: int | None
    pid_start: str | None
    endpoint_host: str | None
    cached_tokens: int = 0  # of prompt_tokens, served from the prompt cache (0 in an old ledger)
    cached_saved_pico: int = 0
    priced: int = 1  # 0: the model had no price: the cost is unknown (1 in an old ledger)

    @property
    def status(self) -> str:
        """running, finished, or killed: its record is open and its process gone (on this host:
        a run on another host is taken to be running). A killed run is not recorded yet: its
        figures are its last progress until the next run of its output closes its record from
        the journal (ledger/recover.py); then it is finished, and ``killed`` still."""
        if self.ended_at is not None:
            return "finished"
        return "running" if is_alive(self.host, self.pid, self.pid_start) else "killed"

    @property
    def note(self) -> str | None:
        """What a killed run's figures are until it is recorded, and how it gets recorded."""
        if self.status != "killed":
            return None
        return (
            f"killed, not recorded yet: its figures are its last progress (written every "
            f"{PROGRESS_EVERY:g} s); running its output again (batchllm run ... -o {self.output}) "
            "resumes it and records what it spent from the output's journal"
        )

    def as_dict(self) -> dict[str, Any]:
        status = self.status
        return {
            "run_id": self.run_id,
            "kind": self.kind,
            "job": self.job,
            "output": self.output,
            "provider": self.provider,
            "model": self.model,
            "engine": self.engine,
            "endpoint_host": self.endpoint_host,
            "started_at": _iso(self.started_at),
            "ended_at": _iso(self.ended_at) if self.ended_at is not None else None,
            "status": status,
            "killed": self.recovered_by is not None or status == "killed",
            "exit_code": self.exit_code,
            "message": self.message,
            "note": self.note,
            "rows_ok": self.rows_ok,
            "rows_error": self.rows_error,
            "rows_invalid": self.rows_invalid,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "cached_saved_usd": usd_text(self.cached_saved_pico if self.priced else None),
            "cost_usd": usd_text(self.cost_pico if self.priced else None),
            "priced": bool(self.priced),
            "maybe_billed_usd": usd_text(self.maybe_billed_pico) if self.maybe_billed_pico else None,
        }


# Rows answered are the outputs' rows, each once: a pack-size pilot's rows (its scratch journal's,
# estimate --pack 1,5,10) are what the job paid to choose a size, not rows it answered.
_ROWS = "(CASE WHEN kind = 'pack-pilot' THEN 0 ELSE rows_ok END)"

_CELLS = """
SELECT job, COALESCE(model, ''), COALESCE(provider, ''), strftime('%Y-%m-%d', started_at, 'unixepoch'),
       COUNT(*), SUM({ROWS}), SUM(requests), SUM(prompt_tokens), SUM(completion_tokens), SUM(cost_pico), priced
FROM runs WHERE started_at >= ? AND started_at < ? GROUP BY 1, 2, 3, 4, 11 ORDER BY 4
""".replace("{ROWS}", _ROWS)
# A fleet run by its endpoints' parts (ledger/store.py ``run_parts``): one run, its rows under its
# main part; every other run whole.
_CELLS_WITH_PARTS = """
SELECT job, model, provider, day, SUM(runs), SUM(rows_ok), SUM(requests), SUM(pt), SUM(ct), SUM(cost), priced
FROM (
  SELECT job, COALESCE(model, '') AS model, COALESCE(provider, '') AS provider,
         strftime('%Y-%m-%d', started_at, 'unixepoch') AS day, 1 AS runs, {ROWS} AS rows_ok, requests,
         prompt_tokens AS pt, completion_tokens AS ct, cost_pico AS cost, priced
  FROM runs r WHERE started_at >= ?1 AND started_at < ?2
    AND NOT EXISTS (SELECT 1 FROM run_parts p WHERE p.run_id = r.run_id)
  UNION ALL
  SELECT r.job, COALESCE(p.model, ''), COALESCE(p.provider, ''), strftime('%Y-%m-%d', r.started_at, 'unixepoch'),
         p.main, p.main * {ROWS}, p.requests, p.prompt_tokens, p.completion_tokens, p.cost_pico, r.priced
  FROM run_parts p JOIN runs r ON r.run_id = p.run_id WHERE r.started_at >= ?1 AND r.started_at < ?2
) GROUP BY 1, 2, 3, 4, 11 ORDER BY 4
""".replace("{ROWS}", _ROWS.replace("kind", "r.kind").replace("rows_ok", "r.rows_ok"))
_FAILED = "ended_at IS NOT NULL AND (recovered_by IS NOT NULL OR exit_code IS NOT 0)"


def cells(conn: sqlite3.Connection, since: float, until: float) -> list[Cell]:
    try:
        parts = conn.execute("SELECT EXISTS (SELECT 1 FROM run_parts)").fetchone()[0]
    except sqlite3.OperationalError:  # a ledger no run of this version wrote to
        parts = False
    return [Cell(*r) for r in conn.execute(_CELLS_WITH_PARTS if parts else _CELLS, (since, until))]


# The run columns ``Run`` reads (``only``'s view gives an old ledger's missing ones their defaults).
_RUN = ", ".join([_COLUMNS, "cached_tokens", "cached_saved_pico", "priced"])


def prompt_cache(conn: sqlite3.Connection, since: float, until: float) -> dict[str, Any]:
    """Prompt tokens the runs in the window had served from the prompt cache, and the saving (at
    the priced runs' prices: an unpriced run's saving is unknown)."""
    tokens, saved = conn.execute(
        "SELECT COALESCE(SUM(cached_tokens), 0), COALESCE(SUM(CASE WHEN priced THEN cached_saved_pico END), 0) "
        "FROM runs WHERE started_at >= ? AND started_at < ?",
        (since, until),
    ).fetchone()
    return {"cached_tokens": int(tokens), "saved_usd": usd_text(int(saved))}


def _problems(conn: sqlite3.Connection, since: float, until: float) -> tuple[list[Run], int]:
    """The latest runs that failed or were killed (recorded or not yet), and how many."""
    open_ = [r for r in load(conn, since, until, "ended_at IS NULL") if r.status != "running"]
    (failed,) = conn.execute(
        f"SELECT COUNT(*) FROM runs WHERE started_at >= ? AND started_at < ? AND {_FAILED}", (since, until)
    ).fetchone()
    latest = conn.execute(
        f"SELECT {_RUN} FROM runs WHERE started_at >= ? AND started_at < ? AND {_FAILED} "
        "ORDER BY started_at DESC LIMIT ?",
        (since, until, MAX_PROBLEMS),
    ).fetchall()
    runs = sorted([*open_, *(Run(*r) for r in latest)], key=lambda r: -r.started_at)
    return runs[:MAX_PROBLEMS], failed + len(open_)


def parse_when(text: str, *, end: bool = False, now: float | None = None) -> float:
    """``30d``, ``12h``, ``2w`` (ago), or an ISO date or time (UTC); a date as ``--until`` is the
    whole of that day."""
    now = time.time() if now is None else now
    m = re.fullmatch(r"\s*(\d+)\s*([hdw])\s*", text)
    if m:
        hours = int(m.group(1)) * {"h": 1, "d": 24, "w": 168}[m.group(2)]
        return now - hours * 3600
    try:
        d = datetime.fromisoformat(text.strip())
    except ValueError:
        raise JobError(f"{text!r} is not a date (2026-11-01), a time or an age such as 30d") from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=UTC)
    if end and re.fullmatch(r"\s*\d{4}-\d{2}-\d{2}\s*", text):
        d += timedelta(days=1)
    return d.timestamp()


def load(conn: sqlite3.Connection, since: float, until: float, where: str = "1") -> list[Run]:
    rows = conn.execute(
        f"SELECT {_RUN} FROM runs WHERE started_at >= ? AND started_at < ? AND {where} ORDER BY started_at",
        (since, until),
    ).fetchall()
    return [Run(*r) for r in rows]


def month_forecast(conn: sqlite3.Connection, now: float) -> dict[str, Any]:
    """This calendar month (UTC): spent so far, and at the recent daily rate, by its end."""
    start, end = month_bounds(now)
    spent, unpriced, unpriced_rows = conn.execute(
        f"SELECT COALESCE(SUM(CASE WHEN priced THEN cost_pico END), 0), COALESCE(SUM(priced = 0), 0), "
        f"COALESCE(SUM(CASE WHEN priced THEN 0 ELSE {_ROWS} END), 0) FROM runs "
        "WHERE started_at >= ? AND started_at < ?",
        (start, end),
    ).fetchone()
    (first,) = conn.execute("SELECT MIN(started_at) FROM runs").fetchone()
    days = RATE_DAYS if first is None else min(RATE_DAYS, max(1.0, (now - first) / 86400))
    (recent,) = conn.execute(
        "SELECT COALESCE(SUM(cost_pico), 0) FROM runs WHERE started_at >= ? AND priced", (now - days * 86400,)
    ).fetchone()
    rate = round(recent / days)
    days_left = max(0.0, (end - now) / 86400)
    return {
        "month": time.strftime("%Y-%m", time.gmtime(start)),
        "spent_usd": usd_text(int(spent)),
        "daily_rate_usd": usd_text(rate),
        "rate_from_days": round(days, 1),
        "days_left": round(days_left, 1),
        "forecast_usd": usd_text(int(spent) + round(rate * days_left)),
        # The month's runs without prices: in neither figure, their cost unknown.
        "unpriced": {"runs": unpriced, "rows_ok": unpriced_rows} if unpriced else None,
        "_spent_pico": int(spent),
        "_forecast_pico": int(spent) + round(rate * days_left),
    }


def only(conn: sqlite3.Connection, sandbox: bool) -> None:
    """Make ``runs`` mean the sandbox runs, or the real ones, for every query on ``conn``, and
    ``left_out`` the others (temporary views over the table: nothing is written to the ledger).
    A ledger no run of this version wrote to reads the figures it lacks (ledger/store.py
    ``ADDED``) at their defaults, its runs as priced."""
    have = {r[1] for r in conn.execute("PRAGMA main.table_info(runs)")}
    mark = "sandbox" if "sandbox" in have else SANDBOX_BEFORE_MARK
    missing = "".join(f", {added_default(c)} AS {c}" for c in ADDED if c not in have)
    for view, kind in (("runs", sandbox), ("left_out", not sandbox)):
        conn.execute(
            f"CREATE TEMP VIEW {view} AS SELECT *{missing} FROM main.runs WHERE ({mark}) = {int(kind)}"
        )


def _left_out(conn: sqlite3.Connection, since: float, until: float) -> dict[str, Any] | None:
    """The runs of the other kind in the window: how many, what the priced ones cost, and how
    many were not priced."""
    n, pico, unpriced = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(CASE WHEN priced THEN cost_pico END), 0), COALESCE(SUM(priced = 0), 0) "
        "FROM left_out WHERE started_at >= ? AND started_at < ?",
        (since, until),
    ).fetchone()
    return {"runs": n, "cost_usd": usd_text(int(pico)), "unpriced_runs": unpriced} if n else None


def build_spend(
    path: Path,
    since: float,
    until: float,
    by: list[str],
    with_runs: bool,
    now: float | None = None,
    sandbox: bool = False,
) -> dict[str, Any]:
    """The report over the real runs, or with ``sandbox`` over the sandbox runs alone."""
    now = time.time() if now is None else now
    conn = open_readonly(path)
    try:
        only(conn, sandbox)
        left_out = _left_out(conn, since, until)
        summed = cells(conn, since, until)
        month = month_forecast(conn, now)
        problems, count = _problems(conn, since, until)
        runs = load(conn, since, until) if with_runs else None
        parts = _parts(conn, since, until) if with_runs else {}
        cached = prompt_cache(conn, since, until)
    finally:
        conn.close()
    report: dict[str, Any] = {
        "ledger": str(path),
        "since": _iso(since),
        "until": _iso(min(until, now)),
        "by": by,
        "sandbox": sandbox,
        "left_out": left_out,  # runs of the other kind (sandbox or real) in the window
        "groups": groups(summed, by) if by else [],
        "total": sums(summed),
        "prompt_cache": cached,
        "month": month,
        "cost_per_1k_rows": per_thousand(summed),
        "problems": {"count": count, "runs": [r.as_dict() for r in problems]},
    }
    if runs is not None:
        report["runs"] = [{**r.as_dict(), **parts.get(r.run_id, {})} for r in runs]
    report["_cells"] = summed
    return report


def _parts(conn: sqlite3.Connection, since: float, until: float) -> dict[str, dict[str, Any]]:
    """run_id -> ``{"endpoints": [...]}`` for the fleet runs in the window (``--runs``)."""
    out: dict[str, dict[str, Any]] = {}
    try:
        found = conn.execute(
            "SELECT p.run_id, p.endpoint, p.provider, p.endpoint_host, p.model, p.requests, p.prompt_tokens, "
            "p.completion_tokens, p.cost_pico FROM run_parts p JOIN runs r ON r.run_id = p.run_id "
            "WHERE r.started_at >= ? AND r.started_at < ? ORDER BY p.run_id, p.endpoint",
            (since, until),
        ).fetchall()
    except sqlite3.OperationalError:  # a ledger no run of this version wrote to
        return out
    names = (
        "endpoint",
        "provider",
        "endpoint_host",
        "model",
        "requests",
        "prompt_tokens",
        "completion_tokens",
    )
    for run_id, *fields, cost in found:
        line = {**dict(zip(names, fields, strict=True)), "cost_usd": usd_text(cost)}
        out.setdefault(run_id, {"endpoints": []})["endpoints"].append(line)
    return out


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
