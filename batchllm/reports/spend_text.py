"""``batchllm spend``'s report as a person or a program reads it: text and Markdown tables, JSON,
CSV (the report itself is spend.py's)."""

from __future__ import annotations

import csv
import io
from typing import Any

import orjson

from ..ledger.recover import GONE
from .spend_figures import SUMS, rate_from, unpriced_text
from .svg import money
from .tables import grid, public

UNKNOWN = "unknown (no price)"


def _money(text: str | None) -> str:
    """Readable money for the text tables (svg.money: cents from $1, else four significant
    digits); the JSON and CSV carry the exact figures."""
    return money(text)


def total_cost(t: dict[str, Any]) -> str:
    """A total's cost, and the runs without prices it leaves out: "$1.23 + 3 unpriced runs (12,000
    rows)"; "unknown: 3 unpriced runs (12,000 rows)" when no run had prices."""
    u = t.get("unpriced")
    if not u:
        return _money(t["cost_usd"])
    return f"{_money(t['cost_usd'])} + {unpriced_text(u)}" if t["runs"] else f"unknown: {unpriced_text(u)}"


def _group_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    by = report["by"]
    header = [*by, "runs", "rows ok", "requests", "prompt tokens", "completion tokens", "cost"]
    rows = [
        [*(g[k] for k in by), *(f"{g[s]:,}" for s in SUMS), _money(g["cost_usd"]) if g["priced"] else UNKNOWN]
        for g in report["groups"]
    ]
    t = report["total"]
    rows.append([*(["total"] + [""] * (len(by) - 1) if by else []), *(f"{t[s]:,}" for s in SUMS),
                 total_cost(t)])  # fmt: skip
    if not by:
        header = header[len(by) :]
    return header, rows


