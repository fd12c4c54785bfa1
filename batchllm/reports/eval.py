"""``batchllm eval``: how good the labels are against human ("gold") labels, and what each cost.

Reads a labeling run's output (the ``label`` column, ``status``, costs and, with samples,
``agreement``) and a gold column, and computes accuracy, coverage, per-label precision, recall,
F1 and support, macro-F1, Cohen's kappa and the confusion matrix. Rows without a label (invalid,
failed, pending) count as wrong and appear in the matrix as ``(none)``; rows without a gold label
are left out. Money is exact: the spend is summed in integer picodollars, re-asks and samples
included, and divided by the number of correct labels: counted when every row answered has a
gold label, else estimated as the gold rows' accuracy times the rows answered (``cost_per_correct``;
the output says which). Rows a stopped run has not sent yet paid for nothing: left out of both. An output with a confidence column is also scored for calibration (calibration.py).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..engine.checks import Prepared
from ..engine.journal import Journal
from ..engine.output import read_schema, read_summary
from ..errors import JobError
from ..pricing import PICO_PER_USD, format_usd, usd_text
from .calibration import calibration, format_calibration
from .tables import grid as _grid

NONE = "(none)"


def load(path: Path, gold: str, by: str | None, field: str = "label") -> pd.DataFrame:
    try:
        schema = read_schema(path)
        names = schema.names
    except FileNotFoundError:
        raise JobError(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise JobError(f"{path}: not a readable Parquet file ({exc})") from None
    what_field = "a labeling run's label column" if field == "label" else "--field"
    for column, what in ((gold, "--gold"), (field, what_field), (by, "--by")):
        if column is not None and column not in names:
            hint = (
                " (an output of a job with --labels has one; a --json-schema output's fields are scored one "
                "at a time by `batchllm eval OUTPUT --gold COLUMN --field NAME`)"
                if column == "label"
                else ""
            )
            raise JobError(
                f"{path}: no column {column!r} ({what}); the columns are: {', '.join(names)}{hint}"
            )
    kind = schema.field(field).type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_struct(kind):
        raise JobError(
            f"{path}: --field {field!r} is a {'list' if not pa.types.is_struct(kind) else 'object'}: "
            "eval scores an enum, boolean or string field"
        )
    wanted = [field, "status", "input_cost_usd", "output_cost_usd", gold]
    wanted += [c for c in ("agreement", confidence_column(field)) if c in names]
    wanted += [by] if by and by not in wanted else []
    return pq.read_table(path, columns=list(dict.fromkeys(wanted))).to_pandas()


def confidence_column(field: str) -> str:
    """The column holding a field's confidence (labeling/confidence.py)."""
    return "confidence" if field == "label" else f"confidence_{field}"


def calibrated(frame: pd.DataFrame, gold: str, field: str) -> dict[str, Any]:
    """The calibration of the rows' confidence against ``gold`` (reports/calibration.py), over the
    rows with a confidence; nothing when the output has none."""
    column = confidence_column(field)
    if column not in frame.columns:
        return {}
    part = frame[frame[column].notna()]
    correct = [
        s == "ok" and as_label(x) == as_label(g)
        for x, s, g in zip(part[field], part["status"], part[gold], strict=True)
    ]
    return calibration([float(c) for c in part[column]], correct)


