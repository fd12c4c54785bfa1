"""Cron-ready jobs: job files, validate, incremental runs, the lock, --max-runtime, JSON logs (issue 6)."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from .conftest import ROOT, prompts_csv, run_cli, spawn

JOBS = sorted((ROOT / "jobs").glob("*.toml"))


@pytest.mark.parametrize("job", JOBS, ids=[j.name for j in JOBS])
def test_example_jobs_run_against_the_sandbox(sandbox, tmp_path: Path, job: Path) -> None:
    out = tmp_path / "out.parquet"
    summary = tmp_path / "summary.json"
    args = ["run", "--job", str(job), "-o", str(out), "--summary-json", str(summary), "--rpm", "0"]
    result = run_cli(args, env=sandbox.env())
    assert result.exit_code == 0, result.stderr
    assert pq.read_table(out).num_rows == 200
    assert json.loads(summary.read_text())["exit_code"] == 0


def test_validate_accepts_the_examples_and_names_bad_keys(tmp_path: Path) -> None:
    result = run_cli(["validate", *map(str, JOBS)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.count("ok: ") == len(JOBS)
    cases = {
        "unknown.toml": ('colour = "blue"\n', "unknown key 'colour'"),
        "type.toml": ('max_tokens = "lots"\n', "key 'max_tokens' must be an integer"),
        "range.toml": ("temperature = 9\n", "key 'temperature' must be a number from 0 to 5"),
    }
    for name, (extra, message) in cases.items():
        path = tmp_path / name
        path.write_text(
            f'input = "{ROOT / "sample_data/reviews.csv"}"\noutput = "o.parquet"\nprompt_column = "review"\n{extra}'
        )
        result = run_cli(["validate", str(path)])
        assert result.exit_code == 2
        assert name in result.stderr and message in result.stderr, result.stderr
        run = run_cli(["run", "--job", str(path), "--sandbox"])
        assert run.exit_code == 2 and message in run.stderr


def test_validate_lists_every_problem_of_a_file(tmp_path: Path) -> None:
    path = tmp_path / "many.toml"
    path.write_text(
        f'input = "{ROOT / "sample_data/reviews.csv"}"\noutput = "o.parquet"\ntemprature = 0.5\n'
        'max_tokens = "lots"\ntop_p = 7\ncache = "sometimes"\nconcurency = 3\n'
    )
    result = run_cli(["validate", str(path)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 5, result.stderr
    text = result.stderr
    assert "unknown key 'temprature'; did you mean 'temperature'?" in text
    assert "unknown key 'concurency'; did you mean 'concurrency'?" in text
    assert "key 'max_tokens' must be an integer >= 1 (got 'lots')" in text
    assert "key 'top_p' must be a number from 0 to 2, got 7" in text
    assert "key 'cache' must be off, auto, always or a folder" in text and "'sometimes'" in text


def test_flags_override_the_job_file(sandbox, tmp_path: Path) -> None:
    job = tmp_path / "j.toml"
    src = prompts_csv(tmp_path / "in.csv", 5)
    job.write_text('input = "in.csv"\noutput = "o.parquet"\nmax_tokens = 4\n')
    assert src.exists()
    result = run_cli(["run", "--job", str(job), "--max-tokens", "3", "--rpm", "0"], env=sandbox.env())
    assert result.exit_code == 0, result.stderr
    assert pq.read_table(tmp_path / "o.parquet").column("completion_tokens").to_pylist() == [3] * 5


def test_appending_rows_sends_only_the_new_ones(sandbox, tmp_path: Path) -> None:
    src = prompts_csv(tmp_path / "in.csv", 100)
    out = tmp_path / "out.parquet"
    args = ["run", str(src), "-o", str(out), "--id-column", "id", "--rpm", "0"]
    assert run_cli(args, env=sandbox.env()).exit_code == 0
    before = sandbox.count()
    with open(src, "a") as fh:
        for i in range(100, 150):
            fh.write(f"id{i},Question number {i}: what is {i} + {i}?\n")
    assert run_cli(args, env=sandbox.env()).exit_code == 0
    assert sandbox.count() - before == 50
    table = pq.read_table(out)
    assert table.column("id").to_pylist() == [f"id{i}" for i in range(150)]
    assert Counter(table.column("status").to_pylist()) == {"ok": 150}


def test_changed_rows_rerun_only_with_refresh_changed(sandbox, tmp_path: Path) -> None:
    src = prompts_csv(tmp_path / "in.csv", 10)
    out = tmp_path / "out.parquet"
    args = ["run", str(src), "-o", str(out), "--id-column", "id", "--rpm", "0"]
    assert run_cli(args, env=sandbox.env()).exit_code == 0
    src.write_text(src.read_text().replace("Question number 3:", "Edited question 3:"))
    before = sandbox.count()
    result = run_cli(args, env=sandbox.env())
    assert result.exit_code == 0 and sandbox.count() == before
    assert "1 row changed under the same --id-column value ('id3') and kept" in result.stderr
    result = run_cli([*args, "--refresh-changed"], env=sandbox.env())
    assert result.exit_code == 0 and sandbox.count() == before + 1
    assert "10 rows in" in result.stderr and "1 to send" in result.stderr  # as many as it sends
    # The row's first answer was paid for too: the output's cost is everything billed.
    stats = sandbox.sandbox.stats
    billed = stats["prompt_tokens"] * 310_000 + stats["completion_tokens"] * 340_000
    rows = pq.read_table(out).to_pylist()
    assert sum(round(Decimal(repr(r["cost_usd"])) * 10**12) for r in rows) == billed
    edited = next(r for r in rows if r["id"] == "id3")
    assert edited["prompt_tokens"] >= 2 * min(r["prompt_tokens"] for r in rows)  # two answers paid


def _pico(usd: str) -> int:
    return int(Decimal(usd) * 10**12)


def test_rows_that_leave_the_input_stay_paid_for_and_are_not_done_rows(sandbox, tmp_path: Path) -> None:
    """A nightly input that drops old rows, and a row edited with no --id-column: the journal keeps
    what they cost. The header counts only the input's rows as done; the summary, report and
    status name what the output's rows do not hold, and every figure adds up to the bill."""
    src, out = tmp_path / "in.csv", tmp_path / "out.parquet"
    args = ["run", str(src), "-o", str(out), "--id-column", "id", "--rpm", "0"]
    prompts_csv(src, 100)
    assert run_cli(args, env=sandbox.env()).exit_code == 0
    prompts_csv(src, 100, start=30)  # the next night's file: 30 rows gone, 30 new
    result = run_cli(args, env=sandbox.env())
    assert result.exit_code == 0, result.stderr
    assert "100 rows in" in result.stderr and "30 to send (70 already done)" in result.stderr
    assert sandbox.count() == 130
    stats = sandbox.sandbox.stats
    billed = stats["prompt_tokens"] * 310_000 + stats["completion_tokens"] * 340_000
    rows = pq.read_table(out).to_pylist()
    in_output = sum(round(Decimal(repr(r["cost_usd"])) * 10**12) for r in rows)
    report = json.loads(run_cli(["report", str(out), "--format", "json"]).stdout)
    gone = report["outside_input"]
    assert gone["rows"] == 30 and in_output + _pico(gone["cost_usd"]) == billed
    assert _pico(gone["paid_in_all_usd"]) == billed and _pico(report["overall"]["cost_usd"]) == in_output
    text = run_cli(["report", str(out)]).stdout
    assert f"also paid: ${gone['cost_usd']} for 30 rows no longer in the input" in text
    csv_text = run_cli(["report", str(out), "--format", "csv"]).stdout
    lines = {r["group"]: r for r in __import__("csv").DictReader(csv_text.splitlines())}
    outside = lines["(no longer in the input)"]
    assert (outside["rows"], outside["ok"], outside["invalid"]) == ("30", "", "")
    assert outside["prompt_tokens"] == str(gone["prompt_tokens"]) and outside["cost_usd"] == gone["cost_usd"]
    assert lines["(all)"]["invalid"] == "0"
    page = tmp_path / "report.html"
    assert run_cli(["report", str(out), "--html", str(page)]).exit_code == 0
    assert f"also paid: ${gone['cost_usd']} for 30 rows no longer in the input" in page.read_text()
    status = run_cli(["status", str(out)]).stdout
    assert (
        "rows: 130 done (130 ok, 0 error): 100 of the input's 100 rows, 0 not done, and 30 no longer"
        in status
    )
    assert f"cost so far: ${gone['paid_in_all_usd']}" in status
    again = run_cli(args, env=sandbox.env())  # the same file: counted without a pass
    assert "0 to send (100 already done)" in again.stderr and sandbox.count() == 130
    assert f"also paid: ${gone['cost_usd']} for 30 rows no longer in the input" in again.stderr

    # No --id-column: a row's id is its content, so an edited row is a new row, the old one gone.
    plain = ["run", str(src), "-o", str(tmp_path / "plain.parquet"), "--rpm", "0"]
    prompts_csv(src, 12)
    assert run_cli(plain, env=sandbox.env()).exit_code == 0
    src.write_text(src.read_text().replace("Question number 3:", "Edited question 3:"))
    with open(src, "a") as fh:
        fh.write("id12,Question number 12: what is 12 + 12?\n")
    result = run_cli(plain, env=sandbox.env())
    assert "13 rows in" in result.stderr and "2 to send (11 already done)" in result.stderr
    assert "for 1 row no longer in the input" in result.stderr


