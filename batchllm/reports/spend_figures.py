"""The figures of ``batchllm spend``, computed from the ledger's runs summed by job, model,
provider and day (``Cell``, spend.py's query): groups by any keys, sums, cost per 1,000 rows and
how it moved, the page's per-day series, and where the month's daily rate comes from, in words.
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


def sums(members: list[Cell]) -> dict[str, Any]:
    """The ``SUMS`` and the cost of some cells."""
    out: dict[str, Any] = {s: sum(getattr(c, s) for c in members) for s in SUMS}
    pico = sum(c.cost_pico for c in members)
    out["cost_usd"] = usd_text(pico)
    out["_cost_pico"] = pico
    return out


def groups(runs: list[Cell], by: list[str]) -> list[dict[str, Any]]:
    """One group per distinct combination of the ``by`` keys, by cost (highest first), or in
    time order when the first key is a period."""
    buckets: dict[tuple[str, ...], list[Cell]] = {}
    for r in runs:
        buckets.setdefault(tuple(r.key(k) for k in by), []).append(r)
    out = [{**dict(zip(by, key, strict=True)), **sums(members)} for key, members in buckets.items()]
    if by and by[0] in ("day", "week", "month"):
        out.sort(key=lambda g: tuple(g[k] for k in by))
    else:
        out.sort(key=lambda g: -g["_cost_pico"])
    return out


def rate_from(month: dict[str, Any]) -> str:
    """Where the daily rate comes from, in words: "the last 7 days' runs", "the last day's runs"."""
    days = month["rate_from_days"]
    return "the last day's runs" if days == 1 else f"the last {days:g} days' runs"


def per_thousand(runs: list[Cell]) -> list[dict[str, Any]]:
    """Cost per 1,000 rows answered, by job: over the window, and how it moved from the first day
    with runs to the last."""
    by_job: dict[str, list[Cell]] = {}
    for r in runs:
        by_job.setdefault(r.job, []).append(r)
    out = []
    for job, members in by_job.items():
        days: dict[str, list[int]] = {}
        for r in members:
            d = days.setdefault(r.key("day"), [0, 0])
            d[0] += r.cost_pico
            d[1] += r.rows_ok
        rows = sum(r.rows_ok for r in members)
        cost = sum(r.cost_pico for r in members)
        line: dict[str, Any] = {"job": job, "rows_ok": rows, "cost_per_1k_rows_usd": _per_1k(cost, rows)}
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
    """job -> [(day, picodollars per 1,000 rows)], days with answered rows only (the page's plot)."""
    acc: dict[str, dict[str, list[int]]] = {}
    for r in runs:
        d = acc.setdefault(r.job, {}).setdefault(r.key("day"), [0, 0])
        d[0] += r.cost_pico
        d[1] += r.rows_ok
    return {
        job: [(day, c * 1000 // n) for day, (c, n) in sorted(days.items()) if n] for job, days in acc.items()
    }


def _per_1k(cost: int, rows: int) -> str | None:
    return usd_text(cost * 1000 // rows) if rows else None
