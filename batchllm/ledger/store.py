"""The spend ledger: one SQLite record per run, across outputs, jobs and months.

A journal knows one output; the ledger knows every run on this machine (or every run pointed at
the same file): which job, which model, when, how it ended, and what it cost, so ``batchllm
spend`` can answer "what did the nightly jobs cost this month" and ``--max-cost-per-month`` can
cap a job across its runs.

    run starts   -> ``RunRecord.begin``: INSERT, with the journal's totals at the start
    while it runs -> ``progress`` (every second: rows, requests, tokens, cost) and
                    ``MonthAllowance.extend`` (claims)
    run ends     -> ``finish``: end, exit code, this run's tokens and cost
    run killed   -> the record stays open (`spend`: "killed", not recorded yet); the next run of the output
                    (recover.py) closes it from the journal: its cost is what the journal gained
                    between its start and the next start, plus the in-flight bound the next run
                    found (the crash bound), and its requests what the journal shows it sent; if
                    that journal is gone (deleted), from its last progress, a lower bound

A run's cost is the journal's spend at its end less its spend at its start, so the runs of an
output add up to the output's ``cost_usd`` exactly (integer picodollars throughout).

Several cron jobs may write at once: WAL mode, a 30-second busy timeout, and the month's claims
taken in ``BEGIN IMMEDIATE`` transactions, so two runs of one job cannot both take the last
dollar. The ledger is bookkeeping: failing to write it is a warning and never stops a run, except
a run capped per month, which cannot start without it.

Where: ``--ledger PATH``, else ``$BATCHLLM_LEDGER``, else ``$XDG_DATA_HOME/batchllm/ledger.db``
(``~/.local/share/batchllm/ledger.db``); ``off`` keeps no record.
"""

from __future__ import annotations

import calendar
import os
import socket
import sqlite3
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import JobError
from ..folders import data_dir