def test_one_run_at_a_time_and_stale_lock_takeover(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(latency=0.5)
    src = prompts_csv(tmp_path / "in.csv", 400)
    out = tmp_path / "out.parquet"
    args = ["run", str(src), "-o", str(out), "--rpm", "0", "--concurrency", "10"]
    first = spawn(args, env=box.env())
    lock = tmp_path / "out.parquet.batchllm" / "lock"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (lock.exists() and lock.read_text()):
        time.sleep(0.05)
    started = time.monotonic()
    second = spawn(args, env=box.env())
    _, err = second.communicate(timeout=10)
    assert second.returncode == 75, err
    assert time.monotonic() - started < 3  # exits at once (interpreter start included)
    assert f"pid {first.pid}" in err
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=10)
    third = spawn(args, env=box.env())
    _, err = third.communicate(timeout=120)
    assert third.returncode == 0, err
    assert "took over the lock" in err


def test_max_runtime_exits_75_and_the_next_run_finishes(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(latency=1.0)
    src = prompts_csv(tmp_path / "in.csv", 300)
    out = tmp_path / "out.parquet"
    args = ["run", str(src), "-o", str(out), "--rpm", "0", "--concurrency", "20", "--grace", "3"]
    started = time.monotonic()
    result = run_cli([*args, "--max-runtime", "5s"], env=box.env())
    assert result.exit_code == 75
    assert time.monotonic() - started < 5 + 3 + 3
    statuses = Counter(pq.read_table(out).column("status").to_pylist())
    assert statuses["pending"] > 0 and statuses["ok"] > 0
    result = run_cli([*args, "--concurrency", "300"], env=box.env())
    assert result.exit_code == 0, result.stderr
    assert Counter(pq.read_table(out).column("status").to_pylist()) == {"ok": 300}


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--log-format", "json", "--no-such-flag"], "--no-such-flag"),
        (["--concurrency", "many", "--log-format=json"], "'--concurrency'"),
        (["--log-format", "json", "--job", "missing.toml"], "missing.toml"),
    ],
)
def test_json_logs_cover_a_command_line_that_cannot_be_read(
    tmp_path: Path, flags: list[str], named: str
) -> None:
    """A scheduler that asked for JSON logs gets JSON even when click refuses the line."""
    src = prompts_csv(tmp_path / "in.csv", 3)
    proc = spawn(["run", str(src), "-o", str(tmp_path / "out.parquet"), *flags], cwd=tmp_path)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2, stderr
    events = [json.loads(line) for line in stderr.splitlines()]
    assert len(events) == 1 and events[0]["event"] == "error" and named in events[0]["message"], stderr
    assert not (tmp_path / "out.parquet").exists()


