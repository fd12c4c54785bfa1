"""Plots as inline SVG for the HTML pages (report --html, spend --html): no script, no network.

Axes carry ticks at round values (1, 2 or 5 times a power of ten) and money in one format
(``$`` and as many decimals as the tick step needs, the same on every axis of a page). A
histogram's range stops at the 99th percentile with one overflow bar, so one outlier cannot squeeze
every other row into the first bin.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal

import numpy as np

W, H, LEFT, BOTTOM, TOP, RIGHT = 560, 260, 78, 56, 30, 14
PALETTE = ("#3b6ea5", "#e08a2e", "#4f9d55", "#c4463a", "#8a6bb8", "#7f6a4d", "#d17ab8", "#6f7f8f")
Fmt = Callable[[float], str]


def nice_ticks(top: float, count: int = 5) -> list[float]:
    """Ticks from 0 to at least ``top`` at a round step (1, 2 or 5 times a power of ten)."""
    if not math.isfinite(top) or top <= 0:
        return [0.0, 1.0]
    raw = top / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    n = math.ceil(top / step - 1e-9)
    return [round(i * step, 12) for i in range(n + 1)]


def _decimals(step: float) -> int:
    return max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 0


def money(value: Decimal | float | str | None) -> str:
    """The one format for money on a page (tables, axes, tooltips): cents from a dollar up
    (``$1,234.57``), four significant digits below (``$0.05603``, ``$0.0000239``). Exact figures
    stay in the JSON and text reports."""
    if value is None:
        return "n/a"
    d = Decimal(str(value))
    if d == 0:
        return "$0"
    if abs(d) >= 1:
        return f"${d:,.2f}"
    places = max(2, 3 - d.adjusted())
    text = f"{d.quantize(Decimal(1).scaleb(-places)):f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"${whole}.{frac.ljust(2, '0')}"


def _money(v: float) -> str:
    return money(round(v, 12))


def money_format(ticks: Sequence[float]) -> Fmt:
    """An axis's money: whole dollars for a step of a dollar or more (``$200``), else cents or as
    many decimals as the step needs (``$0.10``, ``$0.005``), the same on every tick; ``$0``."""
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    d = 0 if step >= 1 else max(2, _decimals(step))
    return lambda v: "$0" if v == 0 else f"${v:,.{d}f}"


def number_format(ticks: Sequence[float]) -> Fmt:
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    d = _decimals(step) if step < 1 else 0
    return lambda v: f"{v:,.{d}f}"


def figure(title: str, body: str, legend: Sequence[str] = ()) -> str:
    keys = "".join(
        f'<rect x="{LEFT + i * 130}" y="{H - 16}" width="10" height="10" fill="{PALETTE[i % len(PALETTE)]}"/>'
        f'<text x="{LEFT + 14 + i * 130}" y="{H - 7}" class="l">{html.escape(name[:18])}</text>'
        for i, name in enumerate(legend[:4])
    )
    return (
        f'<figure><svg viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
        f'aria-label="{html.escape(title)}"><text x="{W / 2}" y="18" text-anchor="middle" class="t">'
        f"{html.escape(title)}</text>{body}{keys}</svg></figure>"
    )


def empty(title: str, why: str = "no data") -> str:
    return figure(title, f'<text x="50%" y="50%" text-anchor="middle" class="l">{html.escape(why)}</text>')


def _y(v: float, top: float) -> float:
    return H - BOTTOM - (H - BOTTOM - TOP) * (v / top if top else 0)


def y_axis(ticks: Sequence[float], fmt: Fmt) -> str:
    top = ticks[-1]
    parts = [
        f'<line x1="{LEFT}" y1="{H - BOTTOM}" x2="{W - RIGHT}" y2="{H - BOTTOM}" class="a"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{H - BOTTOM}" class="a"/>',
    ]
    for v in ticks:
        y = _y(v, top)
        parts.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{W - RIGHT}" y2="{y:.1f}" class="g"/>')
        parts.append(f'<text x="{LEFT - 4}" y="{y + 4:.1f}" text-anchor="end" class="l">{fmt(v)}</text>')
    return "".join(parts)


CHAR_PX = 6.2  # width of a character of the axis labels' 10px font, with room to spare


def _x_labels(labels: Sequence[str], centre: Callable[[int], float]) -> str:
    """Labels under the x axis, as many as fit side by side (every k-th), none past the edges."""
    texts = [s[:12] for s in labels]
    room = CHAR_PX * max(len(s) for s in texts) + 10
    every = max(1, math.ceil(len(texts) * room / (W - LEFT - RIGHT)))
    parts = []
    for i in range(0, len(texts), every):
        x, half = centre(i), CHAR_PX * len(texts[i]) / 2
        anchor = "end" if x + half > W else "start" if x - half < 0 else "middle"
        parts.append(
            f'<text x="{x:.1f}" y="{H - BOTTOM + 14}" text-anchor="{anchor}" class="l">{html.escape(texts[i])}</text>'
        )
    return "".join(parts)


def stacked_bars(
    title: str,
    labels: Sequence[str],
    series: Mapping[str, Sequence[float]],
    money: bool = True,
    legend: bool = True,
) -> str:
    """One bar per label, each series stacked in it (``series``: name -> one value a label)."""
    if not labels or not series:
        return empty(title)
    totals = [sum(v[i] for v in series.values()) for i in range(len(labels))]
    ticks = nice_ticks(max(totals))
    fmt = (money_format if money else number_format)(ticks)
    exact = _money if money else fmt  # a tooltip shows the value, not the axis's rounding
    span = (W - LEFT - RIGHT) / len(labels)
    parts = []
    for i, label in enumerate(labels):
        base = 0.0
        for k, (name, values) in enumerate(series.items()):
            v = values[i]
            if v <= 0:
                continue
            y0, y1 = _y(base, ticks[-1]), _y(base + v, ticks[-1])
            parts.append(
                f'<rect x="{LEFT + i * span + span * 0.1:.1f}" y="{y1:.1f}" width="{span * 0.8:.1f}" '
                f'height="{y0 - y1:.1f}" fill="{PALETTE[k % len(PALETTE)]}"><title>'
                f"{html.escape(label)} {html.escape(name)}: {exact(v)}</title></rect>"
            )
            base += v
    ticks_x = _x_labels(labels, lambda i: LEFT + (i + 0.5) * span)
    return figure(title, y_axis(ticks, fmt) + "".join(parts) + ticks_x, list(series) if legend else [])


def bars(title: str, labels: Sequence[str], values: Sequence[float], money: bool = True) -> str:
    return stacked_bars(title, labels, {"": values}, money, legend=False)


def lines(
    title: str, labels: Sequence[str], series: Mapping[str, Sequence[float | None]], money: bool = True
) -> str:
    """One line per series over shared x labels (None: no point there)."""
    values = [v for vs in series.values() for v in vs if v is not None]
    if not labels or not values:
        return empty(title)
    ticks = nice_ticks(max(values))
    fmt = (money_format if money else number_format)(ticks)
    width = W - LEFT - RIGHT
    step = width / (len(labels) - 1) if len(labels) > 1 else 0.0
    x0 = LEFT if len(labels) > 1 else LEFT + width / 2  # one label: its points in the middle
    parts = []
    for k, (name, vs) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        pts = [(x0 + i * step, _y(v, ticks[-1])) for i, v in enumerate(vs) if v is not None]
        if len(pts) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts += [
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"><title>{html.escape(name)}</title></circle>'
            for x, y in pts
        ]
    ticks_x = _x_labels(labels, lambda i: x0 + i * step)
    return figure(title, y_axis(ticks, fmt) + "".join(parts) + ticks_x, list(series))


def histogram(title: str, values: np.ndarray, x_label: str, bins: int = 30) -> str:
    """Counts in ``bins`` equal bins up to the 99th percentile (rounded up to a tick), and one
    overflow bar for the rest, labelled with how many and how far they reach."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return empty(title)
    lo, hi, p99 = float(values.min()), float(values.max()), float(np.percentile(values, 99))
    whole = bool(np.all(values == np.round(values)))  # token counts: bins of whole numbers
    # The axis starts at a round value at or below the smallest: no empty stretch from zero.
    step = nice_ticks(max(p99 - lo, 1.0))[1]
    step = max(step, 1.0) if whole else step
    x0 = math.floor(lo / step) * step
    x_ticks = nice_ticks(max(p99 - x0, step))
    x_ticks = [t for t in x_ticks if not whole or t == int(t)] if whole else x_ticks
    edge = x0 + x_ticks[-1]
    if whole:  # each bin a whole number of units wide, so no bin catches two values and its neighbour none
        width = max(1, math.ceil((edge - x0) / bins))
        bins = max(1, math.ceil((edge - x0) / width))
        edge = x0 + bins * width
    overflow = int((values > edge).sum())
    counts, edges = np.histogram(values[values <= edge], bins=bins, range=(x0, edge))
    y_ticks = nice_ticks(float(max(counts.max(), overflow)))
    span = (W - LEFT - RIGHT) / (bins + (3 if overflow else 0))  # a gap, so "more" is apart
    top = y_ticks[-1]
    parts = []
    for i, c in enumerate(counts):
        y = _y(c, top)
        parts.append(
            f'<rect x="{LEFT + i * span:.1f}" y="{y:.1f}" width="{max(span - 1, 0.5):.1f}" '
            f'height="{H - BOTTOM - y:.1f}" fill="{PALETTE[0]}"><title>{edges[i]:,.4g} to '
            f"{edges[i + 1]:,.4g}: {c:,}</title></rect>"
        )
    x_fmt = number_format(x_ticks)
    if overflow:
        y, x = _y(overflow, top), LEFT + (bins + 2) * span
        parts.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{span - 1:.1f}" height="{H - BOTTOM - y:.1f}" '
            f'fill="{PALETTE[3]}"><title>over {x_fmt(edge)} (up to {hi:,.4g}): {overflow:,}</title></rect>'
            f'<text x="{x + span / 2:.1f}" y="{H - BOTTOM + 14}" text-anchor="middle" class="l">more</text>'
        )
    parts += [
        f'<text x="{LEFT + bins * span * t / (edge - x0):.1f}" y="{H - BOTTOM + 14}" text-anchor="middle" '
        f'class="l">{x_fmt(x0 + t)}</text>'
        for t in x_ticks
        if t <= edge - x0
    ]
    note = f" ({overflow:,} over {x_fmt(edge)}, up to {hi:,.4g}: the last bar)" if overflow else ""
    parts.append(
        f'<text x="{W / 2}" y="{H - 22}" text-anchor="middle" class="l">{html.escape(x_label + note)}</text>'
    )
    return figure(title, y_axis(y_ticks, number_format(y_ticks)) + "".join(parts))


STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { padding: 4px 10px; border-bottom: 1px solid #ddd; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; border: 1px solid #eee; }
.t { font-size: 14px; font-weight: 600; } .l { font-size: 10px; fill: #555; }
.a { stroke: #999; } .g { stroke: #eee; }
"""