def format_spend(report: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return orjson.dumps(public(report), option=orjson.OPT_INDENT_2).decode()
    if fmt == "csv":
        return _csv(report)
    md = fmt == "markdown"
    header, rows = _group_table(report)
    what = "sandbox runs (play money, kept apart from spend)" if report["sandbox"] else "spend"
    out = [f"{what} from {report['since']} to {report['until']} ({report['ledger']})", ""]
    out.append(_table(header, rows, md))
    left = report["left_out"]
    if left:
        runs = f"{left['runs']:,} {'real' if report['sandbox'] else 'sandbox'} run{'s' * (left['runs'] != 1)}"
        if left["unpriced_runs"]:
            runs += f", {left['unpriced_runs']:,} of them unpriced"
        out += [
            "",
            f"left out: {runs} ({_money(left['cost_usd'])}): `spend` without --sandbox shows them"
            if report["sandbox"]
            else f"left out: {runs} ({_money(left['cost_usd'])} of play money): `spend --sandbox` shows them",
        ]
    cached = report.get("prompt_cache") or {}
    if cached.get("cached_tokens"):
        out += [
            "",
            f"prompt cache: {cached['cached_tokens']:,} prompt tokens served from the provider's cache, "
            f"{_money(cached['saved_usd'])} less than at the input price",
        ]
    m = report["month"]
    out += [
        "",
        f"this month ({m['month']}, UTC): {_money(m['spent_usd'])} so far"
        + (f" + {unpriced_text(m['unpriced'])}, cost unknown" if m["unpriced"] else "")
        + f"; at {_money(m['daily_rate_usd'])} a day "
        f"({rate_from(m)}), {_money(m['forecast_usd'])} by its end "
        f"({m['days_left']:g} days left)",
    ]
    if report["cost_per_1k_rows"]:
        out += ["", "cost per 1,000 rows answered, by job:"]
        rows = [
            [
                x["job"],
                f"{x['rows_ok']:,}",
                UNKNOWN if x["unpriced"] and not x["rows_ok"] else _money(x["cost_per_1k_rows_usd"]),
                _moved(x),
            ]
            for x in report["cost_per_1k_rows"]
        ]
        out.append(_table(["job", "rows ok", "per 1,000 rows", "moved"], rows, md))
    p = report["problems"]
    if p["count"]:
        out += ["", f"runs that failed or were killed: {p['count']:,}"
                + (f" (the latest {len(p['runs'])})" if p["count"] > len(p["runs"]) else "")]  # fmt: skip
        rows = [[r["started_at"], r["job"], _state(r), _clip(r["message"], 120) if r["message"] else r.get("note") or ""]
                for r in p["runs"]]  # fmt: skip
        out.append(_table(["started", "job", "state", "message"], rows, md))
    if "runs" in report:
        out += ["", f"runs: {len(report['runs']):,}"]
        rows = [
            [r["started_at"], r["job"], r["kind"], _state(r), f"{r['rows_ok']:,}", f"{r['requests']:,}",
             f"{r['cached_tokens']:,}", _cost(r), r["run_id"][:12]]
            for r in report["runs"]
        ]  # fmt: skip
        out.append(
            _table(
                ["started", "job", "kind", "state", "rows ok", "requests", "cached tokens", "cost", "run"],
                rows,
                md,
            )
        )
        out += [f"{r['run_id'][:12]}: {r['note']}" for r in report["runs"] if r.get("note")]
    return "\n".join(out)


def _moved(x: dict[str, Any]) -> str:
    """How a job's cost per 1,000 rows moved, and the runs without prices it leaves out."""
    moved = (
        f"{x['first_day']} {_money(x['first_usd'])} -> {x['last_day']} {_money(x['last_usd'])}"
        + (f" ({x['change_pct']:+g}%)" if x.get("change_pct") is not None else "")
        if "first_day" in x
        else "one day of runs"
        if x["rows_ok"]
        else ""
    )
    if not x["unpriced"]:
        return moved
    return f"{moved} + {unpriced_text(x['unpriced'])}" if moved else unpriced_text(x["unpriced"])


def _cost(r: dict[str, Any]) -> str:
    """A run's cost, and what it may have been billed besides (requests given up on or left in
    flight: their worst case, which a monthly cap counts too); unknown without prices."""
    maybe = r.get("maybe_billed_usd")
    cost = _money(r["cost_usd"]) if r["priced"] else UNKNOWN
    cost = f"at least {cost}" if _gone(r) and r["priced"] else cost
    return cost + (f" (+ up to {_money(maybe)} maybe billed)" if maybe else "")


def _gone(r: dict[str, Any]) -> bool:
    """A killed run whose journal was gone: its figures are its last progress, a lower bound."""
    return bool(r["killed"]) and (r["message"] or "").startswith(GONE)


def _state(r: dict[str, Any]) -> str:
    if r["status"] == "killed":
        return "killed (not recorded yet)"
    if _gone(r):
        return "killed (journal gone: its last progress)"
    if r["killed"]:
        return "killed (closed from the journal)"
    if r["status"] != "finished":
        return r["status"]
    return f"exit {r['exit_code']}"


def _table(header: list[str], rows: list[list[str]], md: bool) -> str:
    return "\n".join(grid(header, rows, md))


def _csv(report: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if "runs" in report:
        fields = list(report["runs"][0]) if report["runs"] else ["run_id"]
        w.writerow(fields)
        for r in report["runs"]:
            w.writerow(["" if r[f] is None else r[f] for f in fields])  # the writer quotes
        return buf.getvalue().rstrip("\n")
    by = report["by"]
    w.writerow([*by, *SUMS, "cost_usd", "priced"])
    t = report["total"]
    lines = [*report["groups"], {**dict.fromkeys(by, "total"), **t, "priced": True}]
    if t["unpriced"]:  # the total's runs without prices: their cost unknown (empty)
        lines.append({**dict.fromkeys(by, "total"), **t["unpriced"], "cost_usd": None, "priced": False})
    for g in lines:
        w.writerow(
            [*(g[k] for k in by), *(g[s] for s in SUMS), g["cost_usd"] or "", str(g["priced"]).lower()]
        )
    return buf.getvalue().rstrip("\n")


def _clip(text: str, width: int) -> str:
    """One line of at most ``width`` characters, cut at a word with an ellipsis."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1].rsplit(" ", 1)[0] + " …"
