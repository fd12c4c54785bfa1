"""The figures of ``batchllm spend``, computed from the ledger's runs summed by job, model,
provider and day (``Cell``, spend.py's query): groups by any keys, sums, cost per 1,000 rows and
how it moved, the page's per-day series, and where the month's daily rate comes from, in words.

A run whose model had no price (``Cell.priced`` false) has an unknown cost, never $0: a group
holds priced runs or unpriced ones (``priced``; an unpriced group's cost is None), and a total,
a month and a cost per 1,000 rows are of the priced runs, with the others beside them
(``unpriced``: how many, and their rows and tokens).
"""

from __future__ import annotations

import functools
from datetime import date
from typing import Any, NamedTuple

from ..pricing import usd_text

KEYS = ("job", "model", "provider", "day", "week", "month")
SUMS = ("runs", "rows_ok", "requests", "prompt_tokens", "completion_tokens")


class Cell(NamedTuple):
    """The runs of one job, model and provider on one day (UTC), summed in SQL: what every
    breakdown, the per-1,000-rows figures and the page's plots are built from, so a ledger of
    100,000 runs is a few hundred rows to Python."""

    job: str
    model: str
    provider: str
    day: str
    runs: int
    rows_ok: int
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_pico: int
    priced: int = 1  # 0: runs without prices, their cost unknown (ledger/store.py)

    def key(self, name: str) -> str:
        if name == "day":
            return self.day
        if name == "month":
            return self.day[:7]
        if name == "week":
            return _week(self.day)
        return str(getattr(self, name) or "")


@functools.cache
def _week(day: str) -> str:
    year, week, _ = date.fromisoformat(day).isocalendar()
    return f"{year}-W{week:02d}"


def _sums(members: list[Cell]) -> dict[str, Any]:
    return {s: sum(getattr(c, s) for c in members) for s in SUMS}


def sums(members: list[Cell]) -> dict[str, Any]:
    """The ``SUMS`` and the cost of some cells' priced runs, and the ``SUMS`` of the others
    (``unpriced``, None when there are none); with unpriced runs alone the cost is unknown (None)."""
    priced = [c for c in members if c.priced]
    unpriced = [c for c in members if not c.priced]
    out = _sums(priced)
    pico = sum(c.cost_pico for c in priced)
    out["cost_usd"] = usd_text(pico) if priced or not unpriced else None
    out["unpriced"] = _sums(unpriced) if unpriced else None
    out["_cost_pico"] = pico
    return out


def groups(runs: list[Cell], by: list[str]) -> list[dict[str, Any]]:
    """One group per distinct combination of the ``by`` keys and of priced or not, by cost
    (highest first, unpriced groups last), or in time order when the first key is a period."""
    buckets: dict[tuple[tuple[str, ...], bool], list[Cell]] = {}
    for r in runs:
        buckets.setdefault((tuple(r.key(k) for k in by), bool(r.priced)), []).append(r)
    out: list[dict[str, Any]] = []
    for (key, priced), members in buckets.items():
        pico = sum(c.cost_pico for c in members) if priced else 0
        group = {**dict(zip(by, key, strict=True)), **_sums(members)}
        group.update(cost_usd=usd_text(pico) if priced else None, priced=priced, _cost_pico=pico)
        out.append(group)
    if by and by[0] in ("day", "week", "month"):
        out.sort(key=lambda g: (*(g[k] for k in by), not g["priced"]))
    else:
        out.sort(key=lambda g: (not g["priced"], -g["_cost_pico"]))
    return out


def unpriced_text(u: dict[str, Any]) -> str:
    """Runs without prices, in words: "3 unpriced runs (12,000 rows)"."""
    runs, rows = u["runs"], u["rows_ok"]
    return f"{runs:,} unpriced run{'s' * (runs != 1)} ({rows:,} row{'s' * (rows != 1)})"


def rate_from(month: dict[str, Any]) -> str:
    """Where the daily rate comes from, in words: "the last 7 days' runs", "the last day's runs"."""
    days, runs = month["rate_from_days"], "priced runs" if month.get("unpriced") else "runs"
    return f"the last day's {runs}" if days == 1 else f"the last {days:g} days' {runs}"


def per_thousand(runs: list[Cell]) -> list[dict[str, Any]]:
    """Cost per 1,000 rows answered, by job: over the window, and how it moved from the first day
    with runs to the last; of the priced runs, the others beside (``unpriced``)."""
    by_job: dict[str, list[Cell]] = {}
    for r in runs:
        by_job.setdefault(r.job, []).append(r)
    out = []
    for job, cells in by_job.items():
        members = [r for r in cells if r.priced]
        unpriced = [r for r in cells if not r.priced]
        days: dict[str, list[int]] = {}
        for r in members:
            d = days.setdefault(r.key("day"), [0, 0])
            d[0] += r.cost_pico
            d[1] += r.rows_ok
        rows = sum(r.rows_ok for r in members)
        cost = sum(r.cost_pico for r in members)
        line: dict[str, Any] = {"job": job, "rows_ok": rows, "cost_per_1k_rows_usd": _per_1k(cost, rows)}
        line["unpriced"] = _sums(unpriced) if unpriced else None
        answered = [(day, c, n) for day, (c, n) in sorted(days.items()) if n]
        if len(answered) >= 2:
            (d0, c0, n0), (d1, c1, n1) = answered[0], answered[-1]
            first, last = c0 * 1000 // n0, c1 * 1000 // n1
            line["first_day"], line["first_usd"] = d0, usd_text(first)
            line["last_day"], line["last_usd"] = d1, usd_text(last)
            line["change_pct"] = round(100 * (last - first) / first, 1) if first else None
        out.append(line)
    out.sort(key=lambda x: x["job"])
    return out


def per_day_per_thousand(runs: list[Cell]) -> dict[str, list[tuple[str, int]]]:
    """job -> [(day, picodollars per 1,000 rows)], days with answered rows of priced runs only (the
    page's plot)."""
    acc: dict[str, dict[str, list[int]]] = {}
    for r in (r for r in runs if r.priced):
        d = acc.setdefault(r.job, {}).setdefault(r.key("day"), [0, 0])
        d[0] += r.cost_pico
        d[1] += r.rows_ok
    return {
        job: [(day, c * 1000 // n) for day, (c, n) in sorted(days.items()) if n] for job, days in acc.items()
    }


def _per_1k(cost: int, rows: int) -> str | None:
    return usd_text(cost * 1000 // rows) if rows else None
