"""``batchllm estimate``: what a batch will cost before it runs, from exact token counts.

The input is streamed once; each batch's prompts are rendered exactly as ``run`` renders them,
counted with the model family's tokenizer (tokens.py: exact for Llama 3.x, so the estimated prompt
tokens equal what the API will bill) and admitted by the same rules (engine/plan.py). Completion tokens are unknown before a run: the worst case prices every row at
``max_tokens``; ``--from-run`` prices them at the completion lengths a previous run observed (mean,
with a 95% interval for the total). Per-row counts are kept as a compact int32 array (4 bytes a
row) for the percentiles, so memory stays flat in practice.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ..engine.journal import Journal
from ..engine.plan import Admission, prepare
from ..errors import JobError
from ..job import Job
from ..pricing import cost, usd_text

MAX_LISTED = 20


def estimate(job: Job, from_run: Path | None = None, observed: list[int] | None = None) -> dict[str, Any]:
    """The estimate; ``observed`` completion lengths (a pilot's) or ``from_run`` give "expected"."""
    p = prepare(job)
    model, admission = p.model, Admission.of(p, count_all=True)
    counts = np.zeros(p.rows, dtype=np.int32)
    # Identical requests are sent once (engine/reuse.py): rows are told apart by their content
    # hash, 8 bytes a row, so memory stays flat.
    digests = np.zeros(p.rows, dtype=np.uint64)
    over: list[str] = []
    over_count = empty = 0
    position = 0
    for batch in p.source.batches(p.builder.read_columns):
        pb = p.builder.build(batch, position)
        if pb.requests is not None:  # a request file: whole requests, counted as sent
            n = [admission.counter.count_messages(r.messages) for r in pb.requests]
        else:
            countable = [admission.needs_count(u) for u in pb.users]
            n = admission.count(
                [u if c and u is not None else "" for u, c in zip(pb.users, countable, strict=True)]
            )
        for i, user in enumerate(pb.users):
            refused = admission.reject(user, n[i], position + i + 1, whole=pb.requests is not None)
            tokens = n[i]
            if refused is not None:
                tokens = 0
                if refused.error_class == "ContextWindowExceeded":
                    over_count += 1
                    if len(over) < MAX_LISTED:
                        over.append(pb.row_ids[i])
                else:
                    empty += 1
            counts[position + i] = tokens
        digests[position : position + batch.num_rows] = [int(h[:16], 16) for h in pb.hashes]
        position += batch.num_rows
    mask = counts > 0
    _, first = np.unique(digests[mask], return_index=True)
    sendable = counts[mask][np.sort(first)]
    duplicates = int(mask.sum()) - int(sendable.size)
    rows_sent = int(sendable.size)
    prompt_tokens = int(sendable.sum())
    prompt_cost, _ = cost(model.prices, prompt_tokens, 0)
    worst = None
    if prompt_cost is not None:
        worst = prompt_cost + (cost(model.prices, 0, rows_sent * job.max_tokens)[1] or 0)
    rpm = job.rpm or int(p.provider.documented_rpm)
    minutes = rows_sent / rpm
    if job.tpm:
        minutes = max(minutes, (prompt_tokens + rows_sent * job.max_tokens) / job.tpm)
    result: dict[str, Any] = {
        "input": str(job.input),
        "provider": p.provider.name,
        "model": model.name,
        "token_counts": admission.counter.label,
        "rows": p.rows,
        "rows_to_send": rows_sent,
        "rows_answered_by_identical_rows": duplicates,
        "rows_over_window": over_count,
        "rows_over_window_ids": over,
        "rows_without_prompt": empty,
        "prompt_tokens": {
            "total": prompt_tokens,
            "mean": round(float(sendable.mean()), 1) if rows_sent else 0,
            "p50": int(np.percentile(sendable, 50)) if rows_sent else 0,
            "p95": int(np.percentile(sendable, 95)) if rows_sent else 0,
            "max": int(sendable.max()) if rows_sent else 0,
        },
        "max_tokens": job.max_tokens,
        "cost_usd": {"prompt": usd_text(prompt_cost), "worst_case": usd_text(worst)},
        "time": {"rpm": rpm, "tpm": job.tpm, "minutes": round(minutes, 1)},
    }
    if from_run is not None:
        observed = completions_of_run(from_run)
        result["expected_from"] = f"the run in {from_run}"
    if observed is not None and model.prices is not None and prompt_cost is not None:
        result["cost_usd"].update(
            _expected(
                np.asarray(observed, dtype=np.float64),
                rows_sent,
                prompt_cost,
                model.prices.output_pico,
                job.max_tokens,
            )
        )
    return result


def completions_of_run(path: Path) -> list[int]:
    try:
        table = pq.read_table(path, columns=["status", "completion_tokens"])
    except (OSError, ValueError) as exc:
        raise JobError(f"--from-run {path}: cannot read it ({exc})") from None
    ok = table.filter(table.column("status").to_numpy(zero_copy_only=False) == "ok")
    values = [int(v) for v in ok.column("completion_tokens").to_pylist()]
    if not values:
        raise JobError(f"--from-run {path}: no ok rows to learn completion lengths from")
    return values


def pilot_positions(rows: int, n: int, seed: int = 0) -> frozenset[int]:
    """A fixed random sample of input positions, the same every time for the same input size."""
    return frozenset(random.Random(seed).sample(range(rows), min(n, rows)))


def record_estimate(job: Job, result: dict[str, Any]) -> None:
    """Keep the estimate in the output's journal, so the run and its report can compare."""
    journal = Journal.open(job.journal_dir, job.request_settings())
    try:
        journal.set_meta("estimate", result)
    finally:
        journal.close()


def _expected(
    observed: np.ndarray, rows: int, prompt_cost: int, out_pico: int, max_tokens: int
) -> dict[str, Any]:
    if observed.size == 0:
        raise JobError("no completed rows to learn completion lengths from")
    observed = np.minimum(observed, max_tokens)
    mean, sd = float(observed.mean()), float(observed.std(ddof=1)) if observed.size > 1 else 0.0
    # 95% interval for the batch total: the sum of `rows` draws from the observed distribution.
    half = 1.96 * sd * math.sqrt(rows) + 1.96 * sd / math.sqrt(observed.size) * rows
    total = rows * mean
    low, high = math.floor(max(0.0, total - half)), math.ceil(min(rows * max_tokens, total + half))
    return {
        "expected": usd_text(prompt_cost + round(total) * out_pico),
        "expected_low": usd_text(prompt_cost + low * out_pico),
        "expected_high": usd_text(prompt_cost + high * out_pico),
        "observed_rows": int(observed.size),
        "observed_mean_completion_tokens": round(mean, 1),
    }


def _usd(text: str | None) -> str:
    return "unknown (no price: give --input-price and --output-price)" if text is None else f"${text}"


def format_estimate(e: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        import orjson

        return orjson.dumps(e, option=orjson.OPT_INDENT_2).decode()
    pt, money = e["prompt_tokens"], e["cost_usd"]
    rows = [
        ("rows", f"{e['rows']:,}"),
        ("rows to send", f"{e['rows_to_send']:,}"),
        ("rows answered by an identical row", f"{e.get('rows_answered_by_identical_rows', 0):,}"),
        (
            "rows over the context window",
            f"{e['rows_over_window']:,}"
            + (f" ({', '.join(e['rows_over_window_ids'])})" if e["rows_over_window_ids"] else ""),
        ),
        ("rows without a prompt", f"{e['rows_without_prompt']:,}"),
        (
            "prompt tokens",
            f"{pt['total']:,} (mean {pt['mean']:,}, p50 {pt['p50']:,}, p95 {pt['p95']:,}, max {pt['max']:,})",
        ),
        ("prompt cost", _usd(money["prompt"])),
        (f"worst case (every reply {e['max_tokens']:,} tokens)", _usd(money["worst_case"])),
    ]
    if "expected" in money:
        rows.append(
            (
                f"expected (from {money['observed_rows']:,} observed replies, mean {money['observed_mean_completion_tokens']:,})",
                f"${money['expected']} (95%: ${money['expected_low']} to ${money['expected_high']})",
            )
        )
    t = e["time"]
    rows.append(
        (
            "time at " + (f"{t['rpm']:,} requests/min" + (f", {t['tpm']:,} tokens/min" if t["tpm"] else "")),
            f"{t['minutes']:,} min",
        )
    )
    rows.append(("token counts", e["token_counts"]))
    if "pilot_accuracy" in e:
        a = e["pilot_accuracy"]
        rows.append(
            (
                f"pilot accuracy ({a['rows']:,} rows with gold)",
                f"{a['accuracy']:.1%} (95%: {a['low']:.1%} to {a['high']:.1%})",
            )
        )
    if fmt == "markdown":
        return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    width = max(len(k) for k, _ in rows)
    return f"estimate for {e['input']} on {e['model']}\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
