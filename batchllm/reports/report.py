"""``batchllm report``: what a run did cost, overall and by any input column.

Reads an output Parquet (only the columns it needs) and sums every row's cost (computed once, by
``pricing.cost``, when the row was answered) back in integer picodollars, so totals are exact
and agree with the ``cost_usd`` column (which holds the same values rounded to float64). Rendered
as text, Markdown, JSON or CSV by report_text.py; ``report_html`` draws the page with plots.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from ..engine.counts import RowCounts
from ..engine.counts import of_frame as counts_of
from ..engine.output import read_schema, read_summary
from ..errors import JobError
from ..pricing import PICO_PER_USD, Prices, cached_saving, usd_text
from ..review.verdicts import reviewed_counts
from .by_endpoint import endpoint_breakdown
from .packing import packing

_BASE_COLUMNS = [
    "status",
    "prompt_tokens",
    "completion_tokens",
    "error",
    "latency_ms",
    "truncated",
    "model",
    "finished_at",
    "input_cost_usd",
    "output_cost_usd",
]
_SPLIT = ["reask_cost_usd", "sample_cost_usd"]  # a labeling run's spend beyond first answers
_REUSE = ["answered_by", "cached"]  # rows answered without a request of their own
_CACHED = ["cached_tokens"]  # prompt tokens served from the server's prompt cache (not in old outputs)
_COUNTED = ["tokens_counted"]  # the server reported no usage: batchllm counted the tokens
_CLASS = re.compile(r"^(\w+)")


def output_of(path: Path) -> Path:
    """The output ``report`` reads for ``path``: the path itself, or, for a journal folder (or
    its database, as ``status`` takes either), the output it sits beside."""
    from ..engine.journal import DB_NAME

    folder = path.parent if path.name == DB_NAME else path
    if not (folder / DB_NAME).is_file():
        return path
    if folder.name.endswith(".batchllm") and folder.name != ".batchllm":
        return folder.with_name(folder.name.removesuffix(".batchllm"))
    raise JobError(f"{path}: a batchllm journal (a --checkpoint folder); pass the output its run wrote")


def _from_journal(path: Path, by: str | None) -> tuple[pd.DataFrame, dict[str, Any]] | None:
    """A run that died before writing its output: the same figures, from its journal."""
    from ..engine.journal import DB_NAME, Journal
    from ..engine.lock import holder
    from ..engine.output import journal_table

    directory = path.with_name(path.name + ".batchllm")
    if not (directory / DB_NAME).is_file():
        return None
    if by is not None:
        raise JobError(
            f"{path}: not written yet (its run stopped before writing it), so there are no input columns "
            "for --by; run the same command again to write it, or leave out --by"
        )
    journal = Journal.open_readonly(directory)
    try:
        table = journal_table(journal)
        settings = journal.get_meta("settings") or {}
        run = journal.get_meta("last_run") or {}
    finally:
        journal.conn.close()
    frame = table.to_pandas()
    pending = max(0, int(run.get("input_rows") or 0) - len(frame))
    if pending:
        frame = pd.concat([frame, pd.DataFrame({"status": ["pending"] * pending})], ignore_index=True)
    summary = {"model": settings.get("model"), "from_journal": str(directory), "running": holder(directory)}
    return frame, summary


def _stale(path: Path) -> bool:
    """Has the journal beside a file output taken rows since the output was written (a run that
    died, or one running now)?"""
    from ..engine.journal import DB_NAME, Journal

    directory = path.with_name(path.name + ".batchllm")
    if path.is_dir() or not (directory / DB_NAME).is_file():
        return False
    journal = Journal.open_readonly(directory)
    try:
        last = journal.totals()["last_written"]
    finally:
        journal.conn.close()
    return last is not None and last > path.stat().st_mtime + 1.0


def load(path: Path, by: str | None) -> tuple[pd.DataFrame, dict[str, Any]]:
    if by is None and path.is_file() and _stale(path):
        found = _from_journal(path, by)
        if found is not None:
            frame, summary = found
            summary["from_journal"] += " (it has rows the output does not have yet)"
            return _prepared(frame, summary), summary
    try:
        schema = read_schema(path)
    except FileNotFoundError:
        found = _from_journal(path, by)
        if found is None:
            raise JobError(f"{path}: no such file, and no batchllm journal at {path}.batchllm/") from None
        frame, summary = found
        return _prepared(frame, summary), summary
    except (OSError, ValueError) as exc:
        raise JobError(f"{path}: not a readable Parquet file ({exc})") from None
    missing = [c for c in _BASE_COLUMNS if c not in schema.names]
    if missing:
        raise JobError(f"{path}: not a batchllm output (no column {missing[0]!r})")
    columns = list(_BASE_COLUMNS)
    if by is not None:
        if by not in schema.names:
            raise JobError(
                f"{path}: no column {by!r} for --by; the columns are: "
                + ", ".join(repr(c) for c in schema.names)
            )
        columns.append(by)
    columns += [c for c in _SPLIT + _REUSE + _CACHED + _COUNTED if c in schema.names]
    if "endpoint" in schema.names and by != "endpoint":  # a fleet's output (by_endpoint.py)
        columns.append("endpoint")
    frame = pq.read_table(path, columns=columns).to_pandas()
    summary = read_summary(path) or {}
    return _prepared(frame, summary), summary


def _prepared(frame: pd.DataFrame, summary: dict[str, Any]) -> pd.DataFrame:
    # Each row's cost is what it cost when answered (live, or at a batch discount): read back
    # exactly as integer picodollars (a float64 of pico / 1e12 round-trips below $9,000 a row).
    ok = frame["status"] == "ok"
    unpriced = frame["input_cost_usd"].isna() | frame["output_cost_usd"].isna()
    # Unknown when an answered row has no cost, or when none has one and the run's model had no
    # price (its summary's "prices"): $0.00 would claim a price that no one gave.
    some_priced = bool((ok & ~unpriced).any())
    no_price = "prices" in summary and summary["prices"] is None
    summary["_priced"] = not bool((ok & unpriced).any()) and (some_priced or not no_price)
    frame["cost_pico"] = _pico(frame["input_cost_usd"]) + _pico(frame["output_cost_usd"])
    frame["error_class"] = frame["error"].astype("object").map(_error_class)
    return frame


def _reused(found: RowCounts, frame: pd.DataFrame) -> dict[str, Any]:
    """Rows that cost nothing because an identical row or the cache had the reply."""
    if "cached" not in frame.columns:
        return {}
    return {
        "rows_answered_by_identical_rows": found.answered_by_identical_rows,
        "rows_from_cache": found.from_cache,
    }


def _split(frame: pd.DataFrame, total_pico: int, priced: bool) -> dict[str, Any]:
    """A labeling run's spend: first answers, re-asks and extra samples."""
    if "reask_cost_usd" not in frame.columns or not priced:
        return {}
    reasks = int(_pico(frame["reask_cost_usd"]).sum())
    samples = int(_pico(frame["sample_cost_usd"]).sum())
    return {
        "spend_usd": {
            "first_answers": usd_text(total_pico - reasks - samples),
            "reasks": usd_text(reasks),
            "extra_samples": usd_text(samples),
        }
    }


