"""What a journal knows of money (costs beyond rows' entries, prices of unpriced rows, cost by
endpoint): mixed into ``journal.Journal``.

A row sent again while the journal holds an entry for it (``--retry-errors``,
``--refresh-changed``) must not lose what its earlier answers cost. ``supersede`` (run in the
journal's group commit, before the new attempts and entries) moves the old entry's tokens and
costs into the ``carried`` table, or, for a labeling row that goes on from its attempts, keeps
them as attempts (its one-request entry becoming attempt 0), and removes the entry. Every cost a
row ever had thus stays in exactly one place: its entry, its attempts while it has no entry,
or ``carried``. ``spent_pico``, ``Journal.totals`` and the output (``unsettled``) add all three.
A row with attempts and no entry that an import answers (an unreadable pack's shares, then a
readable reply: backends/batch_transfer.py) has its attempts carried (``CARRY_ATTEMPTS``): the
imported entry holds its own reply only.

A reply paid for and not kept goes to ``carried`` too: ``import-batch`` refuses the result
lines of rows whose request changed since ``export-batch`` (backends/batch_keys.py), and the row
stays pending, its later answer's cost added to it (``add_refused``). ``refused`` names the
lines so counted, so importing the same file again adds nothing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

import orjson

from .journal_schema import AS_ATTEMPT, CARRY, CARRY_PAID, CARRY_PRIOR

# How ``supersede`` keeps what a row paid before: a replaced entry's cost, carried or as attempt 0;
# a row with no entry answered by an import, its attempts' cost carried.
CARRY_ENTRY, RESUME_ATTEMPTS, CARRY_ATTEMPTS = 1, 2, 3
Paid = tuple[int, int, int, int]  # prompt tokens, completion tokens, input and output picodollars


class SpendBook:
    conn: sqlite3.Connection
    directory: Path
    counts_before: dict[str, int]
    rows_before: int
    has_attempts: bool

    def status_counts(self) -> dict[str, int]:
        raise NotImplementedError  # journal.Journal's

    def maybe_billed(self, current: bool = True, add: tuple[int, int] = (0, 0)) -> dict[str, int]:
        raise NotImplementedError  # inflight.InflightBook's

    def _supersede(self, row_id: str, how: int) -> None:
        conn = self.conn
        if how == CARRY_ATTEMPTS:
            conn.execute(CARRY_PRIOR, (row_id,))
            conn.execute(
                "DELETE FROM attempts WHERE row_id = ?1 AND row_id NOT IN (SELECT row_id FROM rows)",
                (row_id,),
            )
            return
        if how == RESUME_ATTEMPTS:
            conn.execute(AS_ATTEMPT, (row_id,))
        else:
            conn.execute(CARRY, (row_id,))
            conn.execute("DELETE FROM attempts WHERE row_id = ?", (row_id,))
        conn.execute("DELETE FROM rows WHERE row_id = ?", (row_id,))

    def add_refused(self, row_id: str, line: str, paid: Paid) -> bool:
        """Keep what a refused result ``line`` (an id of its own) cost as ``row_id``'s, once,
        committed now; False when this line was counted before."""
        conn = self.conn
        conn.execute("BEGIN")
        try:
            added = conn.execute("INSERT OR IGNORE INTO refused VALUES (?, ?)", (row_id, line)).rowcount == 1
            if added:
                conn.execute(CARRY_PAID, (row_id, 1, *paid))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return added

    def take_back_refused(self, kept: Sequence[tuple[str, str, Paid]]) -> tuple[int, int, int]:
        """Result lines refused before (``add_refused``) and kept now (the import that refused
        them had other settings): their cost is the row's entry's from now on, so it leaves
        ``carried`` (the provider billed each line once). Returns what was taken back: prompt
        and completion tokens, picodollars."""
        conn, back = self.conn, [0, 0, 0]
        conn.execute("BEGIN")
        try:
            for row_id, line, (pt, ct, ic, oc) in kept:
                if conn.execute("DELETE FROM refused WHERE row_id = ? AND line = ?", (row_id, line)).rowcount:
                    conn.execute(CARRY_PAID, (row_id, -1, -pt, -ct, -ic, -oc))
                    back = [back[0] + pt, back[1] + ct, back[2] + ic + oc]
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return back[0], back[1], back[2]

    def _carried_sums(self) -> Paid:
        try:
            row = self.conn.execute(
                "SELECT COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0), "
                "COALESCE(SUM(input_cost_pico), 0), COALESCE(SUM(output_cost_pico), 0) FROM carried"
            ).fetchone()
        except sqlite3.OperationalError:  # a journal from before schema 6, opened read-only
            return 0, 0, 0, 0
        return tuple(int(v) for v in row)  # type: ignore[return-value]

    def _partial_sums(self) -> Paid:
        row = self.conn.execute(
            "SELECT COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0), "
            "COALESCE(SUM(input_cost_pico), 0), COALESCE(SUM(output_cost_pico), 0) FROM attempts "
            "WHERE row_id NOT IN (SELECT row_id FROM rows)"
        ).fetchone()
        return tuple(int(v) for v in row)  # type: ignore[return-value]

    def unsettled(self, row_ids: Sequence[str]) -> dict[str, Paid]:
        """What rows paid for beyond their entry (or with no entry yet): earlier answers of rows
        sent again and the attempts of labeling rows not finished: row_id -> (prompt tokens,
        completion tokens, input and output picodollars). Empty when no row has any."""
        out: dict[str, Paid] = {}
        ids = orjson.dumps(list(row_ids))
        for r in self.conn.execute(
            "SELECT row_id, prompt_tokens, completion_tokens, input_cost_pico, output_cost_pico FROM carried "
            "WHERE row_id IN (SELECT value FROM json_each(?))",
            (ids,),
        ):
            out[r[0]] = (r[1], r[2], r[3], r[4])
        for r in self.conn.execute(
            "SELECT row_id, SUM(prompt_tokens), SUM(completion_tokens), COALESCE(SUM(input_cost_pico), 0), "
            "COALESCE(SUM(output_cost_pico), 0) FROM attempts WHERE row_id IN (SELECT value FROM json_each(?)) "
            "AND row_id NOT IN (SELECT row_id FROM rows) GROUP BY row_id",
            (ids,),
        ):
            old = out.get(r[0], (0, 0, 0, 0))
            out[r[0]] = (old[0] + r[1], old[1] + r[2], old[2] + r[3], old[3] + r[4])
        return out

    def has_unsettled(self) -> bool:
        """Does any row have a cost beyond its entry? (A scan of the attempts: ask once.)"""
        try:
            return bool(
                self.conn.execute(
                    "SELECT EXISTS (SELECT 1 FROM carried) OR EXISTS (SELECT 1 FROM attempts "
                    "WHERE row_id NOT IN (SELECT row_id FROM rows))"
                ).fetchone()[0]
            )
        except sqlite3.OperationalError:  # before schema 6
            return False

    def spent_pico(self) -> int:
        """All this output has paid for: finished rows, what rows sent again had cost before,
        and requests of rows not finished yet."""
        row = self.conn.execute(
            "SELECT COALESCE(SUM(input_cost_pico), 0) + COALESCE(SUM(output_cost_pico), 0) FROM rows"
        ).fetchone()
        carried, partial = self._carried_sums(), self._partial_sums()
        return int(row[0]) + carried[2] + carried[3] + partial[2] + partial[3]

    def paid_nothing(self, rescue_name: str) -> bool:
        """No answer, and no cost or request maybe billed: failures the server did not bill."""
        answered = self.counts_before.get("ok", 0) + self.counts_before.get("invalid", 0)
        rescued = (self.directory / rescue_name).exists()
        maybe = self.maybe_billed()["worst_pico"]  # with what a killed run left in its log
        return not (answered or rescued or self.has_attempts or self.spent_pico() or maybe)

    def forget_failures(self, row_ids: Sequence[str]) -> int:
        """Rows whose requests the server refused alike and did not bill (the first rows of a run,
        engine/stats.py ``FirstFailures``), and rows their refusal answered: pending again, so
        the run after the fix sends them. Returns how many."""
        ids = orjson.dumps(list(row_ids))
        conn = self.conn
        conn.execute("BEGIN")
        gone = conn.execute(
            "DELETE FROM rows WHERE status = 'error' AND input_cost_pico IS NULL "
            "AND output_cost_pico IS NULL AND (row_id IN (SELECT value FROM json_each(?1)) "
            "OR answered_by IN (SELECT value FROM json_each(?1)))",
            (ids,),
        ).rowcount
        conn.execute("COMMIT")
        return gone

    def reweigh_over_window(self) -> int:
        """Rows refused as over the context window with an earlier ``max_tokens`` (never sent,
        paid nothing): pending again, to be weighed with this run's. Returns how many."""
        conn = self.conn
        conn.execute("BEGIN")
        gone = conn.execute(
            "DELETE FROM rows WHERE status = 'error' AND error_class = 'ContextWindowExceeded' "
            "AND input_cost_pico IS NULL AND output_cost_pico IS NULL AND attempts = 0"
        ).rowcount
        conn.execute("COMMIT")
        self.counts_before = self.status_counts()
        self.rows_before = sum(self.counts_before.values())
        return gone

    def committed_pico(self) -> int:
        """What the cap must count: all this output paid for, and the worst case of every
        request a crash left in flight without a saved reply (it may have been billed)."""
        return self.spent_pico() + self.maybe_billed(current=False)["worst_pico"]

    def known_rows(self) -> list[str]:
        """Every row the journal has an entry for, or a cost: answered, or paid for and pending."""
        sql = "SELECT row_id FROM rows UNION SELECT row_id FROM attempts"
        if self.has_unsettled():
            sql += " UNION SELECT row_id FROM carried"
        return [r[0] for r in self.conn.execute(sql)]

    def by_endpoint(self) -> list[tuple[str, int, int, int, int, float | None]]:
        """A fleet's rows by the endpoint that answered: (name, rows, ok, error, cost in pico,
        mean latency in ms of its answers); empty for a journal no fleet wrote to."""
        return self.conn.execute(
            "SELECT endpoint, COUNT(*), SUM(status = 'ok'), SUM(status = 'error'), "
            "COALESCE(SUM(input_cost_pico + output_cost_pico), 0), AVG(latency_ms) FROM rows "
            "WHERE endpoint IS NOT NULL GROUP BY endpoint ORDER BY endpoint"
        ).fetchall()

    def price_unpriced(self, input_pico: int, output_pico: int, cached_input_pico: int | None = None) -> int:
        """Give rows done without a price (an unlisted model) this run's prices; returns how many.

        A known cost is never changed: a row costs what it cost when it was answered (live, or at
        a batch discount), so one output may hold rows at several prices.
        """
        # pricing.cost in SQL: cached prompt tokens at the cached input price.
        discount = 0 if cached_input_pico is None else input_pico - cached_input_pico
        cur = self.conn.execute(
            "UPDATE rows SET input_cost_pico = prompt_tokens * ? - COALESCE(cached_tokens, 0) * ?, "
            "output_cost_pico = completion_tokens * ? "
            "WHERE status = 'ok' AND (input_cost_pico IS NULL OR output_cost_pico IS NULL)",
            (input_pico, discount, output_pico),
        )
        return cur.rowcount
