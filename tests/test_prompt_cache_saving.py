"""What the caches saved, end to end: a reply the response cache serves saved what it cost when it
was paid (its cached prompt tokens at the cached price), and the prompt cache's saving is each
row's at the prices it was answered at (a run resumed at another cached price, a batch imported
at the batch's prices). A killed run's ledger record keeps its saving: test_ledger.py."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import orjson

from batchllm.pricing import format_usd, load_models

from .conftest import read_output, run_cli, spawn, summary_of, write_csv
from .test_openai_batch import answer_batch
from .test_prompt_cache import BILL, MINI, job_args, long_system, pico
from .test_resume import _wait_for_rows

assert MINI is not None
PER_M = 10**6  # picodollars a token per USD per million tokens


def test_a_reply_from_the_response_cache_saved_what_it_cost_when_paid(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """The same job twice: the second run's replies all come from the response cache, and what
    they saved is what the first run paid for them (cached prompt tokens at the cached price), not
    every prompt token at the input price."""
    box = sandbox_factory(prices=BILL)
    common = ("--temperature", "0", "--concurrency", "4", "--cache", str(tmp_path / "responses"))
    first = run_cli(job_args(tmp_path, 40, "c1.parquet", *common), env=box.openai_env())
    assert first.exit_code == 0, first.output
    c1 = summary_of(tmp_path / "c1.parquet")
    assert c1["tokens"]["cached"] > 0 and pico(c1["cost_usd"]["total"]) == box.sandbox.stats["billed_pico"]
    second = run_cli(job_args(tmp_path, 40, "c2.parquet", *common), env=box.openai_env())
    assert second.exit_code == 0, second.output
    c2 = summary_of(tmp_path / "c2.parquet")
    assert c2["this_run"]["cache_hits"] == 40 and box.sandbox.stats["requests"] == 40  # nothing sent
    assert pico(c2["this_run"]["cache_saved_usd"]) == pico(c1["cost_usd"]["total"])
    assert f"this run's cache hits saved ${c1['cost_usd']['total']}" in second.output


def _row_saving(rows: list[dict[str, Any]], input_pico: int, cached_pico: int) -> int:
    return sum(r["cached_tokens"] or 0 for r in rows) * (input_pico - cached_pico)


def test_a_resumed_run_keeps_each_rows_saving_at_its_own_prices(sandbox_factory: Any, tmp_path: Path) -> None:
    """Ctrl-C a run at one cached price, resume it at another: each row saved what it saved at
    the price it was answered at, not the whole output at today's."""
    box = sandbox_factory(latency=0.2, prices=BILL)
    out = tmp_path / "out.parquet"
    args = job_args(
        tmp_path, 200, "out.parquet", "--concurrency", "8", "--cache", "off", "--progress", "none"
    )
    proc = spawn([*args, "--cached-input-price", "0.01"], env=box.openai_env())
    _wait_for_rows(tmp_path / "out.parquet.batchllm" / "journal.sqlite", 40)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    before = {r["id"] for r in read_output(out).to_pylist() if r["status"] == "ok"}
    assert 40 <= len(before) < 200
    result = run_cli([*args, "--cached-input-price", "0.05"], env=box.openai_env())
    assert result.exit_code == 0, result.output
    table = read_output(out).to_pylist()
    expected = _row_saving([r for r in table if r["id"] in before], MINI.input_pico, 10_000) + _row_saving(
        [r for r in table if r["id"] not in before], MINI.input_pico, 50_000
    )
    assert pico(summary_of(out)["tokens"]["cached_saved_usd"]) == expected
    # report and status say the same figure, not the output's cached tokens at today's price.
    report = orjson.loads(run_cli(["report", str(out), "--format", "json"]).output)
    assert pico(report["cached_saved_usd"]) == expected
    assert f"saving {format_usd(expected)} against the input price" in run_cli(["status", str(out)]).output


