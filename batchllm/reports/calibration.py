"""Calibration of a labeling run's confidence (labeling/confidence.py) against gold labels.

A confidence is calibrated when the labels given confidence p are right a share p of the time.
Over the rows that have both a confidence and a gold label:

    reliability            10 equal-width bins of confidence (row in bin min(floor(10 c), 9)):
                           each bin's rows, mean confidence and accuracy
    ece                    the expected calibration error: the bins' |accuracy - mean confidence|,
                           weighted by their share of the rows
    accuracy_at_coverage   the most confident 50%, 80%, 90% and 100% of the rows (the ceil(q n)
                           surest, ties in output order): their accuracy and count; what trusting
                           only the surest labels, and reviewing the rest, would give

Pure functions over lists; eval, its review form and the HTML report call them.
"""

from __future__ import annotations

import math
from typing import Any

from .tables import grid

BINS = 10
COVERAGES = (0.5, 0.8, 0.9, 1.0)


def bin_of(confidence: float) -> int:
    return min(int(math.floor(confidence * BINS)), BINS - 1)


def calibration(confidences: list[float], correct: list[bool]) -> dict[str, Any]:
    """``ece``, ``reliability`` and ``accuracy_at_coverage`` of these rows (see the docstring)."""
    n = len(confidences)
    sums = [[0, 0.0, 0] for _ in range(BINS)]  # rows, confidence, correct
    for c, ok in zip(confidences, correct, strict=True):
        b = sums[bin_of(c)]
        b[0] += 1
        b[1] += c
        b[2] += ok
    reliability = []
    ece = 0.0
    for k, (rows, total, right) in enumerate(sums):
        if not rows:
            continue
        mean, accuracy = total / rows, right / rows
        ece += rows / n * abs(accuracy - mean)
        reliability.append(
            {"bin": f"{k / BINS:.1f}-{(k + 1) / BINS:.1f}", "rows": rows, "mean_confidence": mean,
             "accuracy": accuracy}
        )  # fmt: skip
    order = sorted(range(n), key=lambda i: -confidences[i])  # stable: ties in output order
    at: dict[str, Any] = {}
    for q in COVERAGES:
        k = math.ceil(q * n - 1e-9)
        right = sum(correct[i] for i in order[:k])
        at[f"{q:g}" if q < 1 else "1.0"] = {"rows": k, "accuracy": right / k if k else None}
    return {"calibrated_rows": n, "ece": ece if n else None, "reliability": reliability,
            "accuracy_at_coverage": at}  # fmt: skip


def format_calibration(e: dict[str, Any], md: bool) -> list[str]:
    """The calibration part of ``eval``'s text or Markdown (nothing when the output has none)."""
    if "ece" not in e or e["ece"] is None:
        return []
    lines = ["", f"calibration of the confidence ({e['calibrated_rows']:,} rows): ECE {e['ece']:.3f}"]
    table = [
        [b["bin"], f"{b['rows']:,}", f"{b['mean_confidence']:.3f}", f"{b['accuracy']:.1%}"]
        for b in e["reliability"]
    ]
    lines += grid(["confidence", "rows", "mean confidence", "accuracy"], table, md)
    cover = [
        [f"most confident {float(q):.0%}", f"{v['rows']:,}", "n/a" if v["accuracy"] is None else f"{v['accuracy']:.1%}"]
        for q, v in e["accuracy_at_coverage"].items()
    ]  # fmt: skip
    lines += ["", *grid(["coverage", "rows", "accuracy"], cover, md)]
    return lines
