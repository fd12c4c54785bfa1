"""A journal's requests of labeling rows, read back: a labeling row resumes from them (plan.py),
``--reparse`` reads their replies again (labeled.py), a batch import reads what it already has.
Mixed into ``journal.Journal``; the journal writes them (``add_attempt``, ``supersede``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

import orjson

from ..labeling.rows import Attempt
from ..records import Entry


class AttemptBook:
    conn: sqlite3.Connection

    def fetch(self, row_ids: Sequence[str]) -> dict[str, Entry]:
        raise NotImplementedError  # the journal's

    def attempts_for(self, row_ids: Sequence[str]) -> dict[str, list[Attempt]]:
        """The journaled requests of these rows, in order (a labeling row resumes from them)."""
        cur = self.conn.execute(
            "SELECT row_id, sample, kind, text, prompt_tokens, completion_tokens, input_cost_pico, "
            "output_cost_pico, truncated, pack_id, pack_position, endpoint, served_model, confidence, "
            "cached_tokens "
            "FROM attempts WHERE row_id IN (SELECT value FROM json_each(?)) ORDER BY row_id, seq",
            (orjson.dumps(list(row_ids)),),
        )
        out: dict[str, list[Attempt]] = {}
        for r in cur:
            sure = None if r[13] is None else orjson.loads(r[13])  # labeling/confidence.py ``stored``
            out.setdefault(r[0], []).append(
                Attempt(r[1], r[2], r[3], r[4], r[5], r[6], r[7], bool(r[8]), r[9], r[10], r[11], r[14] or 0,
                        r[12], sure)
            )  # fmt: skip
        return out

    def first_attempts(self, row_ids: Sequence[str]) -> dict[str, list[Attempt]]:
        """A labeling row answered in one request keeps no attempt (its entry has the reply):
        that reply as its attempt 0, as ``supersede`` stores it when the row is re-asked."""
        if not row_ids:
            return {}
        return {
            r: [Attempt(0, "first", e.response, e.prompt_tokens or 0, e.completion_tokens or 0,
                        e.input_cost_pico, e.output_cost_pico, bool(e.truncated), endpoint=e.endpoint,
                        cached_tokens=e.cached_tokens or 0, served_model=e.served_model,
                        confidence=_kept(e.extra))]
            for r, e in self.fetch(row_ids).items()
            if e.response is not None
        }  # fmt: skip

    def labeled_rows(self) -> list[str]:
        """Rows of a labeling job (``--reparse`` reads their replies again)."""
        return [r[0] for r in self.conn.execute("SELECT row_id FROM rows WHERE extra IS NOT NULL")]


def _kept(extra: str | None) -> Any:
    """The confidence a row's entry keeps, as its attempt would (labeling/confidence.py ``stored``)."""
    if extra is None:
        return None
    x = orjson.loads(extra)
    value, sure = x.get("value"), x.get("confidence")
    return [value, sure] if isinstance(value, str) and isinstance(sure, (int, float)) else sure
