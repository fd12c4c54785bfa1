"""Text tables for the reports: two-column rows, grids, and CSV cells (plain or Markdown); and
a report without its working fields, for JSON."""

from __future__ import annotations

from typing import Any


def csv_cell(v: object) -> str:
    text = str(v)
    return f'"{text.replace(chr(34), chr(34) * 2)}"' if any(c in text for c in ',"\n') else text


def two_columns(rows: list[tuple[str, str]], md: bool) -> list[str]:
    if md:
        return ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]
    width = max(len(k) for k, _ in rows)
    return [f"  {k:<{width}}  {v}" for k, v in rows]


def grid(header: list[str], body: list[list[str]], md: bool) -> list[str]:
    if md:
        return [
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
            *["| " + " | ".join(r) + " |" for r in body],
        ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [("  " + fmt.format(*r)).rstrip() for r in (header, *body)]


def public(report: Any) -> Any:
    """The report without its working fields (names starting with ``_``), for JSON."""
    if isinstance(report, dict):
        return {k: public(v) for k, v in report.items() if not k.startswith("_")}
    if isinstance(report, list):
        return [public(v) for v in report]
    return report
