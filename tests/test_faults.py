"""Rate limiting and fault tolerance end to end against the sandbox (issue 3)."""

from __future__ import annotations

import bisect
import dataclasses
import socket
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchllm.sandbox.replies import served_models

from .conftest import prompts_csv, run_cli, spawn, summary_of, write_csv

LIMIT = 20  # requests/s enforced by the sandbox


def _rate_figures(log: list[tuple[float, int, str]]) -> tuple[float, float, float, int]:
    """(share of 429s, achieved ok rate / limit over the whole run, the same from 2 s after the
    first 429 on, most requests in any 1 s window of the first 5 s)."""
    t0 = log[0][0]
    times = [t - t0 for t, _, _ in log]
    ok = [t - t0 for t, status, _ in log if status == 200]
    throttles = [t - t0 for t, status, _ in log if status == 429]
    achieved = len(ok) / ok[-1] / LIMIT
    # Steady state: past the limit's discovery (``--rpm auto``: its first 429 and that pause).
    later = [t for t in ok if t >= (throttles[0] + 2.0 if throttles else 0.0)]
    steady = (len(later) - 1) / (later[-1] - later[0]) / LIMIT
    first = max(bisect.bisect_left(times, a + 1.0) - i for i, a in enumerate(times) if a < 4.0)
    return len(throttles) / len(log), achieved, steady, first


# ``--rpm auto`` starts at the documented 300/min and takes ~6 s to find the sandbox's 1,200/min
# (ratelimit.py), about 4 s of a 30 s run: its whole-run figure is lower by design, and its
# steady state is what a long nightly run gets. Measured on 2 idle cores: 0.88 whole run, 0.97
# steady; each stray 429 from timing jitter (a loaded CI machine) costs ~1.5 s more.
@pytest.mark.parametrize(
    ("rpm", "max_429", "min_rate", "min_steady"),
    [("1200", 0.01, 0.95, 0.95), ("auto", 0.05, 0.78, 0.88)],
)
def test_rate_limit_is_held(
    sandbox_factory, tmp_path: Path, rpm: str, max_429: float, min_rate: float, min_steady: float
) -> None:
    box = sandbox_factory(rate_limit=LIMIT)
    src = prompts_csv(tmp_path / "in.csv", 600)
    out = tmp_path / "out.parquet"
    result = run_cli(["run", str(src), "-o", str(out), "--rpm", rpm], env=box.env())
    assert result.exit_code == 0, result.stderr
    assert Counter(pq.read_table(out).column("status").to_pylist()) == {"ok": 600}
    share_429, achieved, steady, first_window = _rate_figures(box.log())
    assert share_429 <= max_429
    assert achieved >= min_rate, f"achieved {achieved:.1%} of the limit"
    assert steady >= min_steady, f"achieved {steady:.1%} of the limit once it was found"
    assert first_window <= LIMIT + 1  # +1: the sandbox's burst tolerance of one request


