"""``batchllm report``'s report as a person or a program reads it: text and Markdown tables, JSON,
CSV (the report itself is report.py's; ``report_html`` draws the page with plots, with ``_rows``).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from ..engine.counts import never_paid_twice, plural
from ..engine.summary_text import PLAY_MONEY, outside_line
from ..pricing import format_usd
from .by_endpoint import endpoint_lines
from .tables import csv_cell, grid, public, two_columns


def _usd(text: str | None) -> str:
    return format_usd(None) if text is None else f"${text}"


def _rows(stats: dict[str, Any], _usd: Callable[[str | None], str] = _usd) -> list[tuple[str, str]]:
    """The overall table; ``_usd`` formats money (exact here, svg.money on the HTML page)."""
    c, lat = stats["cost_per_row_usd"], stats["latency_ms"]
    errors = ", ".join(f"{k} {v:,}" for k, v in stats["errors_by_class"].items()) or "none"
    return [
        (
            "rows",
            f"{stats['rows']:,} ({stats['ok']:,} ok, {stats['error']:,} error, "
            + (f"{stats['invalid']:,} invalid, " if stats.get("invalid") else "")
            + f"{stats['pending']:,} pending)",
        ),
        (
            "tokens",
            f"{stats['prompt_tokens']:,} prompt + {stats['completion_tokens']:,} completion"
            + (f" ({stats['cached_tokens']:,} prompt tokens cached)" if stats.get("cached_tokens") else "")
            + (
                f"; tokens of {plural(stats['tokens_counted'], 'reply')} counted by batchllm (the server reported no usage"
                + (
                    "; approximately: their cost is an estimate)"
                    if stats.get("tokens_counted_exactly") is False
                    else ")"
                )
                if stats.get("tokens_counted")
                else ""
            ),
        ),
        ("cost", _usd(stats["cost_usd"])),
        (
            "cost per row",
            f"mean {_usd(c['mean'])}, p50 {_usd(c['p50'])}, p95 {_usd(c['p95'])}, max {_usd(c['max'])}",
        ),
        ("truncated replies", f"{stats['truncated']:,}"),
        (
            "latency",
            f"p50 {lat['p50']:,} ms, p95 {lat['p95']:,} ms, p99 {lat['p99']:,} ms"
            if stats["ok"]
            else "n/a (no row answered)",
        ),
        ("errors by class", errors),
    ] + (
        [
            (
                "spend",
                f"first answers {_usd(stats['spend_usd']['first_answers'])}, re-asks "
                f"{_usd(stats['spend_usd']['reasks'])}, extra samples {_usd(stats['spend_usd']['extra_samples'])}",
            )
        ]
        if "spend_usd" in stats
        else []
    )


_FLAT = [
    "rows",
    "ok",
    "error",
    "invalid",
    "pending",
    "truncated",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
]


def format_report(report: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        import orjson

        return orjson.dumps(public(report), option=orjson.OPT_INDENT_2).decode()
    if fmt == "csv":
        buf = io.StringIO()
        label = report["by"]["column"] if "by" in report else "group"
        buf.write(
            ",".join(
                [label, *_FLAT, "cost_per_row_mean_usd", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms"]
            )
            + "\n"
        )
        sections = [("(all)", report["overall"])] + list(report.get("by", {}).get("groups", {}).items())
        for name, s in sections:
            values = [s[k] for k in _FLAT] + [s["cost_per_row_usd"]["mean"], *s["latency_ms"].values()]
            buf.write(",".join(csv_cell(v) for v in [name, *values]) + "\n")
        # Money the output's rows do not hold, each a row of its own beside "(all)".
        blank = [""] * (len(_FLAT) + 3)
        if gone := report.get("outside_input"):
            cells = ["(no longer in the input)", gone["rows"], *blank[:5], gone["prompt_tokens"]]
            cells += [gone["completion_tokens"], gone["cost_usd"], *blank[:4]]
            buf.write(",".join(csv_cell(v) for v in cells) + "\n")
        if lost := report.get("maybe_billed"):
            cells = ["(maybe billed, at most)", *blank[:8], lost["worst_case_usd"], *blank[:4]]
            buf.write(",".join(csv_cell(v) for v in cells) + "\n")
        return buf.getvalue().rstrip("\n")
    lines: list[str] = []
    md = fmt == "markdown"
    lines.append(
        f"# Cost report: {report['output']}" if md else f"report for {report['output']} ({report['model']})"
    )
    if report.get("from_journal"):
        lines.append(
            f"(the output is not written yet: read from its journal, {report['from_journal']}; "
            + (
                "the run writing it now writes it as it ends)"
                if report.get("running")
                else "run the same command again to write it)"
            )
        )
    if report.get("play_money"):
        lines.append(PLAY_MONEY)
    lines += two_columns(_rows(report["overall"]), md)
    if gone := report.get("outside_input"):  # the journal paid for more (engine/outside.py)
        lines += ["", outside_line(gone)]
    if "by" in report:
        col = report["by"]["column"]
        lines.append("")
        lines.append(f"## By {col}" if md else f"by {col}:")
        header = [col, "rows", "ok", "error", "invalid", "tokens", "cost", "mean/row", "p95 latency ms"]
        body = [
            [
                k,
                f"{s['rows']:,}",
                f"{s['ok']:,}",
                f"{s['error']:,}",
                f"{s['invalid']:,}",
                f"{s['prompt_tokens'] + s['completion_tokens']:,}",
                _usd(s["cost_usd"]),
                _usd(s["cost_per_row_usd"]["mean"]),
                f"{s['latency_ms']['p95']:,}",
            ]
            for k, s in report["by"]["groups"].items()
        ]
        lines += grid(header, body, md)
    if "endpoints" in report:
        lines += endpoint_lines(report["endpoints"], md)
    overall = report["overall"]
    if overall.get("rows_answered_by_identical_rows") or overall.get("rows_from_cache"):
        saved = report.get("cache_saved_usd") or "0"
        lines.append("")
        lines.append(
            never_paid_twice(overall["rows_answered_by_identical_rows"], overall["rows_from_cache"])
            + f" (the last run's cache hits saved ${saved})"
        )
    if report.get("cached_saved_usd"):
        lines.append("")
        lines.append(
            f"prompt cache: {overall['cached_tokens']:,} prompt tokens served from the server's cache saved "
            f"${report['cached_saved_usd']} against the input price"
        )
    if "packing" in report:
        pk = report["packing"]
        lines += [
            "",
            (
                f"packed: {pk['rows']:,} rows in {pk['requests']:,} requests ({pk['rows_per_request']} rows per "
                f"request); prompt tokens {pk['prompt_tokens']:,}, one row per request "
                f"{pk['prompt_tokens_alone']:,}: "
                + (
                    f"{pk['prompt_tokens_saved']:,} saved"
                    if pk["prompt_tokens_saved"] >= 0
                    else f"{-pk['prompt_tokens_saved']:,} more (too few rows a request to share the prefix)"
                )
            ),
        ]
    if "reviewed" in report:
        rv = report["reviewed"]
        lines += [
            "",
            f"reviewed by people: {rv['rows']:,} rows, {rv['changed']:,} of them changed (batchllm review)",
        ]
    if "maybe_billed" in report:
        lost = report["maybe_billed"]
        lines.append("")
        lines.append(
            f"up to {plural(lost['requests'], 'request')}, at most ${lost['worst_case_usd']}, may have been billed "
            "without a saved reply (given up on after a timeout, or in flight when a run stopped)"
        )
    if "estimate_vs_actual" in report:
        e = report["estimate_vs_actual"]
        lines.append("")
        lines.append("## Estimate vs actual" if md else "estimate vs actual:")
        lines += two_columns(
            [
                (
                    "prompt tokens",
                    f"estimated {e['prompt_tokens']['estimated']:,} ({e['prompt_tokens']['of']}), "
                    f"actual {e['prompt_tokens']['actual']:,}",
                ),
                (
                    "cost",
                    f"worst case ${e['cost_usd']['worst_case']}"
                    + (f", expected ${e['cost_usd']['expected']}" if e["cost_usd"]["expected"] else "")
                    + f", actual ${e['cost_usd']['actual']}",
                ),
            ],
            md,
        )
    return "\n".join(lines)
