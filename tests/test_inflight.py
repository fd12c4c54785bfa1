"""Requests the client gave up on (engine/inflight.py): a request that timed out may still have
been computed and billed, so every path counts it in what may have been billed.

The sandbox answers some requests slower than ``--timeout``: it goes on computing and bills them
after the client has left, as a real server does. After each run, what it billed is exactly the
rows' cost plus what the timed-out requests cost, and the summary, ``status`` and ``report``
count as maybe billed exactly the requests the sandbox answered that no row holds, with a worst
case at least what they cost.
"""

from __future__ import annotations

import re
import socket
import time
from decimal import Decimal
from pathlib import Path

import orjson
import pyarrow.parquet as pq

from batchllm.pricing import PICO_PER_USD, resolve_model

from .conftest import prompts_csv, run_cli, summary_of

PRICES = resolve_model("dataoorts", "meta/llama-3.1-70b-instruct").prices
assert PRICES is not None
PRICED = (PRICES.input_pico, PRICES.output_pico, PRICES.cached_input_pico)
SLOW = {"latency": 1.0, "jitter": 0.6, "seed": 3, "prices": PRICED}  # 0.4 to 1.6 s
TIMEOUT = ["--timeout", "1", "--max-attempts", "4", "--rpm", "0", "--cache", "off", "--progress", "none"]


def _pico(text: str | None) -> int:
    return int(Decimal(text or "0") * PICO_PER_USD)