def metrics(gold: list[str], predicted: list[str | None], cost_pico: int) -> dict[str, Any]:
    """Accuracy, coverage, per-label scores, macro-F1, kappa and the confusion matrix."""
    n = len(gold)
    pred = [p if p is not None else NONE for p in predicted]
    correct = sum(g == p for g, p in zip(gold, pred, strict=True))
    labels = sorted(set(gold) | {p for p in pred if p != NONE})
    per_label: dict[str, dict[str, Any]] = {}
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(gold, pred, strict=True))
        predicted_n, support = pred.count(label), gold.count(label)
        precision = tp / predicted_n if predicted_n else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    with_support = [v["f1"] for v in per_label.values() if v["support"]]
    gold_share, pred_share = Counter(gold), Counter(pred)
    expected = sum(gold_share[k] * pred_share[k] for k in gold_share) / (n * n) if n else 0.0
    accuracy = correct / n if n else 0.0
    kappa = (accuracy - expected) / (1 - expected) if expected < 1 else 1.0
    confusion: dict[str, dict[str, int]] = {}
    for g, p in zip(gold, pred, strict=True):
        confusion.setdefault(g, {}).setdefault(p, 0)
        confusion[g][p] += 1
    return {
        "n": n,
        "accuracy": accuracy,
        "coverage": sum(p != NONE for p in pred) / n if n else 0.0,
        "correct": correct,
        "macro_f1": sum(with_support) / len(with_support) if with_support else 0.0,
        "kappa": kappa,
        "per_label": per_label,
        "confusion": confusion,
        "cost_usd": usd_text(cost_pico),
        "cost_per_correct_usd": usd_text((2 * cost_pico + correct) // (2 * correct)) if correct else None,
    }


def spent_pico(frame: pd.DataFrame) -> int:
    total = 0
    for column in ("input_cost_usd", "output_cost_usd"):
        total += int(
            (frame[column].astype("float64").fillna(0.0) * PICO_PER_USD).round().astype("int64").sum()
        )
    return total


def as_label(value: Any) -> str | None:
    """A label, a schema field's enum value, string or boolean, as the text it is scored as
    (booleans as ``true``/``false``, whichever way the gold column writes them)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    return text.lower() if text.lower() in ("true", "false") else text


def cost_per_correct(
    spent: int, correct: int, n: int, rows: int, sample: str, of: str, unsent: int = 0
) -> dict[str, Any]:
    """What a correct label cost: ``spent`` (every row's) over the correct labels, counted when
    the ``n`` rows scored are all ``rows``, else estimated as their accuracy times ``rows``
    (``sample`` and ``of`` name them in the words that say which).

    ``rows`` are the rows answered: the ``unsent`` rows a stopped run has not sent yet paid for
    nothing and have no label, so they are left out (counting them would project correct labels
    nobody paid for, and understate the cost of one by the share of rows still pending)."""
    if not correct:
        return {"cost_per_correct_usd": None, "cost_per_correct_basis": "no correct label"}
    among = f"among its {rows:,} {of} answered" if unsent else f"in its {rows:,} {of}"
    left = f" ({unsent:,} not sent yet, left out)" if unsent else ""
    if n == rows:
        counted = (
            f"counted: the output's cost over the {correct:,} correct labels {among}{left}"
            if unsent
            else f"counted: all {rows:,} rows' cost over their {correct:,} correct labels"
        )
        return {
            "cost_per_correct_usd": usd_text((2 * spent + correct) // (2 * correct)),
            "cost_per_correct_basis": counted,
        }
    estimate = correct * rows
    return {
        "cost_per_correct_usd": usd_text((2 * spent * n + estimate) // (2 * estimate)),
        "cost_per_correct_basis": f"estimated: the output's cost over the {estimate / n:,.0f} correct "
        f"labels that {sample} accuracy, {correct / n:.1%}, projects to {among}{left}",
    }


def evaluate(path: Path, gold: str, by: str | None = None, field: str = "label") -> dict[str, Any]:
    frame = load(path, gold, by, field)
    spent = spent_pico(frame)  # every row's spend, rows without gold included
    unsent_rows = int((frame["status"] == "pending").sum())  # a stopped run's: no label, no cost
    rows = len(frame) - unsent_rows  # the rows answered: what the spend paid for
    frame = frame[frame[gold].notna()]
    if frame.empty:
        raise JobError(f"{path}: no row has a gold label in {gold!r}")
    if not (frame["status"] == "ok").any():  # an accuracy of 0% would say the labels were wrong
        states = frame["status"].fillna("pending").value_counts()
        counted = ", ".join(f"{n:,} {s}" for s, n in states.items())
        raise JobError(
            f"{path}: none of the {len(frame):,} rows with a gold label has a {field} to score ({counted}; see the error column)"
        )
    # Rows a stopped run has not sent yet have no answer to be wrong: left out, and said.
    unsent = frame["status"] == "pending"
    pending = int(unsent.sum())
    frame = frame[~unsent]

    def scored(part: pd.DataFrame, cost: int) -> dict[str, Any]:
        labels = [
            as_label(x) if s == "ok" else None for x, s in zip(part[field], part["status"], strict=True)
        ]
        return metrics([as_label(g) or "" for g in part[gold]], labels, cost)

    out = {"output": str(path), "gold": gold, "field": field, **scored(frame, spent), "rows_pending": pending}
    out["play_money"] = bool((read_summary(path) or {}).get("play_money"))
    out.update(cost_per_correct(spent, out["correct"], out["n"], rows, "the gold rows'", "rows", unsent_rows))
    out.update(calibrated(frame, gold, field))
    if "agreement" in frame.columns:
        levels: dict[str, Any] = {}
        for level, part in frame.groupby(frame["agreement"].round(3), sort=True):
            m = scored(part, 0)
            levels[f"{level:g}"] = {"n": m["n"], "accuracy": m["accuracy"]}
        out["by_agreement"] = levels
    if by is not None:
        out["by"] = {str(k): scored(part, spent_pico(part)) for k, part in frame.groupby(by, sort=True)}
    return out


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% interval for an accuracy measured on ``n`` rows (Wilson score)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def format_eval(e: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return orjson.dumps(e, option=orjson.OPT_INDENT_2).decode()
    md = fmt == "markdown"
    head = [
        ("rows with gold", f"{e['n']:,}")
        if not e.get("rows_pending")
        else (
            "rows with gold",
            f"{e['n']:,} answered; {e['rows_pending']:,} not sent yet (a stopped run), left out",
        ),
        ("accuracy", f"{e['accuracy']:.1%} ({e['correct']:,} correct)"),
        ("coverage", f"{e['coverage']:.1%}"),
        ("macro-F1", f"{e['macro_f1']:.3f}"),
        ("Cohen's kappa", f"{e['kappa']:.3f}"),
        ("cost", format_usd(None) if e["cost_usd"] is None else f"${e['cost_usd']}"),
        (
            "cost per correct label",
            ("n/a" if e["cost_per_correct_usd"] is None else f"${e['cost_per_correct_usd']}")
            + (f" ({e['cost_per_correct_basis']})" if "cost_per_correct_basis" in e else ""),
        ),
    ]
    if "accuracy_interval" in e:  # against reviews (review_eval.py): the random picks' estimate
        low, high = e["accuracy_interval"]
        wrong = e["projected_wrong"]
        head[0] = ("random picks reviewed", f"{e['reviewed_random']:,}")
        head.insert(2, ("95% interval", f"{low:.1%} to {high:.1%}"))
        head.insert(
            3,
            (
                f"wrong labels in all {e['rows_labeled']:,} rows",
                f"{wrong[0]:,} ({wrong[1]:,} to {wrong[2]:,})",
            ),
        )
        if "reviewed_other" in e:
            other = e["reviewed_other"]
            head.append(
                ("other picks (not a fair sample)", f"{other['n']:,} rows, accuracy {other['accuracy']:.1%}")
            )
    lines = [
        f"# Evaluation of {e['output']} against {e['gold']}"
        if md
        else f"eval of {e['output']} against {e['gold']}"
    ]
    if e.get("play_money"):  # the sandbox draws its labels with an error rate of its own
        lines.append("the sandbox's labels (emulated, with a built-in error rate): not the model's accuracy")
    width = max(len(k) for k, _ in head)
    lines += (
        ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in head]]
        if md
        else [f"  {k:<{width}}  {v}" for k, v in head]
    )
    rows = [
        [k, f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}", str(v["support"])]
        for k, v in e["per_label"].items()
    ]
    lines += ["", *_grid(["label", "precision", "recall", "F1", "support"], rows, md)]
    predicted = sorted({p for row in e["confusion"].values() for p in row})
    matrix = [[g, *[str(e["confusion"][g].get(p, 0)) for p in predicted]] for g in sorted(e["confusion"])]
    lines += ["", "confusion (rows: gold, columns: predicted)", *_grid(["gold", *predicted], matrix, md)]
    if "by_agreement" in e:
        agree = [[k, str(v["n"]), f"{v['accuracy']:.1%}"] for k, v in e["by_agreement"].items()]
        lines += ["", *_grid(["agreement", "rows", "accuracy"], agree, md)]
    lines += format_calibration(e, md)
    return "\n".join(lines)


def pilot_accuracy(p: Prepared, journal: Journal, positions: frozenset[int], gold: str) -> dict[str, Any]:
    """``estimate --pilot N --gold COLUMN``: the pilot rows' accuracy, with a 95% interval."""
    if gold not in p.source.columns:
        raise JobError(f"{p.job.input}: no column {gold!r} (--gold)")
    correct = n = position = 0
    for batch in p.source.batches([*p.builder.read_columns, gold]):
        pb = p.builder.build(batch.select(p.builder.read_columns), position)
        golds = batch.column(gold).to_pylist()
        picked = [i for i in range(batch.num_rows) if position + i in positions and golds[i] is not None]
        position += batch.num_rows
        entries = journal.fetch([pb.row_ids[i] for i in picked])
        for i in picked:
            e = entries.get(pb.row_ids[i])
            label = (
                orjson.loads(e.extra).get("value") if e is not None and e.extra and e.status == "ok" else None
            )
            n += 1
            correct += label == str(golds[i])
    low, high = wilson(correct, n)
    return {"rows": n, "accuracy": correct / n if n else 0.0, "low": low, "high": high}
