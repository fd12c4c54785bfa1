"""``eval OUTPUT --gold review``: the model scored against people's verdicts (review/).

The accuracy and its 95% (Wilson) interval come from the random picks only, a uniform sample of
the output's labeled rows; from them, the number of wrong labels in the whole output with its
interval, and the cost of a correct label: the output's cost over the correct labels that
accuracy projects to (never over the few reviewed ones alone). Rows picked as uncertain (or by
label) are a biased sample: their accuracy is reported apart and never mixed in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from ..engine.output import read_schema
from ..errors import JobError
from .eval import as_label, calibrated, confidence_column, cost_per_correct, metrics, spent_pico, wilson


def evaluate_review(path: Path, field: str = "label") -> dict[str, Any]:
    try:
        names = read_schema(path).names
    except (OSError, ValueError) as exc:
        raise JobError(f"{path}: not a readable Parquet file ({exc})") from None
    gold = f"review_{field}"
    if gold not in names:
        raise JobError(f"{path}: no column {gold!r}: bring verdicts home first (batchllm review import)")
    wanted = [field, "status", gold, "review_pick", "input_cost_usd", "output_cost_usd"]
    wanted += [c for c in (confidence_column(field),) if c in names]
    frame = pq.read_table(path, columns=wanted).to_pandas()
    labeled = int(frame["status"].isin(["ok", "invalid"]).sum())
    spent = spent_pico(frame)
    reviewed = frame[frame[gold].notna()]
    sample = reviewed[reviewed["review_pick"] == "random"]
    if sample.empty:
        raise JobError(
            f"{path}: no random pick has a verdict: export some with --pick random:N (the other picks "
            "are not a fair sample)"
        )

    def scored(part: Any, cost: int) -> dict[str, Any]:
        predicted = [
            as_label(x) if s == "ok" else None for x, s in zip(part[field], part["status"], strict=True)
        ]
        return metrics([as_label(g) or "" for g in part[gold]], predicted, cost)

    out: dict[str, Any] = {"output": str(path), "gold": "review", "field": field, **scored(sample, spent)}
    low, high = wilson(out["correct"], out["n"])
    out["reviewed_random"] = out["n"]
    out["accuracy_interval"] = [low, high]
    out["rows_labeled"] = labeled
    # The random picks are drawn from the labeled rows: a row without a label is never correct.
    out.update(
        cost_per_correct(spent, out["correct"], out["n"], labeled, "the random picks'", "labeled rows")
    )
    out["projected_wrong"] = [round((1 - out["accuracy"]) * labeled), round((1 - high) * labeled),
                              round((1 - low) * labeled)]  # fmt: skip
    out.update(calibrated(sample, gold, field))  # on the random picks: a fair sample
    others = reviewed[reviewed["review_pick"] != "random"]
    if not others.empty:
        m = scored(others, 0)
        out["reviewed_other"] = {"n": m["n"], "accuracy": m["accuracy"]}
    return out
