"""Checkpointed resume with real subprocesses and real signals (issue 4)."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import stat
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pyarrow.parquet as pq

from .conftest import prompts_csv, run_cli, spawn, summary_of


def _wait_for_rows(journal_db: Path, at_least: int, timeout: float = 30) -> None:
    import sqlite3

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if journal_db.exists():
            try:
                with sqlite3.connect(f"file:{journal_db}?mode=ro", uri=True) as conn:
                    if conn.execute("SELECT COUNT(*) FROM rows").fetchone()[0] >= at_least:
                        return
            except sqlite3.Error:
                pass
        time.sleep(0.05)
    raise AssertionError(f"journal never reached {at_least} rows")


def test_sigkill_five_times_then_finish(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(latency=0.2)
    src = prompts_csv(tmp_path / "in.csv", 5000)
    out = tmp_path / "out.parquet"
    args = ["run", str(src), "-o", str(out), "--rpm", "0", "--concurrency", "100"]
    rng = random.Random(7)
    kills = 0
    for _ in range(5):
        proc = spawn(args, env=box.env())
        time.sleep(rng.uniform(0.8, 2.5))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
        kills += 1
    proc = spawn(args, env=box.env())
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 5000
    assert [r["prompt"] for r in rows] == [f"Question number {i}: what is {i} + {i}?" for i in range(5000)]
    assert all(r["status"] == "ok" for r in rows)
    # Same responses as an uninterrupted run into a fresh output.
    clean = tmp_path / "clean.parquet"
    assert (
        run_cli(
            ["run", str(src), "-o", str(clean), "--rpm", "0", "--concurrency", "200"], env=box.env()
        ).exit_code
        == 0
    )
    assert [r["response"] for r in rows] == pq.read_table(clean).column("response").to_pylist()
    # The sandbox answered no row twice beyond what was in flight at the kills.
    answered = Counter(key for _, status, key in box.log() if status == 200)
    repeats = sum(n - 2 for n in answered.values() if n > 2)  # each row twice: the run + the clean run
    assert len(answered) == 5000
    assert repeats <= 100 * kills


def test_sigterm_and_sigint_exit_130_then_resume(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(latency=0.2)
    src = prompts_csv(tmp_path / "in.csv", 3000)
    out = tmp_path / "out.parquet"
    args = ["run", str(src), "-o", str(out), "--rpm", "0", "--concurrency", "50", "--grace", "5"]
    done = 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = spawn(args, env=box.env())
        _wait_for_rows(tmp_path / "out.parquet.batchllm" / "journal.sqlite", done + 100)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert "to resume, run the same command again" in err
        summary = summary_of(out)
        assert summary["complete"] is False and summary["rows"]["pending"] > 0
        statuses = Counter(pq.read_table(out).column("status").to_pylist())
        assert set(statuses) <= {"ok", "pending"} and statuses["pending"] == summary["rows"]["pending"]
        done = statuses["ok"]
    proc = spawn(args, env=box.env())
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert Counter(pq.read_table(out).column("status").to_pylist()) == {"ok": 3000}


def test_second_interrupt_stops_at_once(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(latency=2.0)
    src = prompts_csv(tmp_path / "in.csv", 500)
    out = tmp_path / "out.parquet"
    proc = spawn(
        ["run", str(src), "-o", str(out), "--rpm", "0", "--concurrency", "20", "--grace", "30"], env=box.env()
    )
    _wait_for_rows(tmp_path / "out.parquet.batchllm" / "journal.sqlite", 20)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 130, err
    assert time.monotonic() - started < 5
    # The journal is intact and the next run completes.
    result = run_cli(["run", str(src), "-o", str(out), "--rpm", "0", "--concurrency", "100"], env=box.env())
    assert result.exit_code == 0, result.stderr


def test_a_stop_with_nothing_in_flight_exits_at_once(sandbox, tmp_path: Path) -> None:
    # At 2 requests a minute the workers wait for slots with nothing on the wire: Ctrl-C, a bad
    # key's stop or --max-runtime end the run then and there, not after --grace.
    src = prompts_csv(tmp_path / "in.csv", 50)
    out = tmp_path / "out.parquet"
    proc = spawn(["run", str(src), "-o", str(out), "--rpm", "2", "--grace", "30"], env=sandbox.env())
    _wait_for_rows(tmp_path / "out.parquet.batchllm" / "journal.sqlite", 1)
    time.sleep(0.3)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    took = time.monotonic() - started
    assert proc.returncode == 130, err
    assert took < 1.0, f"took {took:.2f} s"  # the run writes its output and summary in that time
    assert summary_of(out)["rows"]["pending"] == 49
    started = time.monotonic()
    result = run_cli(
        ["run", str(src), "-o", str(out), "--rpm", "2", "--max-runtime", "1s"], env=sandbox.env()
    )
    assert result.exit_code == 75 and time.monotonic() - started < 3.0


def test_report_right_after_a_crash_reads_the_journal(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(latency=0.05)
    src = prompts_csv(tmp_path / "in.csv", 400)
    out = tmp_path / "out.parquet"
    proc = spawn(["run", str(src), "-o", str(out), "--rpm", "0", "--concurrency", "8"], env=box.env())
    _wait_for_rows(tmp_path / "out.parquet.batchllm" / "journal.sqlite", 50)
    proc.kill()
    proc.communicate(timeout=30)
    assert not out.exists()  # killed before its output was written
    status = run_cli(["status", str(out)]).output
    report = run_cli(["report", str(out)])
    assert report.exit_code == 0, report.output
    assert "read from its journal" in report.output
    cost = re.search(r"cost so far: (\$[0-9.]+)", status)
    assert cost is not None and f"cost               {cost.group(1)}" in report.output
    assert re.search(r"rows +400 \(\d+ ok, 0 error, \d+ pending\)", report.output)
    assert "--by" in run_cli(["report", str(out), "--by", "id"]).stderr  # no input columns yet


def test_outputs_follow_the_umask(sandbox, tmp_path: Path) -> None:
    src = prompts_csv(tmp_path / "in.csv", 5)
    out, summary = tmp_path / "out.parquet", tmp_path / "summary.json"
    old = os.umask(0o022)
    try:
        args = ["run", str(src), "-o", str(out), "--rpm", "0", "--summary-json", str(summary)]
        assert run_cli(args, env=sandbox.env()).exit_code == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert stat.S_IMODE(summary.stat().st_mode) == 0o644


def test_restart_says_what_may_have_been_billed_without_a_reply(sandbox_factory, tmp_path: Path) -> None:
    """Requests given up on (no reply saved) may have been billed: --restart says so when it
    discards them, even with no answered row (it said nothing)."""
    box = sandbox_factory(fail_hang=1.0)
    src = prompts_csv(tmp_path / "in.csv", 3)
    out = tmp_path / "out.parquet"
    base = ["run", str(src), "-o", str(out), "--rpm", "0", "--timeout", "0.5", "--max-attempts", "1"]
    first = run_cli(base, env=box.env())
    maybe = summary_of(out)["maybe_billed"]
    assert maybe["requests"] == 3, first.stderr
    again = run_cli([*base, "--restart"], env=box.env())
    said = re.findall(
        r"--restart: discarding the journal of \S+ \(up to "
        r"\$([\d.]+) maybe billed for 3 requests with no saved reply; --max-cost counts from \$0 again\)",
        again.stderr,
    )
    assert len(said) == 1 and Decimal(said[0]) == Decimal(maybe["worst_case_usd"]), again.stderr


def test_changed_template_is_refused_then_restart(sandbox, tmp_path: Path) -> None:
    src = prompts_csv(tmp_path / "in.csv", 20)
    out = tmp_path / "out.parquet"
    base = ["run", str(src), "-o", str(out), "--rpm", "0"]
    assert run_cli([*base, "--template", "A: {prompt}"], env=sandbox.env()).exit_code == 0
    result = run_cli([*base, "--template", "B: {prompt}"], env=sandbox.env())
    assert result.exit_code == 2
    assert "template: journal has 'A: {prompt}', this run has 'B: {prompt}'" in result.stderr
    assert "--restart" in result.stderr
    paid = Decimal(summary_of(out)["cost_usd"]["total"])
    result = run_cli([*base, "--template", "B: {prompt}", "--restart"], env=sandbox.env())
    assert result.exit_code == 0, result.stderr
    # It discards what the journal's rows cost, and says so (the cap counts from $0 again).
    said = re.findall(
        r"--restart: discarding 20 answered rows of (\S+) \(\$([\d.]+) already paid", result.stderr
    )
    assert len(said) == 1 and said[0][0] == str(out) and Decimal(said[0][1]) == paid, result.stderr
    assert "--max-cost counts from $0 again)" in result.stderr
    assert (
        all(r.startswith("B: ") for r in pq.read_table(out).column("prompt").to_pylist()) is False
    )  # input unchanged
    assert sandbox.count(200) == 40
    # A long setting that differs late is shown where it differs, not by a shared beginning.
    system = "You are a careful annotator of product reviews for a consumer electronics retailer. "
    assert run_cli([*base, "--system", system + "Be brief."], env=sandbox.env()).exit_code == 2
    result = run_cli(
        [*base, "--template", "B: {prompt}", "--system", system + "Be brief.", "--restart"], env=sandbox.env()
    )
    result = run_cli(
        [*base, "--template", "B: {prompt}", "--system", system + "Be thorough."], env=sandbox.env()
    )
    assert result.exit_code == 2
    assert "...'ronics retailer. Be brief.'" in result.stderr and "retailer. Be thorough.'" in result.stderr


def test_rerun_of_a_finished_job_sends_nothing(sandbox, tmp_path: Path) -> None:
    src = prompts_csv(tmp_path / "in.csv", 30)
    out = tmp_path / "out.parquet"
    args = ["run", str(src), "-o", str(out), "--rpm", "0"]
    assert run_cli(args, env=sandbox.env()).exit_code == 0
    first = pq.read_table(out)
    assert run_cli(args, env=sandbox.env()).exit_code == 0
    assert sandbox.count() == 30
    assert pq.read_table(out).column("response").to_pylist() == first.column("response").to_pylist()


def test_errors_are_retried_only_with_retry_errors(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory()
    src = tmp_path / "in.csv"
    src.write_text("prompt\nfine\n" + "word " * 50 + "\n")
    out = tmp_path / "out.parquet"
    args = ["run", str(src), "-o", str(out), "--rpm", "0", "--max-tokens", "24960"]
    assert run_cli(args, env=box.env()).exit_code == 1
    assert Counter(pq.read_table(out).column("status").to_pylist()) == {"ok": 1, "error": 1}
    assert run_cli(args, env=box.env()).exit_code == 1
    sent = box.count()
    assert run_cli([*args, "--retry-errors"], env=box.env()).exit_code == 1
    assert box.count() == sent  # over the window: refused again before any request


def test_kill_during_output_write_leaves_previous_file(sandbox, tmp_path: Path) -> None:
    src = prompts_csv(tmp_path / "in.csv", 60_000)
    out = tmp_path / "out.parquet"
    args = ["run", str(src), "-o", str(out), "--rpm", "0", "--concurrency", "200"]
    assert run_cli(args, env=sandbox.env()).exit_code == 0
    before = out.read_bytes()
    killed = 0
    for _ in range(3):
        proc = spawn(args, env=sandbox.env())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not list(tmp_path.glob(".out.parquet.*.tmp")):
            time.sleep(0.002)
        if list(tmp_path.glob(".out.parquet.*.tmp")):
            proc.send_signal(signal.SIGKILL)
            killed += 1
        proc.communicate(timeout=60)
        assert out.read_bytes() == before
        assert pq.read_table(out).num_rows == 60_000
    assert killed >= 1


def test_status_reports_progress_and_the_resume_command(sandbox, tmp_path: Path) -> None:
    src = prompts_csv(tmp_path / "in.csv", 40)
    out = tmp_path / "out.parquet"
    stopped = run_cli(
        ["run", str(src), "-o", str(out), "--rpm", "0", "--max-cost", "0.0002"], env=sandbox.env()
    )
    assert stopped.exit_code == 3, stopped.output
    text = run_cli(["status", str(out)]).stdout
    assert "not done of 40" in text  # and the cap that finishes them, as the run said
    assert "to continue, run it with a higher --max-cost (about $" in text and "--max-cost 0.0" in text
    assert run_cli(["run", str(src), "-o", str(out), "--rpm", "0"], env=sandbox.env()).exit_code == 0
    for path in (out, tmp_path / "out.parquet.batchllm"):
        result = run_cli(["status", str(path)])
        assert result.exit_code == 0, result.stderr
        text = result.stdout
        assert "rows: 40 done (40 ok, 0 error), 0 not done of 40" in text
        assert "cost so far: $" in text and "running now: no" in text
        assert "resume with" not in text  # every row is done: nothing to resume
    # `report` takes what `status` takes: the journal folder (or its database) names its output.
    reported = run_cli(["report", str(out), "--format", "json"]).stdout
    for path in (tmp_path / "out.parquet.batchllm", tmp_path / "out.parquet.batchllm" / "journal.sqlite"):
        result = run_cli(["report", str(path), "--format", "json"])
        assert result.exit_code == 0 and result.stdout == reported, result.output
    (tmp_path / "own").mkdir()
    shutil.copy(tmp_path / "out.parquet.batchllm" / "journal.sqlite", tmp_path / "own")
    result = run_cli(["report", str(tmp_path / "own")])
    assert (
        result.exit_code == 2
        and "a batchllm journal (a --checkpoint folder); pass the output" in result.stderr
    )
    missing = run_cli(["status", str(tmp_path / "nothing.parquet")])
    assert missing.exit_code == 2 and "no batchllm journal" in missing.stderr


def test_status_and_report_of_a_run_going_on_offer_no_command_that_would_wait(
    sandbox_factory, tmp_path: Path
) -> None:
    """While a run holds the output, the same command would wait for its lock (exit 75): what
    `status` and `report` say is what the run does, not a command to run."""
    box = sandbox_factory(latency=0.5)
    src, out = prompts_csv(tmp_path / "in.csv", 400), tmp_path / "out.parquet"
    proc = spawn(["run", str(src), "-o", str(out), "--rpm", "0", "--concurrency", "4"], env=box.env())
    _wait_for_rows(tmp_path / "out.parquet.batchllm" / "journal.sqlite", 4)
    status = run_cli(["status", str(out)]).stdout
    assert "running now: pid" in status and "resume with" not in status, status
    report = run_cli(["report", str(out)]).stdout
    assert "the run writing it now writes it as it ends" in report and "run the same command" not in report
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    status = run_cli(["status", str(out)]).stdout
    assert "running now: no" in status and "resume with: batchllm run" in status, status
    assert "run the same command again to write it" in run_cli(["report", str(out)]).stdout


def test_a_second_interrupt_still_says_what_the_run_spent(sandbox_factory, tmp_path: Path) -> None:
    """Interrupted twice, a run stops at once and writes no output: its summary still says what
    it spent and what may have been billed, and `status` has the same figure."""
    box = sandbox_factory(latency=1.0)
    src, out = prompts_csv(tmp_path / "in.csv", 400), tmp_path / "out.parquet"
    proc = spawn(["run", str(src), "-o", str(out), "--rpm", "0", "--concurrency", "8"], env=box.env())
    _wait_for_rows(tmp_path / "out.parquet.batchllm" / "journal.sqlite", 8)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    spent = re.search(
        r"output not written \(stopped at once\); its journal keeps every reply: this run \$([\d.]+)", err
    )
    assert spent is not None and re.search(r"maybe billed besides: up to [1-8] requests? without", err), err
    assert not out.exists()
    assert f"cost so far: ${spent.group(1)}" in run_cli(["status", str(out)]).stdout


def test_a_sandbox_journal_is_not_resumed_by_a_real_run(sandbox, tmp_path: Path) -> None:
    src = prompts_csv(tmp_path / "in.csv", 5)
    out = tmp_path / "out.parquet"
    assert run_cli(["run", str(src), "-o", str(out), "--sandbox", "--rpm", "0"]).exit_code == 0
    result = run_cli(["run", str(src), "-o", str(out), "--rpm", "0"], env=sandbox.env())
    assert (
        result.exit_code == 2
        and "the journal was written against the sandbox; this run is a real one" in result.stderr
    )
    assert (
        run_cli(["run", str(src), "-o", str(out), "--rpm", "0", "--restart"], env=sandbox.env()).exit_code
        == 0
    )
    assert sandbox.count() == 5


def test_a_lower_max_tokens_keeps_what_was_paid_for_and_sends_the_rows_over_the_window(
    sandbox_factory, tmp_path: Path
) -> None:
    """The summary's hint for rows over the window ("a lower --max-tokens sends them"), followed
    on a journal with paid answers: they stand (no --restart, nothing paid twice), the refused row
    is sent with the new max_tokens, and the output's cost is the sandbox's bill exactly."""
    from batchllm.pricing import resolve_model

    from .conftest import write_csv

    box = sandbox_factory()
    rows = [{"id": f"r{i}", "prompt": f"Say something about the number {i}."} for i in range(20)]
    rows.append({"id": "long", "prompt": "x " * 24_850})  # fits with max_tokens 64, not 256
    src = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out.parquet"
    args = ["run", str(src), "-o", str(out), "--id-column", "id", "--rpm", "0", "--progress", "none"]
    first = run_cli(args, env=box.env())
    assert first.exit_code == 1, first.stderr
    assert "1 row over the context window with max_tokens 256, not sent: a lower --max-tokens" in first.stderr
    assert box.count() == 20
    before = {r["id"]: r["response"] for r in pq.read_table(out).to_pylist() if r["status"] == "ok"}

    again = run_cli([*args, "--max-tokens", "64"], env=box.env())
    assert again.exit_code == 0, again.stderr
    assert "max_tokens is 64, the journal's was 256: its 20 answered rows keep their replies" in again.stderr
    assert "1 row refused over the context window weighed again" in again.stderr
    assert "1 to send (20 already done)" in again.stderr
    assert box.count() == 21  # the long row alone
    table = pq.read_table(out).to_pylist()
    assert Counter(r["status"] for r in table) == {"ok": 21}
    assert {r["id"]: r["response"] for r in table if r["id"] != "long"} == before
    assert next(r for r in table if r["id"] == "long")["completion_tokens"] <= 64
    prices = resolve_model("dataoorts", "meta/llama-3.1-70b-instruct").prices
    assert prices is not None
    stats = box.sandbox.stats
    billed = stats["prompt_tokens"] * prices.input_pico + stats["completion_tokens"] * prices.output_pico
    assert billed == sum(r["input_cost_pico"] + r["output_cost_pico"] for r in _costs(out))
    # The same command again: nothing to send, nothing to warn of.
    third = run_cli([*args, "--max-tokens", "64"], env=box.env())
    assert third.exit_code == 0 and box.count() == 21
    assert "max_tokens is" not in third.stderr and "0 to send" in third.stderr


def _costs(out: Path) -> list[dict]:
    import sqlite3

    with sqlite3.connect(f"file:{out}.batchllm/journal.sqlite?mode=ro", uri=True) as conn:
        cur = conn.execute("SELECT input_cost_pico, output_cost_pico FROM rows")
        return [{"input_cost_pico": a, "output_cost_pico": b} for a, b in cur]


def test_an_output_whose_journal_is_gone_is_not_paid_for_again(sandbox_factory, tmp_path: Path) -> None:
    """The journal deleted as clutter: the same command would send every row again and write
    over the answers. It is refused, naming the output and what it holds; --restart sends them."""
    box = sandbox_factory()
    src, out = prompts_csv(tmp_path / "in.csv", 30), tmp_path / "out.parquet"
    args = ["run", str(src), "-o", str(out), "--rpm", "0", "--progress", "none"]
    assert run_cli(args, env=box.env()).exit_code == 0
    shutil.rmtree(f"{out}.batchllm")
    before, sent = out.read_bytes(), box.count()
    again = run_cli(args, env=box.env())
    assert again.exit_code == 2, again.stderr
    assert f"{out} holds 30 answered rows ($" in again.stderr and "journal" in again.stderr
    assert "--restart" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert box.count() == sent and out.read_bytes() == before
    restarted = run_cli([*args, "--restart"], env=box.env())
    assert restarted.exit_code == 0 and box.count() == sent + 30
