"""Never pay twice: duplicates sent once, the response cache, what a crash may have cost, per-run caps."""

from __future__ import annotations

import signal
import time
from decimal import Decimal
from pathlib import Path

import pyarrow.parquet as pq

from .conftest import run_cli, spawn, summary_of, write_csv


def run(box, src: Path, out: Path, *extra: str):
    return run_cli(
        ["run", str(src), "-o", str(out), "--rpm", "0", "--max-tokens", "8", *extra], env=box.env()
    )


def test_duplicates_are_sent_once(sandbox, tmp_path: Path) -> None:
    unique = [f"Question {i}: what is {i} squared?" for i in range(7000)]
    prompts = unique + [unique[(i * 7) % 7000] for i in range(3000)]  # 3,000 repeats of other rows
    src = write_csv(tmp_path / "in.csv", [{"prompt": p} for p in prompts])
    out = tmp_path / "o.parquet"
    result = run(sandbox, src, out, "--concurrency", "64")
    assert result.exit_code == 0, result.output
    assert sandbox.count() == 7000
    rows = pq.read_table(out).to_pylist()
    by_prompt = {r["prompt"]: r for r in rows if not r["answered_by"]}
    assert len(by_prompt) == 7000
    for r in rows:
        assert r["response"] == by_prompt[r["prompt"]]["response"]
        if r["answered_by"]:
            assert r["cost_usd"] == 0 and r["attempts"] == 0
    stats = sandbox.sandbox.stats
    billed = Decimal(stats["prompt_tokens"]) * Decimal("0.31") + Decimal(
        stats["completion_tokens"]
    ) * Decimal("0.34")
    assert Decimal(summary_of(out)["cost_usd"]["total"]) == billed / 10**6
    assert "3,000 rows answered by an identical row's reply" in result.output


def test_the_cache_serves_repeatable_requests_across_outputs(sandbox, tmp_path: Path) -> None:
    src = write_csv(tmp_path / "in.csv", [{"prompt": f"Tell me about item {i}"} for i in range(50)])
    assert run(sandbox, src, tmp_path / "a.parquet", "--temperature", "0").exit_code == 0
    assert sandbox.count() == 50
    again = run(sandbox, src, tmp_path / "b.parquet", "--temperature", "0")
    assert again.exit_code == 0 and sandbox.count() == 50  # all from the cache
    rows = pq.read_table(tmp_path / "b.parquet").to_pylist()
    first = pq.read_table(tmp_path / "a.parquet").to_pylist()
    assert all(r["cached"] and r["cost_usd"] == 0 for r in rows)
    assert [r["response"] for r in rows] == [r["response"] for r in first]
    assert "50 from the cache" in again.output
    # Identical rows in a batch served by the cache: the first is the cache's, the others copy it;
    # what the cache saved counts each reply once, the same as the first run paid for it.
    dup = write_csv(tmp_path / "dup.csv", [{"prompt": f"Tell me about item {i % 50}"} for i in range(60)])
    result = run(sandbox, dup, tmp_path / "dup.parquet", "--temperature", "0")
    assert "10 rows answered by an identical row's reply, 50 from the cache" in result.output
    saved = summary_of(tmp_path / "dup.parquet")["this_run"]["cache_saved_usd"]
    assert saved == summary_of(tmp_path / "a.parquet")["cost_usd"]["total"]
    assert run(sandbox, src, tmp_path / "c.parquet", "--temperature", "0", "--cache", "off").exit_code == 0
    assert sandbox.count() == 100  # --cache off: every request sent
    # Not meant to be repeatable (temperature 0.7, no seed): not served, unless --cache always.
    assert run(sandbox, src, tmp_path / "d.parquet", "--temperature", "0.7").exit_code == 0
    assert sandbox.count() == 150
    assert run(sandbox, src, tmp_path / "e.parquet", "--temperature", "0.7").exit_code == 0
    assert sandbox.count() == 200
    # --cache always keeps and serves any reply.
    always = ["--temperature", "0.7", "--cache", "always"]
    assert run(sandbox, src, tmp_path / "f.parquet", *always).exit_code == 0
    assert sandbox.count() == 250
    assert run(sandbox, src, tmp_path / "g.parquet", *always).exit_code == 0
    assert sandbox.count() == 250
    stats = run_cli(["cache", "stats"])
    assert stats.exit_code == 0 and "replies" in stats.output
    cleared = run_cli(["cache", "clear"])
    assert cleared.exit_code == 0 and "removed" in cleared.output


def test_a_template_change_sends_only_the_changed_half(sandbox, tmp_path: Path) -> None:
    rows = [{"a": f"text {i}", "b": f"text {i}" if i % 2 else f"other text {i}"} for i in range(100)]
    src = write_csv(tmp_path / "in.csv", rows)
    common = ["--temperature", "0"]
    assert run(sandbox, src, tmp_path / "one.parquet", "--template", "Say: {a}", *common).exit_code == 0
    before = sandbox.count()
    assert run(sandbox, src, tmp_path / "two.parquet", "--template", "Say: {b}", *common).exit_code == 0
    assert sandbox.count() - before == 50


def test_replies_are_not_served_to_another_endpoint(sandbox_factory, tmp_path: Path) -> None:
    src = write_csv(tmp_path / "in.csv", [{"prompt": f"Item {i}"} for i in range(20)])
    first, second = sandbox_factory(), sandbox_factory()
    assert run(first, src, tmp_path / "a.parquet", "--temperature", "0").exit_code == 0
    assert run(second, src, tmp_path / "b.parquet", "--temperature", "0").exit_code == 0
    assert second.count() == 20
    sandboxed = run_cli(
        ["run", str(src), "-o", str(tmp_path / "s.parquet"), "--sandbox", "--temperature", "0"]
    )
    assert sandboxed.exit_code == 0
    assert run(second, src, tmp_path / "c.parquet", "--temperature", "0").exit_code == 0
    assert second.count() == 20  # its own replies, from the cache; never the in-process sandbox's


