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

from ..pricing import to_usd as usd
from .report import _rows, build_report, load

W, H, PAD = 560, 260, 72
COLOUR = "#3b6ea5"


def _svg(title: str, body: str) -> str:
    return (
        f'<figure><svg viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" aria-label="{html.escape(title)}">'
        f'<text x="{W / 2}" y="18" text-anchor="middle" class="t">{html.escape(title)}</text>{body}</svg></figure>'
    )


def _axes(y_max: float, y_fmt: str) -> str:
    parts = [
        f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - 10}" y2="{H - PAD}" class="a"/>',
        f'<line x1="{PAD}" y1="30" x2="{PAD}" y2="{H - PAD}" class="a"/>',
    ]
    for i in range(5):
        v = y_max * i / 4
        y = H - PAD - (H - PAD - 30) * i / 4
        parts.append(f'<text x="{PAD - 4}" y="{y + 4}" text-anchor="end" class="l">{y_fmt.format(v)}</text>')
    return "".join(parts)


def bar_chart(title: str, labels: list[str], values: list[float], y_fmt: str = "{:.4g}") -> str:
    if not values:
        return _svg(title, '<text x="50%" y="50%" text-anchor="middle">no data</text>')
    top = max(values) or 1.0
    span = (W - PAD - 20) / len(values)
    bars = []
    for i, (label, v) in enumerate(zip(labels, values, strict=True)):
        h = (H - PAD - 30) * v / top
        x = PAD + 5 + i * span
        bars.append(
            f'<rect x="{x:.1f}" y="{H - PAD - h:.1f}" width="{span * 0.8:.1f}" height="{h:.1f}" fill="{COLOUR}"><title>{html.escape(label)}: {y_fmt.format(v)}</title></rect>'
        )
        bars.append(
            f'<text x="{x + span * 0.4:.1f}" y="{H - PAD + 14}" text-anchor="middle" class="l">{html.escape(label[:14])}</text>'
        )
    return _svg(title, _axes(top, y_fmt) + "".join(bars))


def histogram(title: str, values: np.ndarray, x_label: str, bins: int = 30) -> str:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return bar_chart(title, [], [])
    counts, edges = np.histogram(values, bins=bins)
    top = float(counts.max()) or 1.0
    span = (W - PAD - 20) / bins
    bars = []
    for i, c in enumerate(counts):
        h = (H - PAD - 30) * c / top
        bars.append(
            f'<rect x="{PAD + 2 + i * span:.1f}" y="{H - PAD - h:.1f}" width="{span - 1:.1f}" height="{h:.1f}" fill="{COLOUR}"><title>{edges[i]:.4g} to {edges[i + 1]:.4g}: {c}</title></rect>'
        )
    ticks = "".join(
        f'<text x="{PAD + i * (W - PAD - 20) / 4:.1f}" y="{H - PAD + 14}" text-anchor="middle" class="l">{edges[0] + (edges[-1] - edges[0]) * i / 4:.4g}</text>'
        for i in range(5)
    )
    label = f'<text x="{W / 2}" y="{H - 10}" text-anchor="middle" class="l">{html.escape(x_label)}</text>'
    return _svg(title, _axes(top, "{:.0f}") + "".join(bars) + ticks + label)


def line_chart(title: str, xs: np.ndarray, ys: np.ndarray, x_label: str, y_fmt: str = "{:.3g}") -> str:
    if xs.size < 2:
        return bar_chart(title, [], [])
    top = float(ys.max()) or 1.0
    x0, x1 = float(xs.min()), float(xs.max()) or 1.0
    pts = " ".join(
        f"{PAD + (W - PAD - 20) * (x - x0) / ((x1 - x0) or 1):.1f},{H - PAD - (H - PAD - 30) * y / top:.1f}"
        for x, y in zip(xs, ys, strict=True)
    )
    label = f'<text x="{W / 2}" y="{H - 10}" text-anchor="middle" class="l">{html.escape(x_label)}</text>'
    return _svg(
        title,
        _axes(top, y_fmt)
        + f'<polyline points="{pts}" fill="none" stroke="{COLOUR}" stroke-width="2"/>'
        + label,
    )


def _throughput(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, str]:
    done = frame["finished_at"].dropna()
    if done.size < 2:
        return np.array([]), np.array([]), ""
    seconds = (done - done.min()).dt.total_seconds().to_numpy()
    span = max(seconds.max(), 1.0)
    bucket = max(1.0, span / 60)
    counts = np.bincount((seconds // bucket).astype(int))
    return (
        np.arange(counts.size) * bucket,
        counts / bucket,
        f"seconds since the first row (buckets of {bucket:.0f} s)",
    )


def _table_html(rows: list[tuple[str, str]]) -> str:
    return (
        "<table>"
        + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
        + "</table>"
    )


def write_html(path: Path, output: Path, by: str | None) -> dict[str, Any]:
    report = build_report(output, by)
    frame, _ = load(output, by)
    ok = frame[frame["status"] == "ok"]
    sections = [
        f"<h1>Cost report</h1><p>{html.escape(str(output))} &middot; model {html.escape(str(report['model']))}</p>",
        _table_html(_rows(report["overall"])),
    ]
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
            f"<td>{s['prompt_tokens'] + s['completion_tokens']:,}</td><td>${s['cost_usd']}</td><td>${s['cost_per_row_usd']['mean']}</td></tr>"
            for k, s in groups.items()
        )
        sections.append(f"<table class='grid'>{header}{body}</table>")
        plots.append(bar_chart(f"Cost by {by} (USD)", labels, [usd(groups[k]["_cost_pico"]) for k in labels]))
    else:
        plots.append(bar_chart("Cost by status (USD)", ["ok"], [usd(report["overall"]["_cost_pico"])]))
    plots.append(
        histogram("Prompt tokens per row", ok["prompt_tokens"].to_numpy(dtype=float), "prompt tokens")
    )
    plots.append(
        histogram(
            "Completion tokens per row", ok["completion_tokens"].to_numpy(dtype=float), "completion tokens"
        )
    )
    plots.append(histogram("Latency per row", ok["latency_ms"].to_numpy(dtype=float), "milliseconds"))
    xs, ys, label = _throughput(frame)
    plots.append(line_chart("Throughput over time (rows/s)", xs, ys, label))
    if "estimate_vs_actual" in report:
        e = report["estimate_vs_actual"]
        sections.append("<h2>Estimate vs actual</h2>")
        sections.append(
            _table_html(
                [
                    (
                        "prompt tokens",
                        f"estimated {e['prompt_tokens']['estimated']:,}, actual {e['prompt_tokens']['actual']:,}",
                    ),
                    (
                        "cost",
                        f"worst case ${e['cost_usd']['worst_case']}, expected ${e['cost_usd']['expected'] or 'n/a'}, actual ${e['cost_usd']['actual']}",
                    ),
                ]
            )
        )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>batchllm cost report</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ padding: 4px 10px; border-bottom: 1px solid #ddd; text-align: left; }}
.plots {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ margin: 0; border: 1px solid #eee; }}
.t {{ font-size: 14px; font-weight: 600; }} .l {{ font-size: 10px; fill: #555; }} .a {{ stroke: #999; }}
</style></head><body>
{"".join(sections)}
<h2>Plots</h2><div class="plots">{"".join(plots)}</div>
</body></html>
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return report
