"""``batchllm estimate``: what a batch will cost before it runs, from exact token counts.

The input is streamed once; each batch's prompts are rendered exactly as ``run`` renders them and
counted with the real Llama 3 tokenizer (tokens.py), so the estimated prompt tokens equal what the
API will bill. Completion tokens are unknown before a run: the worst case prices every row at
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

from .errors import JobError
from .job import MAX_CONTENT_CHARS, PROVIDER_RPM, Job
from .journal import Journal
from .pricing import format_usd
from .runner import prepare
from .tokens import get_counter

MAX_LISTED = 20


def estimate(job: Job, from_run: Path | None = None, observed: list[int] | None = None) -> dict[str, Any]:
    """The estimate; ``observed`` completion lengths (a pilot's) or ``from_run`` give "expected"."""
    p = prepare(job)
    counter = get_counter()
    model = p.model
    overhead = counter.overhead(job.system)
    counts = np.zeros(p.rows, dtype=np.int32)
    over: list[str] = []
    over_count = empty = 0
    position = 0
    for batch in p.source.batches(p.builder.read_columns):
        pb = p.builder.build(batch, position)
        texts = [u if u is not None and len(u) <= MAX_CONTENT_CHARS else "" for u in pb.users]
        n = counter.texts_tokens(texts)
        for i, u in enumerate(pb.users):
            tokens = overhead + n[i]
            if u is None or len(u) > MAX_CONTENT_CHARS:
                empty += 1
                tokens = 0
            elif tokens + job.max_tokens > model.context_window:
                over_count += 1
                if len(over) < MAX_LISTED:
                    over.append(pb.row_ids[i])
                tokens = 0
            counts[position + i] = tokens
        position += batch.num_rows
    sendable = counts[counts > 0]
    rows_sent = int(sendable.size)
    prompt_tokens = int(sendable.sum())
    in_pico, out_pico = model.input_pico_per_token, model.output_pico_per_token
    prompt_cost = prompt_tokens * in_pico
    worst = prompt_cost + rows_sent * job.max_tokens * out_pico
    rpm = job.rpm or PROVIDER_RPM
    minutes = rows_sent / rpm
    if job.tpm:
        minutes = max(minutes, (prompt_tokens + rows_sent * job.max_tokens) / job.tpm)
    result: dict[str, Any] = {
        "input": str(job.input),
        "model": model.name,
        "token_counts": counter.label,
        "rows": p.rows,
        "rows_to_send": rows_sent,
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
        "cost_usd": {
            "prompt": format_usd(prompt_cost).lstrip("$"),
            "worst_case": format_usd(worst).lstrip("$"),
        },
        "time": {"rpm": rpm, "tpm": job.tpm, "minutes": round(minutes, 1)},
    }
    if from_run is not None:
        observed = completions_of_run(from_run)
        result["expected_from"] = f"the run in {from_run}"
    if observed is not None:
        result["cost_usd"].update(
            _expected(
                np.asarray(observed, dtype=np.float64), rows_sent, prompt_cost, out_pico, job.max_tokens
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


def completions_of_journal(journal: Journal) -> list[int]:
    """Completion lengths of every ok row a journal holds (a pilot's, and any earlier run's)."""
    cur = journal.conn.execute("SELECT completion_tokens FROM rows WHERE status = 'ok'")
    return [int(r[0]) for r in cur]


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
        "expected": format_usd(prompt_cost + round(total) * out_pico).lstrip("$"),
        "expected_low": format_usd(prompt_cost + low * out_pico).lstrip("$"),
        "expected_high": format_usd(prompt_cost + high * out_pico).lstrip("$"),
        "observed_rows": int(observed.size),
        "observed_mean_completion_tokens": round(mean, 1),
    }


def format_estimate(e: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        import orjson

        return orjson.dumps(e, option=orjson.OPT_INDENT_2).decode()
    pt, cost = e["prompt_tokens"], e["cost_usd"]
    rows = [
        ("rows", f"{e['rows']:,}"),
        ("rows to send", f"{e['rows_to_send']:,}"),
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
        ("prompt cost", f"${cost['prompt']}"),
        (f"worst case (every reply {e['max_tokens']:,} tokens)", f"${cost['worst_case']}"),
    ]
    if "expected" in cost:
        rows.append(
            (
                f"expected (from {cost['observed_rows']:,} observed replies, mean {cost['observed_mean_completion_tokens']:,})",
                f"${cost['expected']} (95%: ${cost['expected_low']} to ${cost['expected_high']})",
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
    if fmt == "markdown":
        return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    width = max(len(k) for k, _ in rows)
    return f"estimate for {e['input']} on {e['model']}\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
