"""A fleet's output broken down by endpoint (issue 23): where the rows went, what each cost.

Rows, statuses, tokens, cost and latency come from the output's ``endpoint`` column, so they cover
every run of the output; requests, 429s and failures without an answer are counted as they
happen and kept in the last run's summary (``endpoints``), so they cover that run. A labeling
row whose requests went to several endpoints names them all ("cheap,dear"), and its cost is
each request's at its own endpoint's prices.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..pricing import format_usd, usd_text
from .tables import grid


def endpoint_breakdown(frame: pd.DataFrame, summary: dict[str, Any], priced: bool) -> dict[str, Any] | None:
    """Per endpoint: rows, ok, error, tokens, exact cost, latency p50/p95; and this run's
    requests, 429s and errors. None for an output that no fleet wrote."""
    if "endpoint" not in frame.columns:
        return None
    this_run = summary.get("endpoints") or {}
    names = frame["endpoint"].astype("object").where(frame["endpoint"].notna(), "(none)")
    out: dict[str, Any] = {}
    for name, part in frame.groupby(names, sort=True):
        ok = part["status"] == "ok"
        latency = part.loc[ok, "latency_ms"].dropna().to_numpy(dtype=float)
        paid = part["input_cost_usd"].notna()
        run = this_run.get(name) or {}
        out[str(name)] = {
            "rows": int(len(part)),
            "ok": int(ok.sum()),
            "error": int((part["status"] == "error").sum()),
            "prompt_tokens": int(part["prompt_tokens"].fillna(0).sum()),
            "completion_tokens": int(part["completion_tokens"].fillna(0).sum()),
            "cost_usd": usd_text(int(part.loc[paid, "cost_pico"].sum()) if priced else None),
            "latency_ms": {
                "p50": round(float(np.percentile(latency, 50)), 1) if latency.size else None,
                "p95": round(float(np.percentile(latency, 95)), 1) if latency.size else None,
            },
            "last_run": {k: run.get(k) for k in ("requests", "throttled", "errors", "out")} if run else None,
        }
    for name, run in this_run.items():  # in the fleet but answered no row (out, or never needed)
        if name not in out:
            out[name] = {"rows": 0, "ok": 0, "error": 0, "prompt_tokens": 0, "completion_tokens": 0,
                         "cost_usd": usd_text(0), "latency_ms": {"p50": None, "p95": None},
                         "last_run": {k: run.get(k) for k in ("requests", "throttled", "errors", "out")}}  # fmt: skip
    return out


def endpoint_lines(endpoints: dict[str, Any], md: bool) -> list[str]:
    """The breakdown as a table (text or Markdown)."""
    header = ["endpoint", "rows", "ok", "error", "tokens", "cost", "p50 ms", "p95 ms", "last run: requests",
              "429s", "failed"]  # fmt: skip
    body = []
    for name, e in endpoints.items():
        run = e["last_run"] or {}
        lat = e["latency_ms"]
        body.append(
            [
                name,
                f"{e['rows']:,}",
                f"{e['ok']:,}",
                f"{e['error']:,}",
                f"{e['prompt_tokens'] + e['completion_tokens']:,}",
                format_usd(None) if e["cost_usd"] is None else f"${e['cost_usd']}",
                "-" if lat["p50"] is None else f"{lat['p50']:,}",
                "-" if lat["p95"] is None else f"{lat['p95']:,}",
                "-"
                if not run
                else f"{run.get('requests') or 0:,}" + (f" (out: {run['out']})" if run.get("out") else ""),
                "-" if not run else f"{run.get('throttled') or 0:,}",
                "-" if not run else f"{run.get('errors') or 0:,}",
            ]
        )
    return ["", "## By endpoint" if md else "by endpoint:", *grid(header, body, md)]
