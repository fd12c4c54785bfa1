"""Which rows of a labeling output a person should look at (``review export --pick``).

    random:N      a seeded uniform sample of the labeled rows: the basis of an accuracy estimate
    uncertain:N   invalid rows, then, when the output has a confidence (labeling/confidence.py),
                  every labeled row from the least confident up; else rows whose samples
                  disagreed (lowest agreement first), then rows that needed re-asks (most first)
    below:P:N     a seeded sample of the rows whose confidence is below P
    label:L:N     a seeded sample of the rows labeled L

A --json-schema row's confidence is its least sure field's.

Random picks are drawn first, the others from the rows left, in the order given, so picks never
overlap; each row picked says why, and each pick that found fewer rows than it asked for says how
many it found (``Chosen.short``).
"""

from __future__ import annotations

import random
from typing import Any, NamedTuple

from ..errors import JobError
from ..labeling.spec import Labeling


class Pick(NamedTuple):
    kind: str  # random, uncertain, below, label
    n: int
    label: str | None = None
    below: float | None = None  # below:P:N

    def __str__(self) -> str:
        if self.below is not None:
            return f"{self.kind}:{self.below:g}:{self.n}"
        return f"{self.kind}:{self.label}:{self.n}" if self.label is not None else f"{self.kind}:{self.n}"

    def fewer(self, found: int, after_others: bool) -> str:
        """The pick found ``found`` rows of the ``n`` it asked for, in words."""
        among = {
            "random": "labeled rows",
            "uncertain": "uncertain rows (invalid, samples that disagreed, re-asked)",
            "label": f"rows labeled {self.label!r}",
            "below": f"rows with a confidence below {self.below or 0:g}",
        }[self.kind]
        where = "left after the other picks" if after_others else "in the output"
        return f"--pick {self}: {found:,} picked, not {self.n:,}: no more {among} {where}"


def parse_pick(text: str) -> Pick:
    """``random:N``, ``uncertain:N``, ``below:P:N`` or ``label:L:N`` (a usage error names what is
    wrong)."""
    kind, _, rest = text.partition(":")
    label, _, count = rest.rpartition(":") if kind in ("label", "below") else ("", "", rest)
    if kind not in ("random", "uncertain", "below", "label") or not count.isdigit() or int(count) < 1:
        raise JobError(
            f"--pick {text!r}: give random:N, uncertain:N, below:P:N or label:LABEL:N (N at least 1)"
        )
    if kind == "label" and not label:
        raise JobError(f"--pick {text!r}: name the label, e.g. label:positive:20")
    if kind == "below":
        try:
            below = float(label)
        except ValueError:
            below = -1.0
        if not 0 < below <= 1:
            raise JobError(f"--pick {text!r}: give a confidence from 0 to 1, e.g. below:0.8:20")
        return Pick(kind, int(count), None, below)
    return Pick(kind, int(count), label or None)


def check_picks(picks: list[Pick], labeling: Labeling) -> None:
    """A label pick must name a label of the set: one outside it could never match a row."""
    for p in picks:
        if p.kind == "below" and labeling.confidence == "off":
            raise JobError(f"--pick {p}: the output has no confidence column (run with --confidence)")
        if p.kind != "label":
            continue
        if labeling.is_schema:
            raise JobError(
                f"--pick {p}: a --json-schema output has no label column; pick random:N or uncertain:N"
            )
        if p.label not in labeling.labels:
            raise JobError(f"--pick {p}: {p.label!r} is not in the label set ({', '.join(labeling.labels)})")


class Chosen(NamedTuple):
    rows: list[tuple[int, str]]  # (row index, why), in row order
    short: list[str]  # the picks that found fewer rows than asked, each in words


def choose(rows: list[dict[str, Any]], picks: list[Pick], seed: int = 0) -> Chosen:
    """The rows picked: random picks first, then the others in order."""
    rng = random.Random(seed)
    labeled = [i for i, r in enumerate(rows) if r.get("status") in ("ok", "invalid")]
    taken: dict[int, str] = {}
    short: list[str] = []
    for p in sorted(picks, key=lambda p: p.kind != "random"):
        after_others = bool(taken)
        left = [i for i in labeled if i not in taken]
        if p.kind == "random":
            found = left
            picked = [(i, "random") for i in sorted(rng.sample(left, min(p.n, len(left))))]
        elif p.kind == "label":
            found = [i for i in left if rows[i].get("label") == p.label]
            picked = [(i, f"label: {p.label}") for i in sorted(rng.sample(found, min(p.n, len(found))))]
        elif p.kind == "below":
            below = p.below or 0.0
            found = [i for i in left if (c := sure(rows[i])) is not None and c < below]
            picked = [
                (i, f"below {below:g}: {sure(rows[i]):.2f}")
                for i in sorted(rng.sample(found, min(p.n, len(found))))
            ]
        else:
            found = [i for i in left if _doubt(rows[i]) is not None]
            found.sort(key=lambda i: _rank(rows[i]))
            picked = [(i, f"uncertain: {_doubt(rows[i])}") for i in found[: p.n]]
        taken.update(picked)
        if len(found) < p.n:
            short.append(p.fewer(len(found), after_others))
    return Chosen(sorted(taken.items()), short)


def sure(row: dict[str, Any]) -> float | None:
    """A row's confidence: its label's, or its least sure field's (``confidence_<field>``)."""
    found = row.get("confidence")
    if found is not None:
        return float(found)
    fields = [v for k, v in row.items() if k.startswith("confidence_") and v is not None]
    return min(fields) if fields else None


def _doubt(row: dict[str, Any]) -> str | None:
    """Why a row's label may be wrong, or None."""
    if row.get("status") == "invalid":
        return f"invalid ({row.get('parse_error')})"
    confidence = sure(row)
    if confidence is not None:
        return f"confidence {confidence:.2f}"
    agreement = row.get("agreement")
    if agreement is not None and agreement < 1:
        return f"agreement {agreement:.2f}"
    if row.get("reasks"):
        return f"re-asked {row['reasks']}"
    return None


def _rank(row: dict[str, Any]) -> tuple[int, float, float, int]:
    agreement, confidence = row.get("agreement"), sure(row)
    return (
        row.get("status") != "invalid",
        2.0 if confidence is None else confidence,  # rows without one (e.g. no logprobs) after
        1.0 if agreement is None else agreement,
        -(row.get("reasks") or 0),
    )
