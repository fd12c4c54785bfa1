"""Rows a journal holds that its input no longer has, and what they cost.

A journal keeps every row it was ever given: a nightly input that drops old rows, or a row edited
under a content-hash id (no ``--id-column``), leaves entries behind that no input row asks for.
They were paid for, so they stay in "all this output paid" (``Journal.totals``, ``status``, the
ledger), but they are not rows of the output: the Parquet file's costs add up to less. The
summary and ``report`` name the difference ("also paid: ... for N rows no longer in the input"),
so the figures agree once it is added, and ``Plan.todo`` counts only the input's own rows as done.

Which entries are outside the input is only known from a pass over it, which writing the output
makes anyway (output.py): it stores what it found under ``SEEN``, with the input's stamp (size and
modification time). A later run over an input with the same stamp takes the counts from there; a
run over another input forgets them (stamp None) until its output is written. A new journal starts
with none outside.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:
    from .journal import Journal

SEEN = "input_seen"


class Outside(NamedTuple):
    """Entries (by status) and costs of rows the journal holds and the input does not."""

    ok: int = 0
    error: int = 0
    invalid: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_pico: int = 0

    @classmethod
    def of(cls, seen: dict[str, int]) -> Outside:
        """As stored under ``SEEN``."""
        return cls(**{k: int(seen.get(k, 0)) for k in cls._fields})

    @property
    def rows(self) -> int:
        return self.ok + self.error + self.invalid

    def __bool__(self) -> bool:
        return bool(self.rows or self.cost_pico)


class Written(Protocol):
    """What the output's rows add up to (output.py ``Totals``)."""

    ok: int
    error: int
    invalid: int
    prompt_tokens: int
    completion_tokens: int

    @property
    def cost_pico(self) -> int: ...


def input_stamp(path: Path) -> list[int] | None:
    """The input as last changed: [size, mtime in ns], or None when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def on_open(journal: Journal, path: Path) -> None:
    """At a run's start: a new journal has nothing outside this input; a journal last counted
    against another input does not know what is outside this one (until the output is written)."""
    stamp = input_stamp(path)
    seen = journal.get_meta(SEEN)
    if journal.rows_before == 0 and not journal.has_unsettled():
        journal.set_meta(SEEN, {"stamp": stamp, **Outside()._asdict()})
    elif seen is not None and seen.get("stamp") != stamp:
        journal.set_meta(SEEN, {"stamp": None})


def known(journal: Journal, path: Path) -> Outside | None:
    """What is outside the input at ``path`` as last counted against it, or None: not known."""
    seen = journal.get_meta(SEEN)
    stamp = input_stamp(path)
    if not seen or stamp is None or seen.get("stamp") != stamp:
        return None
    return Outside.of(seen)


def count(journal: Journal, totals: Written, path: Path) -> Outside:
    """After writing the output (``totals``: its rows'), what the journal holds beyond them;
    stored for the runs and the ``status`` that follow."""
    t, by_status = journal.totals(), journal.status_counts()
    outside = Outside(
        ok=max(0, by_status.get("ok", 0) - totals.ok),
        error=max(0, by_status.get("error", 0) - totals.error),
        invalid=max(0, by_status.get("invalid", 0) - totals.invalid),
        prompt_tokens=max(0, t["prompt_tokens"] - totals.prompt_tokens),
        completion_tokens=max(0, t["completion_tokens"] - totals.completion_tokens),
        cost_pico=max(0, t["input_cost_pico"] + t["output_cost_pico"] - totals.cost_pico),
    )
    journal.set_meta(SEEN, {"stamp": input_stamp(path), **outside._asdict()})
    return outside
