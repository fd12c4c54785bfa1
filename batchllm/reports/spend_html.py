"""``batchllm spend --html``: one self-contained page (inline SVG, no script, no network).

Spend by day stacked by job, cost per 1,000 rows by job and day, the month's forecast, the
breakdown asked for, and the runs that failed or were killed; the figures are spend.py's.
"""

from __future__ import annotations

import html
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from ..folders import make_folders
from ..pricing import PICO_PER_USD
from . import svg
from .spend_figures import SUMS, groups, per_day_per_thousand, rate_from, unpriced_text
from .spend_text import UNKNOWN, total_cost

MAX_JOBS = 7  # stacked series; the rest are summed as "other jobs"


def _days(first: str, last: str) -> list[str]:
    d0, d1 = date.fromisoformat(first), date.fromisoformat(last)
    return [(d0 + timedelta(days=i)).isoformat() for i in range((d1 - d0).days + 1)]


def _by_day_and_job(report: dict[str, Any]) -> tuple[list[str], dict[str, list[float]]]:
    runs = [c for c in report["_cells"] if c.priced]  # in day order; unpriced runs have no cost to draw
    if not runs:
        return [], {}
    days = _days(runs[0].day, runs[-1].day)
    index = {d: i for i, d in enumerate(days)}
    totals: dict[str, int] = {}
    for r in runs:
        totals[r.job] = totals.get(r.job, 0) + r.cost_pico
    top = sorted(totals, key=lambda j: -totals[j])[:MAX_JOBS]
    series = {job: [0.0] * len(days) for job in top}
    for r in runs:
        name = r.job if r.job in series else "other jobs"
        series.setdefault(name, [0.0] * len(days))[index[r.day]] += r.cost_pico / PICO_PER_USD
    return days, series


def _per_thousand(report: dict[str, Any], days: list[str], order: list[str]) -> dict[str, list[float | None]]:
    """Each job's line over the bars' days, in the colour of its bars (``order``)."""
    lines = per_day_per_thousand(report["_cells"])
    series: dict[str, list[float | None]] = {}
    for job in [j for j in order if j in lines]:
        at = dict(lines[job])
        series[job] = [at[d] / PICO_PER_USD if d in at else None for d in days]
    return series


def _table(header: list[str], rows: list[list[str]], numeric_from: int) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td{' class=n' if i >= numeric_from else ''}>{html.escape(c)}</td>" for i, c in enumerate(r)
        )
        + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def write_spend_html(path: Path, report: dict[str, Any]) -> None:
    m, t = report["month"], report["total"]
    by = report["by"] or ["job"]
    sections = [
        "<h1>Sandbox runs (play money)</h1>" if report["sandbox"] else "<h1>Spend</h1>",
        f"<p>{html.escape(report['since'])} to {html.escape(report['until'])} &middot; "
        f"ledger {html.escape(report['ledger'])}</p>",
        _table(
            ["", "runs", "rows ok", "requests", "cost"],
            [
                [
                    "total",
                    f"{t['runs']:,}",
                    f"{t['rows_ok']:,}",
                    f"{t['requests']:,}",
                    total_cost(t),
                ]
            ],
            1,
        ),
        f"<p>This month ({html.escape(m['month'])}, UTC): {svg.money(m['spent_usd'])} so far"
        + (f" + {unpriced_text(m['unpriced'])}, cost unknown" if m["unpriced"] else "")
        + "; at "
        f"{svg.money(m['daily_rate_usd'])} a day ({rate_from(m)}), "
        f"<b>{svg.money(m['forecast_usd'])}</b> by its end ({m['days_left']:g} days left).</p>",
    ]
    days, series = _by_day_and_job(report)
    per_series = _per_thousand(report, days, list(series))
    plots = [
        svg.stacked_bars("Spend by day, by job", days, series),
        svg.lines("Cost per 1,000 rows answered, by job", days, per_series),
    ]
    rows = [
        [
            *(str(g[k]) for k in by),
            *(f"{g[s]:,}" for s in SUMS),
            svg.money(g["cost_usd"]) if g["priced"] else UNKNOWN,
        ]
        for g in groups(report["_cells"], by)
    ]
    sections.append(f"<h2>By {html.escape(', '.join(by))}</h2>")
    sections.append(_table([*by, "runs", "rows ok", "requests", "prompt tokens", "completion tokens", "cost"],
                           rows, len(by)))  # fmt: skip
    if report["cost_per_1k_rows"]:
        sections.append("<h2>Cost per 1,000 rows answered</h2>")
        sections.append(
            _table(
                ["job", "rows ok", "per 1,000 rows", "first day", "last day", "change"],
                [
                    [
                        x["job"],
                        f"{x['rows_ok']:,}",
                        UNKNOWN
                        if x["unpriced"] and not x["rows_ok"]
                        else svg.money(x["cost_per_1k_rows_usd"]),
                        f"{x.get('first_day', '')} {svg.money(x.get('first_usd'))}"
                        if "first_day" in x
                        else "",
                        f"{x.get('last_day', '')} {svg.money(x.get('last_usd'))}" if "last_day" in x else "",
                        f"{x['change_pct']:+g}%" if x.get("change_pct") is not None else "",
                    ]
                    for x in report["cost_per_1k_rows"]
                ],  # fmt: skip
                1,
            )
        )
    p = report["problems"]
    if p["count"]:
        sections.append(f"<h2>Runs that failed or were killed ({p['count']:,})</h2>")
        sections.append(
            _table(
                ["started", "job", "status", "exit", "cost", "message"],
                [
                    [
                        r["started_at"],
                        r["job"],
                        "killed" if r["killed"] else r["status"],
                        "" if r["exit_code"] is None else str(r["exit_code"]),
                        svg.money(r["cost_usd"]) if r["priced"] else UNKNOWN,
                        (r["message"] or r.get("note") or "")[:240],
                    ]
                    for r in p["runs"]
                ],  # fmt: skip
                3,
            )
        )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>batchllm spend</title>
<style>{svg.STYLE}</style></head><body>
{sections[0]}{sections[1]}{sections[2]}{sections[3]}
<div class="plots">{"".join(plots)}</div>
{"".join(sections[4:])}
</body></html>
"""
    make_folders(path, "--html")
    path.write_text(page, encoding="utf-8")
