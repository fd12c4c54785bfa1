"""``estimate --pilot M --gold COLUMN --pack 1,5,10,20``: choosing the pack size on your own gold.

The same M rows run at each size (each into a scratch journal of its own beside the output's, so
no size answers another's rows), and each size gets one line: requests, prompt tokens per row,
accuracy with its 95% interval, invalid rate, dollars per correct label, and the whole input's
projected cost and time at the rate limit (the pilot's cost and requests per row, times the
rows). The cheapest size whose accuracy is within one point of the smallest size's is marked.
"""

from __future__ import annotations

import math
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from ..engine.journal import DB_NAME, Journal
from ..engine.reuse import CACHED_REPLIES
from ..labeling.spec import Labeling
from ..pricing import usd_text
from .packing import requests_made
from .tables import grid

WITHIN = 0.01  # accuracy a larger pack may lose and still be recommended


def pilot_dir(journal_dir: Path, size: int) -> Path:
    return journal_dir / "pilots" / f"pack-{size}"


def pilot_journals(journal_dir: Path) -> list[tuple[int, Path]]:
    """The pack sizes piloted into ``journal_dir`` (``pilot_dir``) with a journal each, by size."""
    found = []
    for d in (journal_dir / "pilots").glob("pack-*"):
        size = d.name.removeprefix("pack-")
        if size.isdigit() and (d / DB_NAME).is_file():
            found.append((int(size), d))
    return sorted(found)


def size_line(size: int, journal_dir: Path, accuracy: dict[str, Any], rows: int, rpm: int) -> dict[str, Any]:
    """One size's line, from its pilot's journal and run. Replies the cache served count as if
    sent (their requests, tokens and cost when first paid for): a size the cache answers is
    projected at what it costs, not at the nothing its pilot paid."""
    journal = Journal.open_readonly(journal_dir)
    try:
        n, invalid, prompt = journal.conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(status = 'invalid'), 0), COALESCE(SUM(prompt_tokens), 0) FROM rows"
        ).fetchone()
        spent = journal.spent_pico()
        requests = requests_made(journal)
        cached = journal.get_meta(CACHED_REPLIES) or {}
    finally:
        journal.conn.close()
    served = int(cached.get("replies", 0))
    # A packed reply is cached per row: its row's share of one request of ``size`` rows.
    requests += math.ceil(served / size)
    prompt += int(cached.get("prompt_tokens", 0))
    as_sent = spent + int(cached.get("cost_pico", 0))
    correct = round(accuracy["accuracy"] * accuracy["rows"])
    per_row = as_sent / n if n else 0
    return {
        "pack": size,
        "rows": n,
        "requests": requests,
        "replies_from_cache": served,
        "prompt_tokens_per_row": round(prompt / n, 1) if n else 0,
        "accuracy": accuracy,
        "invalid_rate": invalid / n if n else 0.0,
        "usd_per_correct_label": usd_text(round(as_sent / correct)) if correct else None,
        "pilot_cost_usd": usd_text(int(spent)),
        "projected_cost_usd": usd_text(round(per_row * rows)),
        "projected_minutes": round(requests / n * rows / rpm, 1) if n else 0.0,
    }


def votes_share(journal_dir: Path, labeling: Labeling, rows: int) -> dict[str, Any]:
    """``--samples N --vote-below P`` with ``--pilot``: the share of the pilot's rows whose first
    answer's confidence was below P (they went on to vote), and what it projects to over ``rows``:
    the rows that will vote and the N-1 requests each adds."""
    journal = Journal.open_readonly(journal_dir)
    try:
        extras = [r[0] for r in journal.conn.execute("SELECT extra FROM rows WHERE status != 'error'")]
    finally:
        journal.conn.close()
    voted = answered = 0
    for raw in extras:
        votes = orjson.loads(raw).get("votes") if raw else None
        if votes is None:
            continue  # not a labeling row, or none of its answers read
        answered += 1
        voted += sum(votes.values()) > 1
    share = voted / answered if answered else 0.0
    projected = round(share * rows)
    return {"below": labeling.vote_below, "pilot_rows": answered, "pilot_voted": voted, "share": share,
            "projected_rows": projected, "projected_extra_requests": projected * (labeling.samples - 1)}  # fmt: skip


def recommend(lines: list[dict[str, Any]]) -> int | None:
    """The cheapest size whose accuracy is within a point of the smallest size's."""
    if not lines:
        return None
    base = min(lines, key=lambda x: x["pack"])["accuracy"]["accuracy"]
    fine = [x for x in lines if x["accuracy"]["accuracy"] >= base - WITHIN]
    return min(fine, key=lambda x: Decimal(x["projected_cost_usd"]))["pack"]


def _untold(table: dict[str, Any]) -> str | None:
    """The cheaper sizes than the one marked that lost more than a point, but whose 95% interval
    holds the smallest size's accuracy: this pilot cannot tell them apart from it (a larger one
    can). Said, not marked: the mark stays the point estimates' pick."""
    sizes = table["sizes"]
    marked = next((x for x in sizes if x["pack"] == table["recommended"]), None)
    if marked is None:
        return None
    base = min(sizes, key=lambda x: x["pack"])["accuracy"]["accuracy"]
    cost = Decimal(marked["projected_cost_usd"])
    untold = [
        x for x in sizes
        if Decimal(x["projected_cost_usd"]) < cost and x["accuracy"]["low"] <= base <= x["accuracy"]["high"]
    ]  # fmt: skip
    if not untold:
        return None
    named = ", ".join(
        f"pack {x['pack']} ({x['accuracy']['accuracy']:.1%}, ${x['projected_cost_usd']})" for x in untold
    )
    return (
        f"cheaper, and within this pilot's 95% interval of pack {sizes[0]['pack']}'s {base:.1%}: {named}; "
        f"a larger --pilot tells them apart"
    )


def format_table(table: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        import orjson

        return orjson.dumps(table, option=orjson.OPT_INDENT_2).decode()
    header = ["pack", "requests", "prompt tok/row", "accuracy (95%)", "invalid", "$/correct",
              f"projected cost ({table['rows']:,} rows)", f"time at {table['rpm']:,}/min"]  # fmt: skip
    body = []
    for x in table["sizes"]:
        a = x["accuracy"]
        mark = " <- cheapest within 1 point" if x["pack"] == table["recommended"] else ""
        body.append([
            str(x["pack"]), f"{x['requests']:,}", f"{x['prompt_tokens_per_row']:,}",
            f"{a['accuracy']:.1%} ({a['low']:.1%}-{a['high']:.1%})", f"{x['invalid_rate']:.1%}",
            "-" if x["usd_per_correct_label"] is None else f"${x['usd_per_correct_label']}",
            f"${x['projected_cost_usd']}", f"{x['projected_minutes']:,} min{mark}",
        ])  # fmt: skip
    title = f"pilot of {table['pilot_rows']:,} rows at each pack size, scored against {table['gold']!r}"
    lines = [title, *grid(header, body, fmt == "markdown")]
    if (note := _untold(table)) is not None:
        lines.append(note)
    cached = [x for x in table["sizes"] if x["replies_from_cache"]]
    if cached:
        lines.append(
            "answered from the cache: "
            + ", ".join(f"pack {x['pack']} ({x['replies_from_cache']:,} replies)" for x in cached)
            + "; counted as if sent (their requests, tokens and cost when first paid for); "
            "the pilot paid " + ", ".join(f"${x['pilot_cost_usd']}" for x in cached)
        )
    return "\n".join(lines)