def _settled(*boxes) -> None:
    """Wait until the sandboxes have finished what the client gave up on (answered, billed)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(
        b.sandbox.stats["requests"] < b.sandbox._arrived for b in boxes
    ):
        time.sleep(0.05)


def _ledger_runs(out: Path) -> list[dict]:
    result = run_cli(["spend", "--runs", "--format", "json"])
    assert result.exit_code == 0, result.output
    return [r for r in orjson.loads(result.output)["runs"] if r["output"] == str(out)]


def check_gave_up(out: Path, *boxes) -> dict:
    """After the runs that wrote ``out``: the requests the sandboxes answered after the client had
    left (and those that never reached them) are exactly those the summary, ``report``,
    ``status`` and the ledger count as maybe billed, and the bill is the rows' cost plus what
    those cost (at most their worst case)."""
    _settled(*boxes)
    rows = pq.read_table(out).to_pylist()
    rows_pico = sum(
        round(Decimal(repr(r["cost_usd"])) * PICO_PER_USD) for r in rows if r["cost_usd"] is not None
    )
    billed = sum(b.sandbox.stats["billed_pico"] for b in boxes)
    unheard = sum(b.sandbox.stats["unheard"] for b in boxes)
    summary = orjson.loads((out / "_batchllm_summary.json").read_bytes()) if out.is_dir() else summary_of(out)
    maybe = summary.get("maybe_billed") or {}
    report = orjson.loads(run_cli(["report", str(out), "--format", "json"]).output)
    status = run_cli(["status", str(out)]).output
    said = re.search(r"up to (\d+) requests?, at most \$([0-9.]+), may have been billed", status)
    runs = _ledger_runs(out)
    where = f"billed {billed}, rows {rows_pico}, answered unheard {unheard}, summary {maybe}, status {said}"
    # Given up on before it reached the server (a machine too loaded to send it within --timeout):
    # counted too, though the server cannot have billed it.
    never_arrived = sum(r["requests"] for r in runs) - sum(b.sandbox.stats["requests"] for b in boxes)
    where += f", sent but never arrived {never_arrived}"
    assert unheard > 0, where  # the sandbox was slower than --timeout
    # Every request answered after the client left is counted; so may be one whose answer left
    # the server as the client gave up (the server saw it heard, the client never read it): on a
    # loaded machine a few cross so. The bill stays within what is counted (below).
    assert never_arrived >= 0 and maybe.get("requests", 0) >= unheard + never_arrived, where
    assert report.get("maybe_billed") == maybe, where
    assert said is not None and int(said.group(1)) == maybe["requests"], where
    worst = _pico(maybe["worst_case_usd"])
    assert _pico(said.group(2)) == worst, where
    assert 0 < billed - rows_pico <= worst, where
    assert sum(_pico(r["cost_usd"]) for r in runs) == rows_pico, f"{where}, ledger {runs}"
    assert sum(_pico(r.get("maybe_billed_usd")) for r in runs) == worst, f"{where}, ledger {runs}"
    listed = run_cli(["spend", "--runs"]).stdout  # the text says it too, beside each run's cost
    assert listed.count("maybe billed)") == sum(1 for r in runs if r.get("maybe_billed_usd")), listed
    return maybe


def _run(src: Path, out: Path, env: dict[str, str], *extra: str) -> None:
    result = run_cli(["run", str(src), "-o", str(out), *TIMEOUT, *extra], env=env)
    assert result.exit_code in (0, 1), result.output


def test_a_timed_out_request_is_maybe_billed_and_kept_when_its_row_is_sent_again(
    sandbox_factory, tmp_path: Path
) -> None:
    """Rows time out, are sent again in the run (some fail for good), then again with
    ``--retry-errors`` against a server now fast: every request given up on stays counted."""
    box = sandbox_factory(**SLOW)
    src, out = prompts_csv(tmp_path / "in.csv", 24), tmp_path / "out.parquet"
    _run(src, out, box.env(), "--max-attempts", "2")
    first = check_gave_up(out, box)
    assert any(r["status"] == "error" for r in pq.read_table(out).to_pylist())  # some gave up for good
    box.config.latency = 0.05
    _run(src, out, box.env(), "--retry-errors")
    assert {r["status"] for r in pq.read_table(out).to_pylist()} == {"ok"}
    assert check_gave_up(out, box) == first


def test_a_timed_out_pack_is_maybe_billed(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(**SLOW)
    src, out = prompts_csv(tmp_path / "in.csv", 40), tmp_path / "out.parquet"
    _run(src, out, box.env(), "--labels", "positive,negative,neutral", "--pack", "5", "--max-tokens", "16")
    check_gave_up(out, box)


FLEET = """
[[endpoint]]
name = "{name}"
provider = "openai"
endpoint = "{url}"
key_env = "{name}_KEY"
model = "meta-llama/Llama-3.1-70B-Instruct"
rpm = 6000
concurrency = 4
input_price = "{price}"
output_price = "{price}"
"""


def test_a_timed_out_request_at_a_fleet_endpoint_is_maybe_billed(sandbox_factory, tmp_path: Path) -> None:
    prices = {"cheap": "0.20", "dear": "0.60"}
    boxes = {
        name: sandbox_factory(**{**SLOW, "prices": (int(Decimal(p) * 1_000_000),) * 3})
        for name, p in prices.items()
    }
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        "".join(FLEET.format(name=n, url=boxes[n].openai_url, price=p) for n, p in prices.items())
    )
    env = {f"{n}_KEY": b.key for n, b in boxes.items()}
    src, out = prompts_csv(tmp_path / "in.csv", 24), tmp_path / "out.parquet"
    _run(src, out, env, "--fleet", str(fleet), "--max-attempts", "3")
    check_gave_up(out, *boxes.values())


def test_a_request_that_never_connected_is_not_maybe_billed(tmp_path: Path) -> None:
    """A refused connection never reached a server: nothing to count, however often it is retried."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections to it are refused
    src, out = prompts_csv(tmp_path / "in.csv", 6), tmp_path / "out.parquet"
    env = {"DATAOORTS_ENDPOINT": f"http://127.0.0.1:{port}/api/v1", "DATAOORTS_API_KEY": "k"}
    result = run_cli(["run", str(src), "-o", str(out), *TIMEOUT, "--max-attempts", "2"], env=env)
    assert result.exit_code == 4, result.output  # the endpoint's fault, not the rows': a stop
    assert {r["status"] for r in pq.read_table(out).to_pylist()} == {"pending"}
    assert "maybe_billed" not in summary_of(out)
    assert "may have been billed" not in run_cli(["status", str(out)]).output