def test_a_crash_reports_what_may_have_been_billed(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(latency=0.2)
    src = write_csv(tmp_path / "in.csv", [{"prompt": f"Question {i}"} for i in range(3000)])
    out = tmp_path / "o.parquet"
    args = ["run", str(src), "-o", str(out), "--rpm", "0", "--max-tokens", "8", "--concurrency", "500"]
    proc = spawn(args, env=box.env())
    deadline = time.monotonic() + 60
    while box.count() < 600 and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    status = run_cli(["status", str(out)])
    assert status.exit_code == 0
    line = next(x for x in status.output.splitlines() if "may have been billed" in x)
    count = int(line.split()[2].replace(",", ""))
    # In flight (at most --concurrency), plus replies received in the last event-loop turn that
    # the group commit had not saved yet: those are unsaved too, and counted. Each of the 500
    # requests answers at most once a turn, so both together are at most twice the concurrency
    # (a loaded machine, a slow commit, reaches past 500 + 64).
    assert 0 < count <= 2 * 500
    assert "at most $" in line
    resumed = run_cli(args, env=box.env())
    assert resumed.exit_code == 0, resumed.output
    assert "may have been billed" in resumed.output
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 3000 and all(r["status"] == "ok" for r in rows)
    report = run_cli(["report", str(out)])
    assert f"up to {count:,} requests" in report.output
    assert summary_of(out)["maybe_billed"]["requests"] == count


def test_max_cost_per_run(sandbox, tmp_path: Path) -> None:
    src = write_csv(tmp_path / "in.csv", [{"prompt": f"Question {i} " * 20} for i in range(100)])
    out = tmp_path / "o.parquet"
    result = run(sandbox, src, out, "--max-cost-per-run", "0.0003", "--concurrency", "4")
    assert result.exit_code == 3, result.output
    assert "--max-cost-per-run" in result.output
    this_run = Decimal(summary_of(out)["this_run"]["cost_usd"])
    assert 0 < this_run <= Decimal("0.0003")
    sent = sandbox.count()
    again = run(sandbox, src, out, "--max-cost-per-run", "0.0003", "--concurrency", "4")
    assert again.exit_code in (0, 3) and sandbox.count() > sent  # the next run goes on


def test_a_cache_from_before_confidences_opens_and_keeps_them_from_then_on(
    sandbox_factory, tmp_path: Path
) -> None:
    """A response cache written before replies kept their confidence gains the column when
    opened: its replies are served (with none), new ones keep theirs."""
    import sqlite3

    cache = tmp_path / "cache"
    cache.mkdir()
    conn = sqlite3.connect(cache / "responses.sqlite")
    conn.execute(
        "CREATE TABLE responses (key TEXT PRIMARY KEY, response TEXT NOT NULL, prompt_tokens INTEGER NOT NULL, "
        "completion_tokens INTEGER NOT NULL, truncated INTEGER NOT NULL, created_at REAL NOT NULL) WITHOUT ROWID"
    )
    conn.execute("INSERT INTO responses VALUES ('old', 'positive', 1, 1, 0, 0)")
    conn.commit()
    conn.close()
    box = sandbox_factory(label_wrong=0.25)
    src = write_csv(tmp_path / "in.csv", [{"text": f"Review {i}: fine"} for i in range(30)])
    args = ["--template", "Classify: {text}", "--labels", "positive,negative,neutral", "--provider", "openai"]
    args += ["--temperature", "0", "--cache", str(cache), "--max-tokens", "16"]
    for out in ("a.parquet", "b.parquet"):
        result = run_cli(
            ["run", str(src), "-o", str(tmp_path / out), "--rpm", "0", *args], env=box.openai_env()
        )
        assert result.exit_code == 0, result.output
    assert box.count() == 30
    paid, served = (pq.read_table(tmp_path / out).to_pylist() for out in ("a.parquet", "b.parquet"))
    assert all(r["cached"] for r in served) and all(r["confidence"] is not None for r in paid)
    assert [r["confidence"] for r in served] == [r["confidence"] for r in paid]
    conn = sqlite3.connect(cache / "responses.sqlite")
    kept = dict(conn.execute("SELECT key, confidence FROM responses").fetchall())
    conn.close()
    assert len(kept) == 31 and kept.pop("old") is None and all(kept.values())


def test_a_voted_row_the_cache_answered_whole_is_marked_cached(sandbox, tmp_path: Path) -> None:
    """--samples 3: every sample of a repeat run comes from the cache, at no cost, so the row is
    ``cached`` and the summary counts it (it said "0 from the cache" and marked no row)."""
    src = write_csv(tmp_path / "in.csv", [{"prompt": f"Review {i}: works well"} for i in range(30)])
    args = ["--labels", "positive,negative,neutral", "--samples", "3"]
    assert run(sandbox, src, tmp_path / "a.parquet", *args).exit_code in (0, 1)
    sent = sandbox.count()
    again = run(sandbox, src, tmp_path / "b.parquet", *args)
    assert again.exit_code in (0, 1) and sandbox.count() == sent  # nothing sent
    rows = pq.read_table(tmp_path / "b.parquet").to_pylist()
    assert all(r["cached"] and r["cost_usd"] == 0 for r in rows), rows[:2]
    assert "30 from the cache" in again.output, again.output