def test_imported_rows_keep_their_batch_saving_after_a_live_run(sandbox_factory: Any, tmp_path: Path) -> None:
    """Rows imported from a batch saved at the batch's prices (half the live ones); a live run of
    the same output after it adds its own rows' saving at the live prices and keeps theirs."""
    batch = load_models("openai")["gpt-4o-mini"].batch_prices
    assert batch is not None
    box = sandbox_factory(prices=(batch.input_pico, batch.output_pico, batch.cached_input_pico))
    job = ["--template", "Review: {text}", "--system", long_system(), "--id-column", "id",
           "--provider", "openai", "--model", "gpt-4o-mini"]  # fmt: skip
    data = write_csv(
        tmp_path / "reviews.csv", [{"id": i, "text": f"review {i}: it works"} for i in range(30)]
    )
    requests, results, errors = tmp_path / "req.jsonl", tmp_path / "res.jsonl", tmp_path / "err.jsonl"
    assert run_cli(["export-batch", str(data), *job, "-o", str(requests)]).exit_code == 0
    answer_batch(box, requests, results, errors)
    out = tmp_path / "out.parquet"
    imported = run_cli(
        ["import-batch", str(results), str(errors), "--input", str(data), *job, "-o", str(out)]
    )
    assert imported.exit_code == 0, imported.output
    batch_saving = _row_saving(read_output(out).to_pylist(), batch.input_pico, batch.cached_input_pico)
    assert batch_saving > 0 and pico(summary_of(out)["tokens"]["cached_saved_usd"]) == batch_saving
    # The import's ledger record says so too (it said 0 cached tokens, $0.00 saved).
    (record,) = orjson.loads(run_cli(["spend", "--runs", "--format", "json"]).output)["runs"]
    assert record["cached_tokens"] == summary_of(out)["tokens"]["cached"] > 0, record
    assert pico(record["cached_saved_usd"]) == batch_saving
    more = job_args(tmp_path, 50, "out.parquet", "--concurrency", "4", "--cache", "off")  # 20 more rows, live
    result = run_cli(more, env=box.openai_env())
    assert result.exit_code == 0, result.output
    table = read_output(out).to_pylist()
    live_saving = _row_saving(table[30:], MINI.input_pico, MINI.cached_input_pico)
    assert live_saving > 0
    assert pico(summary_of(out)["tokens"]["cached_saved_usd"]) == batch_saving + live_saving


def test_older_journals_and_caches_keep_working(sandbox_factory: Any, tmp_path: Path) -> None:
    """A journal from before rows kept their saving (schema 12) resumes: its rows' saving is at
    the run's prices, the new rows' their own; a response cache from before it kept cached tokens
    serves its replies, their saving at the input price (all that is known of them)."""
    import sqlite3

    box = sandbox_factory(prices=BILL)
    cache = tmp_path / "responses"
    args = job_args(
        tmp_path, 10, "old.parquet", "--concurrency", "4", "--temperature", "0", "--cache", str(cache)
    )
    assert run_cli(args, env=box.openai_env()).exit_code == 0
    with sqlite3.connect(tmp_path / "old.parquet.batchllm" / "journal.sqlite") as conn:
        conn.execute("ALTER TABLE rows DROP COLUMN cached_saved_pico")
    with sqlite3.connect(cache / "responses.sqlite") as conn:
        conn.execute("ALTER TABLE responses DROP COLUMN cached_tokens")
    more = job_args(
        tmp_path, 20, "old.parquet", "--concurrency", "4", "--temperature", "0", "--cache", str(cache)
    )
    result = run_cli(more, env=box.openai_env())
    assert result.exit_code == 0, result.output
    table = read_output(tmp_path / "old.parquet").to_pylist()
    discount = MINI.input_pico - MINI.cached_input_pico
    assert sum(r["cached_tokens"] for r in table) == box.sandbox.stats["cached_tokens"] > 0
    assert pico(summary_of(tmp_path / "old.parquet")["tokens"]["cached_saved_usd"]) == (
        box.sandbox.stats["cached_tokens"] * discount
    )
    again = run_cli(
        job_args(tmp_path, 10, "again.parquet", "--temperature", "0", "--cache", str(cache)),
        env=box.openai_env(),
    )
    assert again.exit_code == 0, again.output
    hits = summary_of(tmp_path / "again.parquet")["this_run"]
    first = table[:10]
    full = (
        sum(r["prompt_tokens"] for r in first) * MINI.input_pico
        + sum(r["completion_tokens"] for r in first) * MINI.output_pico
    )
    assert hits["cache_hits"] == 10 and pico(hits["cache_saved_usd"]) == full