def test_the_cap_holds_with_requests_given_up_on(sandbox_factory, tmp_path: Path) -> None:
    """``--max-cost`` counts a timed-out request at its worst case the moment it is given up on,
    so the bill, the timed-out requests' included, never passes the cap."""
    box = sandbox_factory(**SLOW)
    src, out = prompts_csv(tmp_path / "in.csv", 60), tmp_path / "out.parquet"
    cap = Decimal("0.0003")
    result = run_cli(["run", str(src), "-o", str(out), *TIMEOUT, "--max-tokens", "16", "--max-cost", str(cap)],
                     env=box.env())  # fmt: skip
    assert result.exit_code == 3, result.output
    stopped = next(line for line in result.output.splitlines() if line.startswith("stopped: "))
    assert "requests given up on (timeouts) may have been billed" in stopped, stopped
    assert "crash" not in stopped, stopped  # there was none
    _settled(box)
    assert box.sandbox.stats["unheard"] > 0
    assert box.sandbox.stats["billed_pico"] <= cap * PICO_PER_USD


def _nothing_maybe_billed(out: Path) -> None:
    """No request of the runs that wrote ``out`` may have been billed: the summary, ``report``,
    ``status`` and the ledger say none."""
    assert "maybe_billed" not in summary_of(out), summary_of(out)
    assert "maybe_billed" not in orjson.loads(run_cli(["report", str(out), "--format", "json"]).output)
    assert "may have been billed" not in run_cli(["status", str(out)]).output
    runs = _ledger_runs(out)
    assert runs and all(not _pico(r.get("maybe_billed_usd")) for r in runs), runs


def test_requests_the_server_refused_are_not_maybe_billed(sandbox_factory, tmp_path: Path) -> None:
    """A rejected key, a model the server lacks, a refused port: the server answered an error or
    never had the request, so none was billed, and ``--max-cost`` is not used up by them (the
    next run, with the right key, sends every row under the same cap)."""
    box = sandbox_factory(prices=PRICED)
    gone = sandbox_factory()
    gone.stop()
    src, out = prompts_csv(tmp_path / "in.csv", 20), tmp_path / "out.parquet"
    cap = ["--max-cost", "0.001", "--progress", "none"]
    result = run_cli(
        ["run", str(src), "-o", str(out), *cap], env={**box.env(), "DATAOORTS_API_KEY": "sk-wrong"}
    )
    assert result.exit_code == 4, result.output
    _nothing_maybe_billed(out)
    result = run_cli(["run", str(src), "-o", str(out), *cap], env=box.env())
    assert result.exit_code == 0, result.output
    assert {r["status"] for r in pq.read_table(out).to_pylist()} == {"ok"}
    _nothing_maybe_billed(out)

    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        FLEET.format(name="refused", url=gone.openai_url, price="0.1")
        + FLEET.format(name="nomodel", url=box.openai_url, price="0.2").replace(
            "meta-llama/Llama-3.1-70B-Instruct", "no-such/model"
        )
        + FLEET.format(name="badkey", url=box.openai_url, price="0.3")
    )
    env = {"refused_KEY": "k", "nomodel_KEY": box.key, "badkey_KEY": "sk-wrong"}
    out = tmp_path / "fleet.parquet"
    result = run_cli(["run", str(src), "-o", str(out), "--fleet", str(fleet), *cap], env=env)
    assert result.exit_code == 4, result.output
    assert "maybe billed" not in result.output
    _nothing_maybe_billed(out)


