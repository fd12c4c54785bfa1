"""Which rows of a labeling output a person should look at (``review export --pick``).

    random:N      a seeded uniform sample of the labeled rows: the basis of an accuracy estimate
    uncertain:N   invalid rows, then rows whose samples disagreed (lowest agreement first), then
                  rows that needed re-asks (most first)
    label:L:N     a seeded sample of the rows labeled L

Random picks are drawn first, the others from the rows left, in the order given, so picks never
overlap; each row picked says why.
"""

from __future__ import annotations

import random
from typing import Any, NamedTuple

from ..errors import JobError


class Pick(NamedTuple):
    kind: str  # random, uncertain, label
    n: int
    label: str | None = None


def parse_pick(text: str) -> Pick:
    """``random:N``, ``uncertain:N`` or ``label:L:N`` (a usage error names what is wrong)."""
    kind, _, rest = text.partition(":")
    label, _, count = rest.rpartition(":") if kind == "label" else ("", "", rest)
    if kind not in ("random", "uncertain", "label") or not count.isdigit() or int(count) < 1:
        raise JobError(f"--pick {text!r}: give random:N, uncertain:N or label:LABEL:N (N at least 1)")
    if kind == "label" and not label:
        raise JobError(f"--pick {text!r}: name the label, e.g. label:positive:20")
    return Pick(kind, int(count), label or None)


def choose(rows: list[dict[str, Any]], picks: list[Pick], seed: int = 0) -> list[tuple[int, str]]:
    """(row index, why) for each row picked: random picks first, then the others in order."""
    rng = random.Random(seed)
    labeled = [i for i, r in enumerate(rows) if r.get("status") in ("ok", "invalid")]
    taken: dict[int, str] = {}
    for p in sorted(picks, key=lambda p: p.kind != "random"):
        left = [i for i in labeled if i not in taken]
        if p.kind == "random":
            chosen = sorted(rng.sample(left, min(p.n, len(left))))
            taken.update((i, "random") for i in chosen)
        elif p.kind == "label":
            same = [i for i in left if rows[i].get("label") == p.label]
            chosen = sorted(rng.sample(same, min(p.n, len(same))))
            taken.update((i, f"label: {p.label}") for i in chosen)
        else:
            doubtful = [i for i in left if _doubt(rows[i]) is not None]
            doubtful.sort(key=lambda i: _rank(rows[i]))
            taken.update((i, f"uncertain: {_doubt(rows[i])}") for i in doubtful[: p.n])
    return sorted(taken.items())


def _doubt(row: dict[str, Any]) -> str | None:
    """Why a row's label may be wrong, or None."""
    if row.get("status") == "invalid":
        return f"invalid ({row.get('parse_error')})"
    agreement = row.get("agreement")
    if agreement is not None and agreement < 1:
        return f"agreement {agreement:.2f}"
    if row.get("reasks"):
        return f"re-asked {row['reasks']}"
    return None


def _rank(row: dict[str, Any]) -> tuple[int, float, int]:
    agreement = row.get("agreement")
    return (
        row.get("status") != "invalid",
        1.0 if agreement is None else agreement,
        -(row.get("reasks") or 0),
    )