def _maybe_billed(path: Path, summary: dict[str, Any]) -> dict[str, Any] | None:
    """Requests a crash may have had billed without a saved reply: from the journal beside the
    output when it is there (it knows of a crash the output has not seen yet), else the summary."""
    from ..engine.journal import DB_NAME, Journal

    directory = path.with_name(path.name + ".batchllm")
    if (directory / DB_NAME).is_file():
        journal = Journal.open_readonly(directory)
        try:
            lost = journal.maybe_billed()
        finally:
            journal.conn.close()
        if not lost["requests"]:
            return None
        return {"requests": lost["requests"], "worst_case_usd": usd_text(lost["worst_pico"])}
    return summary.get("maybe_billed")


def _pico(usd: pd.Series) -> pd.Series:
    return (usd.astype("float64").fillna(0.0) * PICO_PER_USD).round().astype("int64")


def _error_class(error: object) -> str | None:
    """``FatalAPIError HTTP 413 ...`` -> ``FatalAPIError``; ``ContextWindowExceeded: ...`` likewise."""
    match = _CLASS.match(error) if isinstance(error, str) else None
    return match.group(1) if match else None


def _stats(frame: pd.DataFrame, priced: bool = True) -> dict[str, Any]:
    ok = frame[frame["status"] == "ok"]
    # Every row's spend counts, whatever its status: an invalid row's answers, a failed row's
    # re-asks and a pending row's earlier answers were billed too. Per-row figures are over the
    # rows that cost anything.
    paid = frame["input_cost_usd"].notna()
    costs = frame.loc[paid, "cost_pico"].to_numpy(dtype=np.int64)
    latency = ok["latency_ms"].dropna().to_numpy(dtype=float)
    total_pico = int(costs.sum())

    def pct(values: np.ndarray, q: float) -> float:
        return float(np.percentile(values, q)) if values.size else 0.0

    def cost_at(q: float) -> str | None:
        """A row's own cost at percentile ``q``, never one between two rows' ($0.000045999999)."""
        if not priced:
            return None
        return usd_text(int(np.percentile(costs, q, method="nearest")) if costs.size else 0)

    counts = frame["status"].value_counts()
    found = counts_of(frame)
    return {
        "rows": int(len(frame)),
        "ok": int(counts.get("ok", 0)),
        "error": int(counts.get("error", 0)),
        "pending": int(counts.get("pending", 0)),
        "truncated": found.truncated,
        "invalid": int(counts.get("invalid", 0)),
        "prompt_tokens": int(frame["prompt_tokens"].fillna(0).sum()),
        "completion_tokens": int(frame["completion_tokens"].fillna(0).sum()),
        "cached_tokens": int(frame["cached_tokens"].fillna(0).sum())
        if "cached_tokens" in frame.columns
        else 0,
        "tokens_counted": int(frame["tokens_counted"].fillna(False).astype(bool).sum())
        if "tokens_counted" in frame.columns
        else 0,
        "cost_usd": usd_text(total_pico if priced else None),
        "cost_per_row_usd": {
            "mean": usd_text((round(total_pico / costs.size) if costs.size else 0) if priced else None),
            "p50": cost_at(50),
            "p95": cost_at(95),
            "max": usd_text((int(costs.max()) if costs.size else 0) if priced else None),
        },
        "latency_ms": {
            "p50": round(pct(latency, 50), 1),
            "p95": round(pct(latency, 95), 1),
            "p99": round(pct(latency, 99), 1),
        },
        "errors_by_class": {str(k): int(v) for k, v in frame["error_class"].value_counts().items()},
        **_reused(found, frame),
        **_split(frame, total_pico, priced),
        "_cost_pico": total_pico,
    }