def test_faults_lose_no_row(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(
        fail_5xx=0.05, fail_drop=0.01, fail_hang=0.01, fail_garbled=0.01, fail_3040=0.02, seed=3
    )
    src = prompts_csv(tmp_path / "in.csv", 2000)
    out = tmp_path / "out.parquet"
    result = run_cli(
        ["run", str(src), "-o", str(out), "--timeout", "5", "--rpm", "0", "--concurrency", "64"],
        env=box.env(),
    )
    assert result.exit_code == 0, result.stderr
    table = pq.read_table(out)
    ids = table.column("id").to_pylist()
    assert ids == [f"id{i}" for i in range(2000)]  # none missing, none duplicated, in order
    assert Counter(table.column("status").to_pylist()) == {"ok": 2000}
    stats = box.sandbox.stats
    assert stats["500"] + stats["503"] > 0 and stats["429"] > 0 and stats["0"] > 0  # faults did happen
    assert max(table.column("attempts").to_pylist()) > 1


def test_rejected_rows_are_recorded_and_the_run_completes(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory()
    rows = [{"prompt": f"fine {i}"} for i in range(20)]
    rows[5]["prompt"] = "y" * 140_000  # over the API's 131,072 characters: refused before sending
    rows[9]["prompt"] = "word " * 26_000  # over the 25,000-token window alone: refused before sending
    rows[12]["prompt"] = "word " * 24_950  # over it with max_tokens 256, under it alone
    src = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out.parquet"
    result = run_cli(["run", str(src), "-o", str(out), "--rpm", "0"], env=box.env())
    assert result.exit_code == 1
    table = pq.read_table(out).to_pylist()
    assert [r["status"] for r in table].count("ok") == 17
    assert "PromptTooLong" in table[5]["error"]
    assert (
        "ContextWindowExceeded" in table[9]["error"]
        and "25,000 alone: no max_tokens makes room" in table[9]["error"]
    )
    assert "+ max_tokens 256 = " in table[12]["error"]
    assert "2 rows over the context window with max_tokens 256" in result.output
    assert "a lower --max-tokens sends those whose prompt alone fits" in result.output
    assert box.count() == 17
    # The row that fits alone is sent at a lower --max-tokens; the one over the window alone never.
    again = run_cli(["run", str(src), "-o", str(out), "--rpm", "0", "--max-tokens", "8"], env=box.env())
    table = pq.read_table(out).to_pylist()
    assert table[12]["status"] == "ok" and table[9]["status"] == "error", again.output
    assert box.count() == 18
    # Left: one row over the window alone, for which no --max-tokens is advised.
    assert (
        "1 row over the context window with max_tokens 8, not sent: each prompt alone is over it"
        in again.output
    )
    assert "a lower --max-tokens" not in again.output


def test_api_rejections_are_recorded_with_the_api_message(sandbox_factory, tmp_path: Path) -> None:
    """400 and 413 from the API itself (the client's own checks bypassed by a model the sandbox
    windows smaller than the price table says) land on their rows with the API's message."""
    from batchllm.pricing import Model

    box = sandbox_factory()
    small = dict(box.sandbox.models)
    big = small["meta/llama-3.1-70b-instruct"]
    small[big.name] = Model(big.name, big.provider, big.prices, 300)
    box.sandbox.models = small
    rows = [{"prompt": "short"}, {"prompt": "word " * 200}, {"prompt": "ok again"}]
    src = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out.parquet"
    result = run_cli(["run", str(src), "-o", str(out), "--rpm", "0", "--max-tokens", "150"], env=box.env())
    assert result.exit_code == 1
    table = pq.read_table(out).to_pylist()
    assert [r["status"] for r in table] == ["ok", "error", "ok"]
    error = table[1]["error"]
    assert error.startswith("FatalAPIError HTTP 413 code 5021: AiError: Ai: The estimated number of input")
    assert table[1]["attempts"] == 1


def test_wrong_key_stops_the_run(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory()
    src = prompts_csv(tmp_path / "in.csv", 500)
    out = tmp_path / "out.parquet"
    env = {**box.env(), "DATAOORTS_API_KEY": "wrong-key-123456"}
    result = run_cli(["run", str(src), "-o", str(out), "--rpm", "0", "--concurrency", "8"], env=env)
    assert result.exit_code == 4
    assert box.count() <= 8
    assert "DATAOORTS_API_KEY" in result.stderr
    assert "wrong-key-123456" not in result.stderr
    # What the server said, in a person's words: no class name of batchllm's own.
    assert "the API rejected the key (HTTP 40" in result.stderr and "Error HTTP" not in result.stderr
    statuses = Counter(pq.read_table(out).column("status").to_pylist())
    assert statuses == {"pending": 500}  # nothing recorded as failed: the rows were never really tried
    # Fixed key: the run resumes and completes.
    assert run_cli(["run", str(src), "-o", str(out), "--rpm", "0"], env=box.env()).exit_code == 0


def test_quota_stops_the_run_and_resumes(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(quota=50)
    src = prompts_csv(tmp_path / "in.csv", 200)
    out = tmp_path / "out.parquet"
    args = ["run", str(src), "-o", str(out), "--rpm", "0", "--concurrency", "4"]
    result = run_cli(args, env=box.env())
    assert result.exit_code == 4
    assert "quota" in result.stderr.lower() or "allocation" in result.stderr
    statuses = Counter(pq.read_table(out).column("status").to_pylist())
    assert statuses["ok"] == 50 and statuses["error"] == 0
    box.sandbox.config.quota = 0
    assert run_cli(args, env=box.env()).exit_code == 0


def _small_window(box, window: int) -> None:
    """The server's window is smaller than the model table says: every request is refused."""
    box.sandbox.models = {
        n: dataclasses.replace(m, context_window=window) for n, m in box.sandbox.models.items()
    }


def test_too_many_errors_stop_the_run(sandbox_factory, tmp_path: Path) -> None:
    # Every request a 500 or 503, and one attempt a row: rows failing, but not with a client error.
    box = sandbox_factory(fail_5xx=1.0)
    src = prompts_csv(tmp_path / "in.csv", 400)
    out = tmp_path / "out.parquet"
    args = ["run", str(src), "-o", str(out), "--rpm", "0", "--concurrency", "4", "--max-attempts", "1"]
    result = run_cli(args, env=box.env())
    assert result.exit_code == 4
    assert "too many errors" in result.stderr
    assert box.count() < 150


def test_an_unknown_model_stops_at_once_naming_it(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory()
    src = prompts_csv(tmp_path / "in.csv", 400)
    out = tmp_path / "out.parquet"
    args = ["run", str(src), "-o", str(out), "--provider", "openai", "--model", "no-such-model", "--rpm", "0"]
    result = run_cli([*args, "--concurrency", "8"], env=box.openai_env())
    assert result.exit_code == 4
    assert "no-such-model" in result.stderr and "does not serve the model" in result.stderr
    assert "run the same command again" not in result.stderr
    assert "cost: unknown (no price" in result.stderr  # not "$0.00": the model has no price
    assert 1 <= box.count() <= 8  # at most what was in flight when the first answer came
    assert Counter(pq.read_table(out).column("status").to_pylist()) == {"pending": 400}


def test_the_first_rows_failing_alike_stop_the_run(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory()
    # Prompts of one length: the OpenAI face's window message is then the same for every row.
    src = write_csv(tmp_path / "in.csv", [{"prompt": f"Question {c}"} for c in "ABCDEFGHIJKLMNOPQRST" * 10])
    out = tmp_path / "out.parquet"
    _small_window(box, 16)  # a prompt's 13 tokens fit; with max_tokens they do not
    args = ["run", str(src), "-o", str(out), "--provider", "openai", "--rpm", "0", "--concurrency", "2"]
    result = run_cli(args, env=box.openai_env())
    assert result.exit_code == 4
    assert "each of the first 5 rows failed with the same error" in result.stderr
    assert "maximum context length" in result.stderr
    assert box.count() <= 5 + 2
    # Refused alike and not billed: those rows are pending, not failed, for the run after the fix.
    assert "the server billed none of it: those rows are pending" in result.stderr
    assert Counter(pq.read_table(out).column("status").to_pylist()) == {"pending": 200}
    # The fix is a setting: nothing was paid for, so the new settings simply stand.
    before = box.count()
    again = run_cli([*args, "--max-tokens", "3"], env=box.openai_env())
    assert again.exit_code == 0, again.stderr
    assert "--restart" not in again.stderr
    assert Counter(pq.read_table(out).column("status").to_pylist()) == {"ok": 200}
    assert box.count() - before == 20  # each of the 20 prompts once, with the new setting
    # A journal with answers is never discarded so: another setting is refused.
    refused = run_cli([*args, "--max-tokens", "3", "--temperature", "0.5"], env=box.openai_env())
    assert refused.exit_code == 2 and "run with --restart to discard it" in refused.stderr


@pytest.mark.parametrize("provider", ["openai", "dataoorts"])
def test_the_first_rows_failing_alike_but_for_their_numbers_stop_the_run(
    sandbox_factory, tmp_path: Path, provider: str
) -> None:
    """Rows over the server's window fail with its message naming each request's token count
    (OpenAI's and llama.cpp's "you requested N tokens"; Dataoorts' also a request id): the same
    error, its numbers aside, so the first rows stop the run (exit 4), the others left pending."""
    box = sandbox_factory()
    src = write_csv(
        tmp_path / "in.csv", [{"prompt": f"Question {i}" + " more" * (i % 50)} for i in range(200)]
    )
    out = tmp_path / "out.parquet"
    _small_window(box, 8)
    args = ["run", str(src), "-o", str(out), "--provider", provider, "--rpm", "0", "--concurrency", "2"]
    result = run_cli(args, env=box.openai_env() if provider == "openai" else box.env())
    assert result.exit_code == 4, result.stderr
    stopped = next(line for line in result.stderr.splitlines() if line.startswith("stopped: "))
    assert "each of the first 5 rows failed with the same error but for its numbers (the first: " in stopped
    assert ("maximum context length" if provider == "openai" else "context window limit") in stopped
    assert box.count() <= 5 + 2
    statuses = Counter(pq.read_table(out).column("status").to_pylist())
    assert statuses == {"pending": 200}  # refused, not billed: sent by the run after the fix
    box.sandbox.models = served_models()  # the server's window mended: the same command finishes
    again = run_cli(args, env=box.openai_env() if provider == "openai" else box.env())
    assert again.exit_code == 0, again.stderr
    assert Counter(pq.read_table(out).column("status").to_pylist()) == {"ok": 200}


@pytest.mark.parametrize("pace", [[], ["--rpm", "0"]], ids=["paced", "unpaced"])
def test_an_endpoint_that_refuses_connections_stops_the_run_saying_so(
    tmp_path: Path, pace: list[str]
) -> None:
    """Nothing listens at the endpoint: no connection for 30 s stops the run (exit 4) within a
    minute, naming the address and the reason in words; nothing was sent, so nothing may have
    been billed. (Paced at the provider's documented rate, its refused retries once ran 150 s
    until the error rate stopped it, never saying why.)"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections to it are refused
    src, out = prompts_csv(tmp_path / "in.csv", 200), tmp_path / "out.parquet"
    env = {"DATAOORTS_ENDPOINT": f"http://127.0.0.1:{port}/api/v1", "DATAOORTS_API_KEY": "k"}
    started = time.monotonic()
    proc = spawn(["run", str(src), "-o", str(out), "--progress", "none", *pace], env=env)
    _, err = proc.communicate(timeout=200)
    took = time.monotonic() - started
    assert proc.returncode == 4, err
    assert took < 60, (took, err)
    stopped = next(line for line in err.splitlines() if line.startswith("stopped: "))
    assert stopped.startswith(f"stopped: cannot connect to 127.0.0.1:{port}: connection refused"), stopped
    assert "ssl:default" not in err and "maybe billed" not in err, err
    assert "this run: 0 requests, 0 retries" in err, err  # none connected: no request was made
    # Unpaced, a row's attempts end long before the 30 s: still the endpoint's fault, not the rows'.
    assert Counter(pq.read_table(out).column("status").to_pylist()) == {"pending": 200}
    assert "n/a (no row answered)" in run_cli(["report", str(out)]).stdout  # not "p50 0.0 ms"


def test_rows_refused_before_sending_give_way_to_a_fixed_setting(tmp_path: Path) -> None:
    """Every row over the window with this --max-tokens, refused before sending: the journal paid
    for nothing, so a lower --max-tokens sends them, saying what it discarded (no --restart)."""
    src = write_csv(tmp_path / "in.csv", [{"prompt": "hello there"}, {"prompt": "how are you"}])
    out = tmp_path / "out.parquet"
    args = ["run", str(src), "-o", str(out), "--sandbox", "--progress", "none"]
    first = run_cli([*args, "--max-tokens", "24999"])
    assert first.exit_code == 1 and "2 rows failed" in first.stderr
    assert (
        "2 rows over the context window with max_tokens 24,999, not sent: a lower --max-tokens"
        in first.stderr
    )
    assert summary_of(out)["rows"]["over_window"] == 2
    assert "--retry-errors" not in run_cli(["status", str(out)]).stdout  # would fail alike
    again = run_cli([*args, "--max-tokens", "100"])
    assert again.exit_code == 0, again.stderr
    assert f"discarded the 2 failed rows of {out}.batchllm written with other settings" in again.stderr
    assert "max_tokens: journal has 24999, this run has 100" in again.stderr
    assert Counter(pq.read_table(out).column("status").to_pylist()) == {"ok": 2}


@pytest.mark.parametrize(
    "job",
    [[], ["--labels", "yes,no"], ["--labels", "yes,no", "--pack", "5"]],
    ids=["plain", "labels", "packs"],
)
def test_rows_the_server_failed_are_sent_again_by_the_same_command(
    sandbox_factory, tmp_path: Path, job: list[str]
) -> None:
    """A night of 5xx leaves rows failed for the server's reasons; once it is mended, the same
    command (no --retry-errors) sends them and finishes, exit 0, the bill the rows' cost. It sent
    nothing and exited 1 every night after."""
    box = sandbox_factory(fail_5xx=1.0)
    src = prompts_csv(tmp_path / "in.csv", 200)
    out = tmp_path / "out.parquet"
    args = ["run", str(src), "-o", str(out), "--rpm", "0", "--concurrency", "4", "--max-attempts", "1", *job]
    first = run_cli(args, env=box.env())
    assert first.exit_code == 4, first.stderr
    statuses = Counter(pq.read_table(out).column("status").to_pylist())
    failed = statuses["error"]
    assert failed > 0, statuses
    status = run_cli(["status", str(out)]).stdout
    assert "--retry-errors" not in status, status
    box.sandbox.config = dataclasses.replace(box.sandbox.config, fail_5xx=0.0)
    before = box.count()
    again = run_cli(args, env=box.env())
    assert again.exit_code == 0, again.stderr
    assert Counter(pq.read_table(out).column("status").to_pylist()) == {"ok": 200}
    if not job:  # one request a row (a label may be re-asked; a pack answers five)
        assert box.count() - before == 200 - statuses["ok"]
    assert summary_of(out)["rows"]["transient"] == 0
    stats = box.sandbox.stats
    billed = stats["prompt_tokens"] * 310_000 + stats["completion_tokens"] * 340_000
    costs = pq.read_table(out).column("cost_usd").to_pylist()
    assert sum(round(Decimal(repr(c)) * 10**12) for c in costs) == billed


def test_a_server_that_takes_connections_and_never_answers_stops_the_run(
    sandbox_factory, tmp_path: Path
) -> None:
    """Every request hangs until --timeout: after 30 s with no answer the run stops, exit 4, its
    rows pending and the requests given up on counted as maybe billed. It went on for as long
    as its rows had attempts (hours at the default --timeout), and the next night's run found it
    still holding the lock."""
    box = sandbox_factory(fail_hang=1.0)
    src = prompts_csv(tmp_path / "in.csv", 300)
    out = tmp_path / "out.parquet"
    started = time.monotonic()
    result = run_cli(["run", str(src), "-o", str(out), "--timeout", "3", "--rpm", "0"], env=box.env())
    took = time.monotonic() - started
    assert result.exit_code == 4, result.stderr
    assert "the server has answered nothing for 3" in result.stderr and took < 60
    assert Counter(pq.read_table(out).column("status").to_pylist()) == {"pending": 300}
    assert summary_of(out)["maybe_billed"]["requests"] > 0


def test_a_rerun_counts_the_servers_failures_as_rows_to_send(sandbox_factory, tmp_path: Path) -> None:
    """Rows the server failed (5xx, --max-attempts 1) are sent again by the next run, without
    --retry-errors: its header counted them as done ("0 to send (40 already done)", then sent 10)."""
    src = prompts_csv(tmp_path / "in.csv", 40)
    out = tmp_path / "out.parquet"
    args = ["run", str(src), "-o", str(out), "--rpm", "0", "--max-attempts", "1"]
    flaky = sandbox_factory(fail_5xx=0.3, seed=5)
    assert run_cli(args, env=flaky.env()).exit_code == 1
    failed = Counter(pq.read_table(out).column("status").to_pylist())["error"]
    assert failed > 0
    good = sandbox_factory()
    again = run_cli(args, env=good.env())
    assert again.exit_code == 0, again.output
    assert f"{failed} to send ({40 - failed} already done)" in again.output, again.output
    assert good.count() == failed