def test_the_worst_case_of_a_request_given_up_on_is_the_same_with_or_without_a_cap(
    sandbox_factory, tmp_path: Path
) -> None:
    """A request given up on may have been billed up to its prompt (counted) and max_tokens: the
    same figure whether or not ``--max-cost`` is set, and the one ``estimate`` gives."""
    box = sandbox_factory(latency=2.5, prices=PRICED)
    src = prompts_csv(tmp_path / "in.csv", 3)
    job = ["--template", "Say: {prompt}", "--max-tokens", "8", "--timeout", "1", "--max-attempts", "1",
           "--progress", "none", "--cache", "off"]  # fmt: skip
    worst = []
    for name, extra in (("free", []), ("capped", ["--max-cost", "1"])):
        out = tmp_path / f"{name}.parquet"
        result = run_cli(["run", str(src), "-o", str(out), *job, *extra], env=box.env())
        assert result.exit_code == 1, result.output
        maybe = summary_of(out)["maybe_billed"]
        assert maybe["requests"] == 3, maybe
        worst.append(_pico(maybe["worst_case_usd"]))
    assert worst[0] == worst[1], worst
    estimate = run_cli(["estimate", str(src), *job[:4], "--format", "json"], env=box.env())
    assert estimate.exit_code == 0, estimate.output
    said = orjson.loads(estimate.output)
    assert worst[0] == _pico(said["cost_usd"]["worst_case"]), said


def test_requests_given_up_on_wait_for_room_under_the_cap_instead_of_stopping_the_run(
    sandbox_factory, tmp_path: Path
) -> None:
    """A request given up on counts at its worst case, and its retry waits for room under the cap
    like any request: the run stops only when even one more request could not fit. (It stopped at
    the first timeout that found the cap full of reservations, though the requests in flight cost
    a fraction of their worst case.)"""
    box = sandbox_factory(**SLOW)
    src, out = prompts_csv(tmp_path / "in.csv", 40), tmp_path / "out.parquet"
    job = [*TIMEOUT, "--max-tokens", "200"]
    said = run_cli(["estimate", str(src), *job, "--format", "json"], env=box.env())
    assert said.exit_code == 0, said.output
    worst = Decimal(orjson.loads(said.output)["cost_usd"]["worst_case"]) / 40  # one request's
    cap = (50 * worst).quantize(Decimal("0.00000001"))
    result = run_cli(["run", str(src), "-o", str(out), *job, "--max-cost", str(cap)], env=box.env())
    _settled(box)
    maybe = summary_of(out).get("maybe_billed") or {}
    assert maybe.get("requests", 0) >= 10, maybe  # enough timeouts to have filled the cap before
    assert result.exit_code in (0, 1), result.output  # rows may fail for good: never the budget
    assert box.sandbox.stats["billed_pico"] <= cap * PICO_PER_USD


def test_retries_count_only_requests_that_left(sandbox_factory, tmp_path: Path) -> None:
    """Every request times out and the cap holds 10 worst cases: the run stops at the cap with
    retries waiting. The summary's retries are the requests that went again, not those the cap
    kept back (it said "13 requests, 12 retries" for 13 rows each sent once)."""
    box = sandbox_factory(**SLOW, keep_bodies=True)
    src, out = prompts_csv(tmp_path / "in.csv", 20), tmp_path / "out.parquet"
    job = ["--timeout", "0.3", "--max-attempts", "6", "--rpm", "0", "--cache", "off", "--progress", "none"]
    job += ["--max-tokens", "200", "--concurrency", "4"]
    said = run_cli(["estimate", str(src), *job, "--format", "json"], env=box.env())
    worst = Decimal(orjson.loads(said.output)["cost_usd"]["worst_case"]) / 20
    result = run_cli(["run", str(src), "-o", str(out), *job, "--max-cost", str((10 * worst).quantize(Decimal("1e-8")))],
                     env=box.env())  # fmt: skip
    assert result.exit_code == 3, result.output
    _settled(box)
    this_run = summary_of(out)["this_run"]
    sent = [orjson.loads(b)["data"]["messages"][-1]["content"] for b in box.sandbox.bodies]
    assert this_run["requests"] == len(sent)
    assert this_run["retries"] == len(sent) - len(set(sent)), (this_run, len(set(sent)))