LEDGER_ENV = "BATCHLLM_LEDGER"  # names the ledger when --ledger does not

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,                 -- run, pilot, import
    job TEXT NOT NULL,
    output TEXT NOT NULL,
    checkpoint TEXT NOT NULL,           -- absolute: how the next run of the output finds this one
    provider TEXT,
    endpoint_host TEXT,                 -- the host only: never a path, a query or a key
    model TEXT,
    engine TEXT,
    host TEXT,
    pid INTEGER,
    pid_start TEXT,                     -- the process's start time: a reused pid is not this run
    started_at REAL NOT NULL,
    ended_at REAL,
    exit_code INTEGER,
    stop_reason TEXT,
    message TEXT,
    rows_total INTEGER,
    rows_ok INTEGER NOT NULL DEFAULT 0,
    rows_error INTEGER NOT NULL DEFAULT 0,
    rows_invalid INTEGER NOT NULL DEFAULT 0,
    rows_pending INTEGER,
    requests INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cost_pico INTEGER NOT NULL DEFAULT 0,
    dedup_rows INTEGER NOT NULL DEFAULT 0,
    cache_hits INTEGER NOT NULL DEFAULT 0,
    cache_saved_pico INTEGER NOT NULL DEFAULT 0,
    maybe_billed_requests INTEGER NOT NULL DEFAULT 0,
    maybe_billed_pico INTEGER NOT NULL DEFAULT 0,
    claim_pico INTEGER,                 -- --max-cost-per-month: what this run holds of the month
    month_cap_pico INTEGER,
    start_spent_pico INTEGER NOT NULL DEFAULT 0,   -- the journal when the run started
    start_prompt_tokens INTEGER NOT NULL DEFAULT 0,
    start_completion_tokens INTEGER NOT NULL DEFAULT 0,
    start_ok INTEGER NOT NULL DEFAULT 0,
    start_error INTEGER NOT NULL DEFAULT 0,
    start_invalid INTEGER NOT NULL DEFAULT 0,
    start_cached_tokens INTEGER NOT NULL DEFAULT 0,
    start_cached_saved_pico INTEGER NOT NULL DEFAULT 0,
    recovered_by TEXT,                  -- the run that closed this record from the journal
    cached_tokens INTEGER NOT NULL DEFAULT 0,      -- prompt tokens served from the prompt cache
    cached_saved_pico INTEGER NOT NULL DEFAULT 0,  -- what they cost less than at the input price
    sandbox INTEGER NOT NULL DEFAULT 0, -- the built-in emulator's play money (SANDBOX_BEFORE_MARK)
    priced INTEGER NOT NULL DEFAULT 1   -- 0: the model had no price, its cost is unknown (not $0)
);
CREATE INDEX IF NOT EXISTS runs_started ON runs (started_at);
CREATE INDEX IF NOT EXISTS runs_job ON runs (job, started_at);
CREATE INDEX IF NOT EXISTS runs_open ON runs (checkpoint) WHERE ended_at IS NULL;
-- A fleet run's tokens, requests and cost by the endpoint that answered (its parts add up to the
-- run's figures exactly: what the endpoints' counters miss is a part with endpoint ''). The run
-- counts once, with its rows, under its part of the highest cost (``main`` = 1).
CREATE TABLE IF NOT EXISTS run_parts (
    run_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    provider TEXT,
    endpoint_host TEXT,
    model TEXT,
    main INTEGER NOT NULL,
    requests INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost_pico INTEGER NOT NULL,
    PRIMARY KEY (run_id, endpoint)
) WITHOUT ROWID;
"""

OFF = "off"

# A run against the built-in emulator (``--sandbox``) is kept, marked, and counted apart: ``spend``
# leaves it out unless asked (``--sandbox``), and no monthly cap counts it, so a real run is never
# held back by play money (a sandbox run can still try a cap out: against the real month, plus itself).
# Ledgers from before the mark get it on the first write (``migrate``): their sandbox runs are
# the ones whose endpoint host was recorded as "sandbox".
SANDBOX_BEFORE_MARK = "endpoint_host = 'sandbox'"


def ledger_path(given: str | None, environ: Mapping[str, str] | None = None) -> Path | None:
    """The ledger file: ``--ledger``, else ``$BATCHLLM_LEDGER``, else the XDG data folder; None: off."""
    environ = os.environ if environ is None else environ
    value = given or environ.get(LEDGER_ENV)
    if value:
        return None if value == OFF else Path(value).expanduser()
    return data_dir(environ) / "ledger.db"


class Snapshot(NamedTuple):
    """A journal's totals at one moment: what a run's record is the difference of."""

    spent_pico: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ok: int = 0
    error: int = 0
    invalid: int = 0
    cached_tokens: int = 0  # of the prompt tokens, served from the server's prompt cache
    cached_saved_pico: int = 0  # what they saved, each row at the prices it was answered at

    @classmethod
    def of(cls, totals: Mapping[str, Any]) -> Snapshot:
        """From ``Journal.totals()``."""
        return cls(
            int(totals["input_cost_pico"]) + int(totals["output_cost_pico"]),
            int(totals["prompt_tokens"]),
            int(totals["completion_tokens"]),
            int(totals["ok"]),
            int(totals["error"]),
            int(totals.get("invalid", 0)),
            int(totals.get("cached_tokens", 0)),
            int(totals.get("cached_saved_pico", 0)),
        )


def connect(path: Path, tries: int = 3) -> sqlite3.Connection:
    """The ledger, open for writing, made or mended first. Many runs starting at once on a new
    ledger may find it locked while one of them sets it up (the switch to WAL takes the whole
    file, and SQLite may say so at once rather than wait): each tries again, a few times."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(tries):
        conn = sqlite3.connect(path, timeout=30.0, isolation_level=None)
        try:
            conn.execute("PRAGMA busy_timeout=30000")
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(SCHEMA)
            migrate(conn)
            return conn
        except sqlite3.OperationalError as exc:
            conn.close()
            if "locked" not in str(exc) or attempt == tries - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def has_sandbox_mark(conn: sqlite3.Connection) -> bool:
    return any(r[1] == "sandbox" for r in conn.execute("PRAGMA main.table_info(runs)"))


