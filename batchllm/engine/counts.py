"""The row counts every account of an output states, each defined once.

The end-of-run summary (from the output's rows as written, output.py), ``report`` (from the
output file) and ``status`` (from the journal) each read rows in their own form; what makes a
row count is decided here, for the three forms side by side, so they never disagree:

- truncated: the row's (last) reply was cut at max_tokens, whatever the row's status: a labeling
  row whose answer was cut off is usually invalid, and the cut reply was billed all the same.
  A row with no reply of its own (refused, or failed before any reply) has none to cut.
- from the cache: every request of the row was answered by the response cache (``cached``).
- answered by an identical row: the row copied the reply an identical row paid for
  (``answered_by``); it counts as that, never also as a cache hit, even when the row it copied
  was itself served by the cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from ..records import Entry

if TYPE_CHECKING:  # only ``report`` reads a frame: a run never imports pandas
    import pandas as pd


def plural(n: int, noun: str) -> str:
    """``1 row``, ``2 rows``, ``1,000 rows``; ``1 reply``, ``2 replies``."""
    if n == 1:
        return f"1 {noun}"
    return f"{n:,} {noun[:-1]}ies" if noun.endswith("y") else f"{n:,} {noun}s"


def never_paid_twice(copied: int, from_cache: int) -> str:
    """The line the summary, ``report`` and ``status`` say these counts in (each adds its own tail)."""
    return f"never paid twice: {plural(copied, 'row')} answered by an identical row's reply, {from_cache:,} from the cache"


class RowCounts(NamedTuple):
    truncated: int = 0
    from_cache: int = 0
    answered_by_identical_rows: int = 0


def truncated(e: Entry) -> bool:
    return e.prompt_tokens is not None and bool(e.truncated)


def from_cache(e: Entry) -> bool:
    return bool(e.cached) and e.answered_by is None


def copied(e: Entry) -> bool:
    return e.answered_by is not None


# The same three, over the journal's rows table (engine/journal.py).
JOURNAL_SQL = (
    "SELECT COALESCE(SUM(prompt_tokens IS NOT NULL AND truncated = 1), 0), "
    "COALESCE(SUM(cached = 1 AND answered_by IS NULL), 0), "
    "COALESCE(SUM(answered_by IS NOT NULL), 0) FROM rows"
)


def of_frame(frame: pd.DataFrame) -> RowCounts:
    """The same three over an output's rows (``report``); an output from before the cache has
    no ``cached`` column, and its ``truncated`` column is empty where a row had no reply."""
    cut = int(frame["truncated"].fillna(False).astype(bool).sum()) if "truncated" in frame else 0
    if "cached" not in frame.columns:
        return RowCounts(cut)
    copies = frame["answered_by"].notna()
    cached = frame["cached"].fillna(False).astype(bool) & ~copies
    return RowCounts(cut, int(cached.sum()), int(copies.sum()))