def build_report(path: Path, by: str | None = None) -> dict[str, Any]:
    frame, summary = load(path, by)
    priced = summary.pop("_priced")
    report: dict[str, Any] = {
        "output": str(path),
        "model": summary.get("model"),
        **({k: summary[k] for k in ("from_journal", "running")} if "from_journal" in summary else {}),
        "overall": _stats(frame, priced),
    }
    if by is not None:
        groups = {}
        for key, part in frame.groupby(
            frame[by].astype("object").where(frame[by].notna(), "(null)"), sort=True
        ):
            groups[str(key)] = _stats(part, priced)
        report["by"] = {"column": by, "groups": groups}
    endpoints = endpoint_breakdown(frame, summary, priced)
    if endpoints:
        report["endpoints"] = endpoints
    report["play_money"] = bool(summary.get("play_money"))  # batchllm's sandbox answered
    if report["overall"]["tokens_counted"]:  # their count is exact only with the model's tokenizer
        report["overall"]["tokens_counted_exactly"] = (summary.get("tokens") or {}).get("counted_exactly")
    report["cache_saved_usd"] = (summary.get("this_run") or {}).get("cache_saved_usd")
    report["cached_saved_usd"] = _cached_saved(report["overall"]["cached_tokens"], summary)
    if gone := summary.get("outside_input"):  # rows the journal paid for that the output lacks
        report["outside_input"] = gone
    lost = _maybe_billed(path, summary)
    if lost:
        report["maybe_billed"] = lost
    packed = packing(path)
    if packed:
        report["packing"] = packed
    reviewed = reviewed_counts(path) if path.is_file() else None
    if reviewed:
        report["reviewed"] = reviewed
    estimate = summary.get("estimate")
    if estimate:
        overall = report["overall"]
        # Like for like: the pilot's expected tokens (re-asks and samples, packed or not), else the
        # first pass as sent (packed, when packs were estimated).
        expected = (estimate.get("tokens_expected") or {}).get("prompt")
        first = (estimate.get("packing") or {}).get("prompt_tokens", estimate["prompt_tokens"]["total"])
        report["estimate_vs_actual"] = {
            "prompt_tokens": {
                "estimated": first if expected is None else expected,
                "of": "first pass" if expected is None else "expected",
                "actual": overall["prompt_tokens"],
            },
            "cost_usd": {
                "worst_case": estimate["cost_usd"]["worst_case"],
                "expected": estimate["cost_usd"].get("expected"),
                "actual": overall["cost_usd"],
            },
        }
    return report


def _cached_saved(cached_tokens: int, summary: dict[str, Any]) -> str | None:
    """What the prompt cache saved against the input price: the summary's, each row's at the
    prices it was answered at; from a summary of other rows (none), at the prices it names (None
    without a cached price: a fleet's summary names none, its endpoints' are their own)."""
    tokens = summary.get("tokens") or {}
    if cached_tokens and tokens.get("cached") == cached_tokens and tokens.get("cached_saved_usd") is not None:
        return str(tokens["cached_saved_usd"])
    prices = Prices.from_dict(summary.get("prices"))
    if not cached_tokens or prices is None or prices.cached_input_per_million is None:
        return None
    return usd_text(cached_saving(prices, cached_tokens))