def test_json_logs_and_the_key_never_appears(sandbox_factory, tmp_path: Path) -> None:
    key = "sk-DISTINCTIVE-7f3a9c2e1b"
    box = sandbox_factory(api_key=key)
    src = prompts_csv(tmp_path / "in.csv", 50)
    out = tmp_path / "out.parquet"
    summary = tmp_path / "summary.json"
    args = [
        "run",
        str(src),
        "-o",
        str(out),
        "--log-format",
        "json",
        "--summary-json",
        str(summary),
        "--rpm",
        "0",
    ]
    proc = spawn(args, env=box.env())
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    events = [json.loads(line) for line in stderr.splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "summary"
    assert events[-1]["exit_code"] == 0 and events[-1]["rows"]["ok"] == 50
    assert json.loads(summary.read_text())["cost_usd"] == events[-1]["cost_usd"]
    # A wrong key: the error is JSON too, and neither key is printed.
    wrong_args = [a if a != str(out) else str(tmp_path / "out2.parquet") for a in args]
    wrong = spawn(wrong_args, env={**box.env(), "DATAOORTS_API_KEY": "sk-WRONG-0000"})
    _, err2 = wrong.communicate(timeout=60)
    assert wrong.returncode == 4
    wrong_events = [json.loads(line) for line in err2.splitlines()]
    assert any(e["event"] == "error" and "DATAOORTS_API_KEY" in e["message"] for e in wrong_events)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written
    for path in written:
        data = path.read_bytes()
        assert key.encode() not in data and b"sk-WRONG-0000" not in data, path
    for text in (stdout, stderr, err2):
        assert key not in text and "sk-WRONG-0000" not in text


def test_validate_writes_nothing_anywhere(tmp_path: Path) -> None:
    """validate checks a job without running it: no output folder, journal, checkpoint, summary,
    cache or ledger appears, however many of them the job file points into missing folders."""
    src = tmp_path / "in.csv"
    src.write_text("id,text\n1,good\n2,bad\n")
    job = tmp_path / "job.toml"
    job.write_text(
        'input = "in.csv"\noutput = "new/deeper/o.parquet"\ntemplate = "Classify: {text}"\n'
        'checkpoint = "ck/journal"\nsummary_json = "sj/s.json"\ncache = "cachedir/x"\n'
        'labels = "good,bad"\npack = 2\nmax_cost = 1\nmax_cost_per_month = 5\n'
    )
    data, cache = tmp_path / "xdg-data", tmp_path / "xdg-cache"
    before = sorted(tmp_path.rglob("*"))
    result = run_cli(["validate", str(job)], env={"XDG_DATA_HOME": str(data), "XDG_CACHE_HOME": str(cache)})
    assert result.exit_code == 0 and result.output.startswith(f"ok: {job}"), result.output
    assert sorted(tmp_path.rglob("*")) == before


def test_the_encoding_key_and_the_output_folder_are_checked_by_validate(sandbox, tmp_path: Path) -> None:
    src = tmp_path / "latin.csv"
    src.write_bytes("prompt\nsay café\nsay thé\n".encode("latin-1"))
    job = tmp_path / "latin.toml"
    job.write_text('input = "latin.csv"\noutput = "out/latin.parquet"\n')
    result = run_cli(["validate", str(job)])
    assert result.exit_code == 2
    assert f"{src}: line 2 is not UTF-8 text (byte 0xe9)" in result.stderr
    assert "--encoding latin-1 (job key: encoding)" in result.stderr
    job.write_text('input = "latin.csv"\noutput = "out/latin.parquet"\nencoding = "klingon"\n')
    result = run_cli(["validate", str(job)])
    assert result.exit_code == 2 and "key 'encoding' must be a text encoding" in result.stderr
    job.write_text(
        'input = "latin.csv"\noutput = "/batchllm-no-such-folder/latin.parquet"\nencoding = "latin-1"\n'
    )
    result = run_cli(["validate", str(job)])
    assert result.exit_code == 2 and "there is no folder /batchllm-no-such-folder" in result.stderr
    job.write_text('input = "latin.csv"\noutput = "out/latin.parquet"\nencoding = "latin-1"\n')
    assert run_cli(["validate", str(job)]).exit_code == 0
    assert not (tmp_path / "out").exists()  # validate makes nothing
    result = run_cli(["run", "--job", str(job), "--rpm", "0"], env=sandbox.env())
    assert result.exit_code == 0, result.stderr
    assert "made the folder" in result.stderr
    table = pq.read_table(tmp_path / "out" / "latin.parquet")
    assert table.column("prompt").to_pylist() == ["say café", "say thé"]


def test_validate_reads_a_job_files_fleet_from_its_folder_as_run_does(tmp_path: Path) -> None:
    """`fleet = "f.toml"` in a job file is the file beside it, for validate as for run (validate
    looked for it in the shell's folder and said it was not there)."""
    folder = tmp_path / "nightly"
    folder.mkdir()
    (folder / "f.toml").write_text((ROOT / "jobs" / "fleets" / "three_endpoints.toml").read_text())
    job = folder / "job.toml"
    job.write_text(
        f'input = "{ROOT / "sample_data" / "reviews.csv"}"\noutput = "o.parquet"\n'
        'template = "Classify: {review}"\nfleet = "f.toml"\n'
    )
    result = run_cli(["validate", str(job)])
    assert result.exit_code == 0 and "fleet: dataoorts" in result.output, result.output
