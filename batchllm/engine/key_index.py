"""The request-key index of a journal: which rows of this output already answered a request
(reuse.py asks ``answered`` before a batch is sent). Mixed into ``journal.Journal``.

The index (table ``keyed``) is kept in bulk, every ``KEY_BATCH`` rows, sorted: kept row by row,
every commit rewrote an index page per row, half of a row's journal cost (make bench). The
answers written since the last bulk update are kept in memory (``_tail``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

import orjson

from ..records import Entry
from .journal_schema import COLUMNS

KEY_BATCH = 8192  # rows written between two bulk updates of the request-key index


class KeyIndex:
    conn: sqlite3.Connection
    keyed_to: int  # rows up to this ``seq`` are in the index
    _unkeyed: int
    _tail: dict[str, str]  # request key -> row_id of the answers written since

    def get_meta(self, key: str) -> Any:
        raise NotImplementedError  # the journal's

    def set_meta(self, key: str, value: Any) -> None:
        raise NotImplementedError

    def fetch(self, row_ids: Sequence[str]) -> dict[str, Entry]:
        raise NotImplementedError

    def index_keys(self) -> None:
        """Index the request keys of the rows not indexed yet, in one transaction."""
        self.keyed_to = int(self.get_meta("keyed_to") or 0)
        self.conn.execute("BEGIN")
        keyed_to = self._index_keys()
        self.conn.execute("COMMIT")
        self.keyed_to, self._unkeyed = keyed_to, 0
        self._tail.clear()

    def _index_keys(self) -> int:
        # Sorted, a few thousand at a time, each index page is written once per batch; kept row
        # by row, every commit rewrote a page per row (half of a row's journal cost: make bench).
        conn = self.conn
        top = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM rows").fetchone()[0]
        conn.execute(
            "INSERT OR IGNORE INTO keyed (key, seq) SELECT request_key, seq FROM rows WHERE seq > ? "
            "AND request_key IS NOT NULL AND status = 'ok' AND answered_by IS NULL ORDER BY request_key",
            (self.keyed_to,),
        )
        self.set_meta("keyed_to", top)
        return int(top)

    def answered(self, keys: Sequence[str]) -> dict[str, Entry]:
        """Rows of this output already answered (ok) for these request keys: key -> entry.

        Rows up to ``keyed_to`` are found through the index, the few written since (this run's,
        as the journal is opened with everything indexed) through ``_tail``.
        """
        found: list[Entry] = []
        if self.keyed_to:  # about a microsecond a key: not while nothing is indexed
            columns = ", ".join(f"r.{c}" for c in COLUMNS)
            cur = self.conn.execute(
                f"SELECT {columns} FROM keyed AS k JOIN rows AS r ON r.seq = k.seq "
                "WHERE k.key IN (SELECT value FROM json_each(?)) AND r.request_key = k.key "
                "AND r.status = 'ok' AND r.answered_by IS NULL",
                (orjson.dumps(list(keys)),),
            )
            found = [Entry._make(r) for r in cur]
        recent = [self._tail[k] for k in keys if k in self._tail]
        if recent:
            found += self.fetch(recent).values()
        out: dict[str, Entry] = {}
        for e in found:
            if e.request_key is not None and e.status == "ok" and e.answered_by is None:
                out.setdefault(e.request_key, e)
        return out