# Figures added to ``runs`` since its first version, each with its type and default: a ledger
# written before them gets them when a run opens it (spend reads an old one as it is, each missing
# figure at its default: spend.py). Every run before ``priced`` was counted as priced: it stays so.
ADDED = {
    "cached_tokens": "INTEGER NOT NULL DEFAULT 0",
    "cached_saved_pico": "INTEGER NOT NULL DEFAULT 0",
    "priced": "INTEGER NOT NULL DEFAULT 1",
    "start_cached_tokens": "INTEGER NOT NULL DEFAULT 0",
    "start_cached_saved_pico": "INTEGER NOT NULL DEFAULT 0",
}


def added_default(column: str) -> str:
    """The default of an ``ADDED`` figure, as SQL: what a ledger from before it reads as."""
    return ADDED[column].rsplit(" DEFAULT ", 1)[1]


def migrate(conn: sqlite3.Connection) -> None:
    """Give a ledger from before them the figures of ``ADDED`` and the sandbox mark (its sandbox
    runs then marked from their host), once: several runs may open it at once."""
    have = {r[1] for r in conn.execute("PRAGMA main.table_info(runs)")}
    if "sandbox" in have and have.issuperset(ADDED):
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        have = {r[1] for r in conn.execute("PRAGMA main.table_info(runs)")}  # under the lock now
        for column, kind in ADDED.items():
            if column not in have:
                conn.execute(f"ALTER TABLE runs ADD COLUMN {column} {kind}")
        if "sandbox" not in have:
            conn.execute("ALTER TABLE runs ADD COLUMN sandbox INTEGER NOT NULL DEFAULT 0")
            conn.execute(f"UPDATE runs SET sandbox = 1 WHERE {SANDBOX_BEFORE_MARK}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def open_readonly(path: Path) -> sqlite3.Connection:
    """The ledger for ``spend``: read-only; a missing ledger is a usage error naming it."""
    if not path.exists():
        raise JobError(f"{path}: no ledger yet (runs write one; --ledger or BATCHLLM_LEDGER name another)")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=30.0)
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("SELECT 1 FROM runs LIMIT 1")
    except sqlite3.Error as exc:
        raise JobError(f"{path}: cannot read the ledger: {exc}") from None
    return conn


def month_bounds(t: float) -> tuple[float, float]:
    """The calendar month (UTC) holding ``t``: its first second and the next month's."""
    g = time.gmtime(t)
    start = calendar.timegm((g.tm_year, g.tm_mon, 1, 0, 0, 0))
    year, month = (g.tm_year + 1, 1) if g.tm_mon == 12 else (g.tm_year, g.tm_mon + 1)
    return float(start), float(calendar.timegm((year, month, 1, 0, 0, 0)))


def _proc_stat(pid: int) -> list[bytes] | None:
    """``/proc/PID/stat``'s fields after the command name (Linux): state first; None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields if len(fields) > 19 else None


def proc_start(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (Linux), None where unknown."""
    fields = _proc_stat(pid)
    return None if fields is None else fields[19].decode()


def is_alive(host: str | None, pid: int | None, pid_start: str | None) -> bool:
    """Is the process that wrote an open record still running? On another host: assumed so.
    A process killed but not yet reaped by its parent (a zombie) is not: it runs no more."""
    if host != socket.gethostname():
        return True
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _proc_stat(pid)
    if fields is None:
        return True  # no /proc: the pid answers, so assume it is the run
    return fields[0] not in (b"Z", b"X", b"x") and (pid_start is None or fields[19].decode() == pid_start)


# What a run of a job counts against its month: a closed record its cost and crash bound, an
# open one (running, or killed and not recovered yet) the larger of its claim and its progress;
# only real runs: play money (sandbox runs, see SANDBOX_BEFORE_MARK) counts in no cap. A run
# without prices (``priced = 0``: an uncapped run of the job, as a capped one needs prices,
# engine/checks.py) counts as its recorded cost, 0: its cost is unknown, not known to be spent.
MONTH_USED = """
SELECT COALESCE(SUM(CASE WHEN ended_at IS NOT NULL THEN cost_pico + maybe_billed_pico
                         ELSE MAX(COALESCE(claim_pico, 0), cost_pico) END), 0)
FROM runs WHERE job = ? AND started_at >= ? AND started_at < ? AND run_id != ? AND sandbox = 0
"""
