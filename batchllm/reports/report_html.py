"""``batchllm report --html``: one self-contained page (no scripts, no network) for a cost review.

Tables from ``report.build_report`` and plots drawn as inline SVG: cost by group, distributions
of prompt tokens, completion tokens and latency, and throughput over time. Hand-drawn SVG keeps
the page a single file that renders anywhere and adds no plotting dependency.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..engine.summary_text import outside_line
from ..folders import make_folders
from ..pricing import to_usd as usd
from . import svg
from .report import build_report, load
from .report_text import _rows

MIN_THROUGHPUT_S = 30.0  # a shorter run has no throughput curve worth drawing


def _throughput(frame: pd.DataFrame) -> str:
    """Rows finished per second over the run, or why there is no curve: a run shorter than
    ``MIN_THROUGHPUT_S`` is a handful of points, not a line."""
    title = "Throughput over time (rows/s)"
    done = frame["finished_at"].dropna()
    span = (done.max() - done.min()).total_seconds() if done.size >= 2 else 0.0
    if span < MIN_THROUGHPUT_S:
        return svg.empty(title, f"the run took {span:.0f} s: too short for a throughput line")
    seconds = (done - done.min()).dt.total_seconds().to_numpy()
    bucket = max(1.0, span / 60)
    counts = np.bincount((seconds // bucket).astype(int))
    labels = [f"{i * bucket:.0f} s" for i in range(counts.size)]
    return svg.lines(title, labels, {"rows/s": list(counts / bucket)}, money=False)


def _reliability(output: Path, gold: str) -> str:
    """The reliability diagram of the output's confidence against ``gold`` (a column, or
    ``review``: people's verdicts on the random picks): each bin's accuracy beside its mean
    confidence, which a calibrated model's accuracy follows (reports/calibration.py)."""
    from .calibration import BINS
    from .eval import evaluate
    from .review_eval import evaluate_review

    e = evaluate_review(output) if gold == "review" else evaluate(output, gold)
    title = f"Reliability: accuracy by confidence (against {gold})"
    if e.get("ece") is None:
        return svg.empty(title, "the output has no confidence column (--confidence)")
    found = {b["bin"]: b for b in e["reliability"]}
    labels = [f"{k / BINS:.1f}-{(k + 1) / BINS:.1f}" for k in range(BINS)]
    series = {
        "accuracy": [found[x]["accuracy"] if x in found else None for x in labels],
        "mean confidence": [found[x]["mean_confidence"] if x in found else None for x in labels],
    }
    return svg.lines(f"{title}, ECE {e['ece']:.3f}", labels, series, money=False)


def _table_html(rows: list[tuple[str, str]]) -> str:
    return (
        "<table>"
        + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
        + "</table>"
    )


def _endpoints_html(endpoints: dict[str, Any]) -> str:
    header = "".join(
        f"<th>{h}</th>"
        for h in ("endpoint", "rows", "ok", "error", "tokens", "cost", "p50 ms", "last run: requests", "429s")
    )
    body = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{e['rows']:,}</td><td>{e['ok']:,}</td><td>{e['error']:,}</td>"
        f"<td>{e['prompt_tokens'] + e['completion_tokens']:,}</td><td class=n>{svg.money(e['cost_usd'])}</td>"
        f"<td class=n>{'-' if e['latency_ms']['p50'] is None else e['latency_ms']['p50']}</td>"
        f"<td class=n>{(e['last_run'] or {}).get('requests', '-')}</td>"
        f"<td class=n>{(e['last_run'] or {}).get('throttled', '-')}</td></tr>"
        for k, e in endpoints.items()
    )
    return f"<h2>By endpoint</h2><table class='grid'><tr>{header}</tr>{body}</table>"


def write_html(path: Path, output: Path, by: str | None, gold: str | None = None) -> dict[str, Any]:
    report = build_report(output, by)
    frame, _ = load(output, by)
    ok = frame[frame["status"] == "ok"]
    if "cached" in ok.columns:  # the histograms show requests: rows answered for free sent none
        ok = ok[ok["answered_by"].isna() & ~ok["cached"].fillna(False).astype(bool)]
    sections = [
        f"<h1>Cost report</h1><p>{html.escape(str(output))} &middot; model {html.escape(str(report['model']))}</p>",
        _table_html(_rows(report["overall"], svg.money)),
    ]
    if gone := report.get("outside_input"):  # paid for, not rows of the output (engine/outside.py)
        sections.append(f"<p>{html.escape(outside_line(gone))}</p>")
    plots = []
    if by is not None:
        groups = report["by"]["groups"]
        labels = list(groups)
        sections.append(f"<h2>By {html.escape(by)}</h2>")
        header = (
            "<tr><th>"
            + html.escape(by)
            + "</th><th>rows</th><th>ok</th><th>error</th><th>tokens</th><th>cost</th><th>mean per row</th></tr>"
        )
        body = "".join(
            f"<tr><td>{html.escape(k)}</td><td>{s['rows']:,}</td><td>{s['ok']:,}</td><td>{s['error']:,}</td>"
            f"<td>{s['prompt_tokens'] + s['completion_tokens']:,}</td><td class=n>{svg.money(s['cost_usd'])}</td><td class=n>{svg.money(s['cost_per_row_usd']['mean'])}</td></tr>"
            for k, s in groups.items()
        )
        sections.append(f"<table class='grid'>{header}{body}</table>")
        plots.append(svg.bars(f"Cost by {by}", labels, [usd(groups[k]["_cost_pico"]) for k in labels]))
    else:
        plots.append(svg.bars("Cost by status", ["ok"], [usd(report["overall"]["_cost_pico"])]))
    if "endpoints" in report:  # a fleet's output (by_endpoint.py)
        sections.append(_endpoints_html(report["endpoints"]))
    plots.append(
        svg.histogram("Prompt tokens per row", ok["prompt_tokens"].to_numpy(dtype=float), "prompt tokens")
    )
    plots.append(
        svg.histogram(
            "Completion tokens per row", ok["completion_tokens"].to_numpy(dtype=float), "completion tokens"
        )
    )
    plots.append(svg.histogram("Latency per row", ok["latency_ms"].to_numpy(dtype=float), "milliseconds"))
    plots.append(_throughput(frame))
    if gold is not None:
        plots.append(_reliability(output, gold))
    if "estimate_vs_actual" in report:
        e = report["estimate_vs_actual"]
        sections.append("<h2>Estimate vs actual</h2>")
        sections.append(
            _table_html(
                [
                    (
                        "prompt tokens",
                        f"estimated {e['prompt_tokens']['estimated']:,} ({e['prompt_tokens']['of']}), "
                        f"actual {e['prompt_tokens']['actual']:,}",
                    ),
                    (
                        "cost",
                        f"worst case {svg.money(e['cost_usd']['worst_case'])}, expected "
                        f"{svg.money(e['cost_usd']['expected'])}, actual {svg.money(e['cost_usd']['actual'])}",
                    ),
                ]
            )
        )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>batchllm cost report</title>
<style>{svg.STYLE}</style></head><body>
{"".join(sections)}
<h2>Plots</h2><div class="plots">{"".join(plots)}</div>
</body></html>
"""
    make_folders(path, "--html")
    path.write_text(page, encoding="utf-8")
    return report
