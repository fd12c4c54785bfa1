"""What a journal's answered rows tell an estimate (reports/estimate.py, a pilot's or an earlier
run's): each row's completion tokens and requests, mixed into ``journal.Journal``.

A row the response cache answered paid no tokens, so what its replies were is kept apart in the
journal's ``meta`` by the run that served them (engine/reuse.py ``remember``): their lengths, one
request each, and a labeling job's samples and re-asks the cache answered, which are requests of
rows already counted, not rows of their own.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

CACHED_LENGTHS = "cached_completions"  # meta: lengths of cached replies runs served
CACHED_MORE = "cached_more"  # meta: [requests, completion tokens] of cached samples and re-asks


class ObservedBook:
    conn: sqlite3.Connection

    def get_meta(self, key: str) -> Any:
        raise NotImplementedError  # the journal's

    def set_meta(self, key: str, value: Any) -> None:
        raise NotImplementedError

    def observed(self) -> tuple[list[float], list[float]]:
        """Completion tokens and requests of every answered row (what an estimate learns from); a
        cached row's come from ``meta``: a request each, or a share of all a labeling job's."""
        rows = self.conn.execute(
            # A row answered took a request at least, even one whose re-asks the cache answered.
            "SELECT completion_tokens, MAX(attempts, 1) FROM rows WHERE completion_tokens IS NOT NULL "
            "AND answered_by IS NULL AND cached IS NOT 1"
        ).fetchall()
        completions: list[float] = [int(r[0]) for r in rows]
        requests: list[float] = [int(r[1]) for r in rows]
        lengths = self.get_meta(CACHED_LENGTHS) or {}
        more = self.get_meta(CACHED_MORE) or (0, 0)
        if more[0]:
            # A labeling job's: every reply the cache served, shared by the rows it answered
            # (a row that voted took three, one sure of its first answer one).
            (n,) = self.conn.execute(
                "SELECT COUNT(*) FROM rows WHERE cached = 1 AND answered_by IS NULL"
            ).fetchone()
            if n:
                served = sum(lengths.values()) + more[0]
                tokens = sum(int(k) * v for k, v in lengths.items()) + more[1]
                return completions + [tokens / n] * n, requests + [max(1.0, served / n)] * n
        for length, count in lengths.items():
            completions += [int(length)] * count
            requests += [1] * count
        return completions, requests

    def add_cached_lengths(self, lengths: Mapping[int, int], more: Sequence[int] = (0, 0)) -> None:
        """Add the lengths of cached replies a run served (length -> replies); ``more``: requests
        and completion tokens of the samples and re-asks it served."""
        merged = Counter({int(k): v for k, v in (self.get_meta(CACHED_LENGTHS) or {}).items()})
        merged.update(lengths)
        self.set_meta(CACHED_LENGTHS, {str(k): v for k, v in sorted(merged.items())})
        if any(more):
            old = self.get_meta(CACHED_MORE) or (0, 0)
            self.set_meta(CACHED_MORE, [a + b for a, b in zip(old, more, strict=True)])
