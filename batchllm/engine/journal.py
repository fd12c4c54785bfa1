"""The durable checkpoint: one SQLite database (WAL mode) next to the output.

Every finished row, ok or error, is written as it arrives: results are appended to a pending list
and one flush, scheduled with ``loop.call_soon``, commits all that arrived in the same turn of the
event loop in a single transaction (group commit). A reply is thus committed before the loop does
anything else, so a SIGKILL loses at most replies still on the wire; at thousands of rows/s the
transactions grow instead of multiplying. WAL with ``synchronous=NORMAL`` survives any process crash;
an OS crash or power loss may lose the last transactions, never corrupt the file.

Each row is an ``Entry`` (records.py), stored column for column. Rows are keyed by ``row_id``
(see prompts.py), which is what makes resume, incremental runs and
changed-row detection one lookup per input batch (``states``) without holding every id in memory.
``meta`` holds the request settings the journal was written with; a run with other settings is
refused (``SettingsMismatch``) unless it passes ``--restart`` or nothing was ever sent from it.

Every request is also written down as sent before it leaves, and as done when its row is
recorded (inflight.py). What a crash leaves sent but not done may have been billed without a
saved reply: ``status`` counts it with its worst-case cost, and the next run adds it to
``maybe_billed`` (kept in ``meta`` for the report) before it sends those rows again.

A row sent again while the journal holds an entry for it keeps what it cost before: the plan
marks it in ``replacing``, and the moment its first request leaves (``sent``) or another entry
takes its place (``add``), its entry is superseded (spend.py).

``answered`` finds the rows of this output that already answered a request key (reuse.py,
key_index.py). The file's layout and its history are in journal_schema.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from ..errors import JobError, SettingsMismatch
from ..labeling.rows import Attempt
from ..records import Entry
from .attempt_book import AttemptBook
from .inflight import InflightBook, InflightLog
from .journal_schema import (
    COLUMNS,
    DB_NAME,
    INSERT_ATTEMPT,
    INSERT_ROW,
    RESCUE_NAME,
    SANDBOX_ANSWERS,
    SCHEMA,
    SCHEMA_VERSION,
    STATUS,
    TRANSIENT,
    connect,
    db_path,
    insert_rows,
    length_change,
    migrate,
    mismatch,
    read_rescued,
    settings_diff,
    write_rescued,
)
from .key_index import KEY_BATCH, KeyIndex
from .observed import ObservedBook
from .spend import CARRY_ENTRY, RESUME_ATTEMPTS, SpendBook

__all__ = ["KEY_BATCH", "CARRY_ENTRY", "COLUMNS", "DB_NAME", "RESCUE_NAME", "RESUME_ATTEMPTS", "TRANSIENT",
           "Journal", "db_path", "settings_diff"]  # fmt: skip

_TOTALS = ("rows", "ok", "error", "prompt_tokens", "completion_tokens", "input_cost_pico",
           "output_cost_pico", "last_written", "unpriced", "invalid", "cached_tokens", "cached_saved_pico", "cached_unkept")  # fmt: skip


class Journal(KeyIndex, InflightBook, SpendBook, AttemptBook, ObservedBook):
    """Open with ``Journal.open``; ``add`` records a finished row; ``flush`` commits."""

    def __init__(self, directory: Path, conn: sqlite3.Connection) -> None:
        self.directory = directory
        self.conn = conn
        self._pending: list[Entry] = []
        self._pending_attempts: list[tuple[Any, ...]] = []
        self._superseded: list[tuple[str, int]] = []
        # Rows the plan sends again while they have an entry: row_id -> CARRY or RESUME.
        self.replacing: dict[str, int] = {}
        self.inflight_log: InflightLog | None = None  # opened by a run (``start_inflight``)
        self._scheduled = False
        self.write_error: sqlite3.Error | None = None
        self.rescued = 0  # rows written to the rescue file instead
        self.imported = 0  # rows a previous run rescued, imported at open
        self.discarded: tuple[int, str] | None = None  # failures of other settings, paid nothing
        self.resized: tuple[int, int, int] | None = None  # max_tokens old, new; rows reweighed
        self.unsaved: list[Entry] = []  # rows that could not be written anywhere
        self.keyed_to = 0  # rows up to this ``seq`` are in the request-key index (``index_keys``)
        self._unkeyed = 0
        self._tail: dict[str, str] = {}  # request key -> row_id of the answers written since
        # Rows by status when opened: one scan serves the resume decision and the progress total.
        self.counts_before = self.status_counts()
        self.rows_before = sum(self.counts_before.values())
        try:
            self.has_attempts = conn.execute("SELECT EXISTS (SELECT 1 FROM attempts)").fetchone()[0] == 1
        except sqlite3.OperationalError:  # an older journal, opened read-only
            self.has_attempts = False

    @classmethod
    def open(
        cls, directory: Path, settings: dict[str, Any], *, restart: bool = False, relabel: bool = False,
        adopt: bool = True,
    ) -> Journal:  # fmt: skip
        """Open or create the journal in ``directory``; refuse one written with other settings,
        unless ``adopt`` and nothing was paid from it, or only ``max_tokens`` differs: then these
        settings replace them.

        ``relabel`` (``--reparse``) accepts another label set or schema: the stored replies are
        read again under the new one, and nothing is sent.
        """
        if restart and directory.exists():
            for name in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm"):
                (directory / name).unlink(missing_ok=True)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            conn = connect(db_path(directory))
            conn.executescript(SCHEMA)
            migrate(conn)
        except (OSError, sqlite3.Error) as exc:
            raise JobError(f"{directory}: cannot open the checkpoint journal: {exc}") from None
        journal = cls(directory, conn)
        stored = journal.get_meta("settings")
        if relabel and stored is not None and stored.get("labeling") != settings.get("labeling"):
            stored = {**stored, "labeling": settings.get("labeling")}
            if stored == settings:  # the labels or schema alone: kept (any other change is refused)
                journal.set_meta("settings", stored)
        if stored is not None and stored == settings:
            journal.imported = journal._import_rescued()
            if journal.imported:
                journal.counts_before = journal.status_counts()
                journal.rows_before = sum(journal.counts_before.values())
        if stored is None:
            journal.set_meta("settings", settings)
            journal.set_meta("schema_version", SCHEMA_VERSION)
            journal.set_meta("created_at", time.time())
        elif stored != settings and adopt and journal.never_sent():
            # Only an estimate was kept (reports/estimate.py): the run's settings stand, and the
            # estimate too when it was of the same requests (the sandbox changes no request).
            if {k for k in stored.keys() | settings.keys() if stored.get(k) != settings.get(k)} != {
                "sandbox"
            }:
                conn.execute("DELETE FROM meta WHERE key = 'estimate'")
            conn.execute("DELETE FROM meta WHERE key = ?", (SANDBOX_ANSWERS,))  # nothing answered yet
            journal.set_meta("settings", settings)
        else:
            diffs = settings_diff(stored, settings)
            # A run stopped as its first rows all failed (a setting to fix: the stop says so)
            # answered and paid for nothing: its failures go, to be sent with these settings.
            free = bool(diffs) and adopt and journal.paid_nothing(RESCUE_NAME)
            resized = None if free or not adopt else length_change(stored, settings)
            if resized is not None:
                # Only max_tokens: what was answered stands, rows refused over the window are
                # weighed again (the summary's hint to lower it must not end in --restart).
                journal.set_meta("settings", settings)
                journal.resized = (*resized, journal.reweigh_over_window())
            elif diffs:
                conn.close()
                if free:
                    fresh = cls.open(directory, settings, restart=True, relabel=relabel)
                    fresh.discarded = (journal.rows_before, "; ".join(diffs))
                    return fresh
                raise SettingsMismatch(mismatch(directory, stored, settings, diffs))
        journal.index_keys()  # what an earlier run left unindexed (or a migration)
        return journal

    def never_sent(self) -> bool:
        """No row, attempt, request maybe billed or rescued reply: nothing was ever sent."""
        billed = self.maybe_billed()["requests"] or (self.directory / RESCUE_NAME).exists()
        return not (self.rows_before or self.has_attempts or billed)

    @classmethod
    def open_readonly(cls, directory: Path) -> Journal:
        path = db_path(directory)
        if not path.exists():
            raise JobError(f"{directory}: no batchllm journal here")
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
            conn.execute("PRAGMA busy_timeout=5000").execute("SELECT COUNT(*) FROM sqlite_master")
        except sqlite3.Error as exc:
            raise JobError(f"{path}: cannot read the journal: {exc}") from None
        return cls(directory, conn)

    # -- meta --------------------------------------------------------------------------------

    def get_meta(self, key: str) -> Any:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else orjson.loads(row[0])

    def set_meta(self, key: str, value: Any) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, orjson.dumps(value).decode())
        )

    # -- writing -----------------------------------------------------------------------------

    def add(self, record: Entry) -> None:
        """Record a finished row; committed with the others of this loop turn."""
        if self.replacing and self.replacing.pop(record.row_id, 0):
            # Answered without a request of its own (a copy) or refused: nothing resumes.
            self._superseded.append((record.row_id, CARRY_ENTRY))
        self._pending.append(record)
        self._schedule()

    def resumed(self, row_id: str) -> None:
        """A labeling row sent again is booked from all its attempts, even when it needed no new
        request: its old entry's cost lives on in them (the new entry sums them)."""
        if self.replacing and self.replacing.get(row_id) == RESUME_ATTEMPTS:
            del self.replacing[row_id]
            self.supersede(row_id, RESUME_ATTEMPTS)

    def supersede(self, row_id: str, how: int) -> None:
        """The row's entry is about to be replaced: keep its cost (``CARRY_ENTRY``: in
        ``carried``; ``RESUME_ATTEMPTS``: as its attempts) and remove it, with the next commit."""
        self._superseded.append((row_id, how))
        self._schedule()

    def add_attempt(self, row_id: str, seq: int, a: Attempt, confidence: str | None = None) -> None:
        """Record one request of a labeling row as it comes back (committed like ``add``), with its
        confidence as ``RowLabeler.journaled`` gives it."""
        self._pending_attempts.append(
            (row_id, seq, a.sample, a.kind, a.text, a.prompt_tokens, a.completion_tokens,
             a.input_cost_pico, a.output_cost_pico, a.truncated, a.pack_id, a.pack_position, a.endpoint,
             a.served_model, confidence, a.cached_tokens)
        )  # fmt: skip
        self._schedule()

    def leaving(self, row_id: str) -> None:
        """A request answering this row leaves now: an entry it replaces is superseded (a packed
        request answers several rows; ``sent`` writes it down under the first)."""
        if self.replacing and (how := self.replacing.pop(row_id, 0)):
            self.supersede(row_id, how)

    def sent(self, row_id: str, worst_pico: int, again: bool = False) -> None:
        """Write down that a request for this row is leaving now (before it does); ``again``:
        a retry of the request written down last."""
        if self.replacing and (how := self.replacing.pop(row_id, 0)):
            self.supersede(row_id, how)
        if self.inflight_log is not None:
            self.inflight_log.sent(row_id, worst_pico, again)

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop (library use from sync code): commit now
                self.flush()

    def flush(self) -> None:
        self._scheduled = False
        if not self._pending and not self._pending_attempts and not self._superseded:
            return
        pending, self._pending = self._pending, []
        attempts, self._pending_attempts = self._pending_attempts, []
        superseded, self._superseded = self._superseded, []
        conn = self.conn
        try:
            conn.execute("BEGIN")
            for row_id, how in superseded:  # before this commit's new attempts and entries
                self._supersede(row_id, how)
            if attempts:
                conn.executemany(INSERT_ATTEMPT, attempts)
            conn.executemany(*insert_rows(pending))
            self._unkeyed += len(pending)
            keyed_to = self._index_keys() if self._unkeyed >= KEY_BATCH else None
            conn.execute("COMMIT")
            if keyed_to is not None:
                self.keyed_to, self._unkeyed = keyed_to, 0
                self._tail.clear()
            else:
                tail = self._tail
                for e in pending:
                    if e.request_key is not None and e.status == "ok" and e.answered_by is None:
                        tail[e.request_key] = e.row_id
            if self.inflight_log is not None:  # committed: no longer at risk
                done = [e.row_id for e in pending]
                if attempts:  # a row's last attempt and its entry, in one commit, are one reply
                    done = list(dict.fromkeys(done + [a[0] for a in attempts]))
                self.inflight_log.done(done)
        except sqlite3.Error as exc:
            # Disk full, I/O error...: these replies are paid for. Keep them in a plain file the
            # next run imports, and tell the dispatcher (``write_error``) to stop sending.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if self.write_error is None:
                self.write_error = exc
            # The superseded entries stay as they were: the rescued rows replace them on import,
            # so their earlier cost goes with them (a rescued row is kept whole, not carried).
            self._rescue(pending, attempts)

    def _rescue(self, records: list[Entry], attempts: list[tuple[Any, ...]] | None = None) -> None:
        try:
            write_rescued(self.directory / RESCUE_NAME, records, attempts or [])
            self.rescued += len(records)
        except OSError:
            self.unsaved.extend(records)

    def _import_rescued(self) -> int:
        """Rows a previous run could not commit (see ``flush``): into the journal, then gone."""
        path = self.directory / RESCUE_NAME
        if not path.exists():
            return 0
        records, attempts = read_rescued(path)
        self.conn.execute("BEGIN")
        self.conn.executemany(INSERT_ATTEMPT, [(*a, None)[:16] for a in attempts])  # older: no cached
        self.conn.executemany(INSERT_ROW, records)
        self.conn.execute("COMMIT")
        path.unlink()
        return len(records)

    def close(self) -> None:
        self.flush()
        self.stop_inflight()
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        self.conn.close()

    # -- reading -----------------------------------------------------------------------------

    def unfinished(
        self, row_ids: Sequence[str], hashes: Sequence[str] | None = None
    ) -> list[tuple[int, str | None, bool]]:
        """The rows of a batch that are not done: (index, status, same content), status None for
        a new row, ``TRANSIENT`` for one that failed for the server's reasons (sent again).

        "Done" is ``ok`` and, when ``hashes`` are given (``--id-column``), with the same content
        hash. The join runs inside SQLite: a finished row costs Python nothing."""
        if hashes is None:
            cur = self.conn.execute(
                f"SELECT i.key, {STATUS}, 1 FROM json_each(?) AS i "
                "LEFT JOIN rows AS r ON r.row_id = i.value "
                "WHERE r.row_id IS NULL OR r.status != 'ok'",
                (orjson.dumps(list(row_ids)),),
            )
        else:
            cur = self.conn.execute(
                f"SELECT i.key, {STATUS}, r.content_hash IS json_extract(i.value, '$[1]') "
                "FROM json_each(?) AS i LEFT JOIN rows AS r ON r.row_id = json_extract(i.value, '$[0]') "
                "WHERE r.row_id IS NULL OR r.status != 'ok' OR r.content_hash != json_extract(i.value, '$[1]')",
                (orjson.dumps(list(zip(row_ids, hashes, strict=True))),),
            )
        return cur.fetchall()

    def status_counts(self) -> dict[str, int]:
        return dict(self.conn.execute("SELECT status, COUNT(*) FROM rows GROUP BY status").fetchall())

    def fetch(self, row_ids: Sequence[str]) -> dict[str, Entry]:
        """Full entries for ``row_ids`` (those the journal has)."""
        cur = self.conn.execute(
            f"SELECT {', '.join(COLUMNS)} FROM rows WHERE row_id IN (SELECT value FROM json_each(?))",
            (orjson.dumps(list(row_ids)),),
        )
        return {r[0]: Entry._make(r) for r in cur}

    def requests_between(self, start: float, end: float) -> int:
        """The requests the entries finished between two times took, retries included (a row
        answered by a copy or the cache took none; a packed request counts for each of its rows)."""
        row = self.conn.execute(
            "SELECT COALESCE(SUM(attempts), 0) FROM rows WHERE finished_at >= ? AND finished_at < ?",
            (start, end),
        ).fetchone()
        return int(row[0])

    def cost_between(self, start: float, end: float) -> int:
        """What the entries finished between two times cost, in picodollars (priced ones)."""
        row = self.conn.execute(
            "SELECT COALESCE(SUM(input_cost_pico + output_cost_pico), 0) FROM rows "
            "WHERE finished_at >= ? AND finished_at <= ?",
            (start, end),
        ).fetchone()
        return int(row[0])

    def totals(self) -> dict[str, int]:
        row = self.conn.execute(
            "SELECT COUNT(*), SUM(status = 'ok'), SUM(status = 'error'), "
            "COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0), "
            "COALESCE(SUM(input_cost_pico), 0), COALESCE(SUM(output_cost_pico), 0), MAX(finished_at), "
            "SUM(status = 'ok' AND input_cost_pico IS NULL), SUM(status = 'invalid'), "
            "COALESCE(SUM(cached_tokens), 0), COALESCE(SUM(cached_saved_pico), 0), COALESCE(SUM(CASE WHEN cached_saved_pico IS NULL THEN cached_tokens END), 0) FROM rows"
        ).fetchone()
        totals = {k: v or 0 for k, v in zip(_TOTALS, row, strict=True)}
        totals["last_written"] = row[7]  # None for an empty journal
        # What rows not finished yet paid for: earlier answers of rows sent again, and the
        # journaled requests of labeling rows with no entry (yet).
        carried = self._carried_sums()
        partial = self._partial_sums()
        for k, name in enumerate(
            ("prompt_tokens", "completion_tokens", "input_cost_pico", "output_cost_pico")
        ):
            totals[name] += carried[k] + partial[k]
        return totals
