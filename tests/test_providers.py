"""Providers: the OpenAI-compatible envelope, rate hints, the Request key, and both faces end to end."""

from __future__ import annotations

import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchllm.engine.booking import same_model
from batchllm.engine.ratelimit import RateLimiter
from batchllm.errors import FatalAPIError, RetryableAPIError, RunStopError
from batchllm.providers import get_provider
from batchllm.records import Message, RateHints, Request

from .conftest import ROOT, prompts_csv, run_cli, summary_of

openai = get_provider("openai")
OK = b'{"id":"x","choices":[{"index":0,"message":{"role":"assistant","content":"positive"},"finish_reason":"length"}],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}}'
JOB = ["run", "--job", str(ROOT / "jobs" / "one_word_sentiment.toml")]
PRICES = ["--input-price", "0.31", "--output-price", "0.34"]


def error(code: str | None, kind: str = "invalid_request_error") -> bytes:
    code_json = "null" if code is None else f'"{code}"'
    return f'{{"error":{{"message":"m","type":"{kind}","param":null,"code":{code_json}}}}}'.encode()


def test_openai_success_and_finish_reason() -> None:
    c = openai.parse(200, {}, OK)
    assert (c.text, c.prompt_tokens, c.completion_tokens, c.finish_reason) == ("positive", 12, 3, "length")
    assert openai.truncated(c, 100)  # the server said so, whatever the counts
    stop = openai.parse(200, {}, OK.replace(b'"length"', b'"stop"'))
    assert not openai.truncated(stop, 3)  # completion_tokens == max_tokens, but the server says stop
    bare = openai.parse(200, {}, b'{"choices":[{"message":{"content":"x"},"finish_reason":"stop"}]}')
    assert bare.prompt_tokens is None and bare.completion_tokens is None and bare.model is None
    named = openai.parse(200, {}, OK.replace(b'"id":"x"', b'"id":"x","model":"gpt-4o-mini-2024-07-18"'))
    assert named.model == "gpt-4o-mini-2024-07-18"


@pytest.mark.parametrize(
    ("status", "body", "headers", "kind", "wait"),
    [
        (401, error("invalid_api_key"), {}, RunStopError, None),
        (429, error("insufficient_quota", "insufficient_quota"), {}, RunStopError, None),
        (429, error("rate_limit_exceeded", "requests"), {"retry-after-ms": "1500"}, RetryableAPIError, 1.5),
        (429, error(None), {"retry-after": "2"}, RetryableAPIError, 2.0),
        (503, b"<html>busy</html>", {}, RetryableAPIError, None),
        (400, error("context_length_exceeded"), {}, FatalAPIError, None),
        (404, b'{"error":"model not found"}', {}, RunStopError, None),  # no row can succeed
        (404, b'{"error":"no such route"}', {}, FatalAPIError, None),
        (422, b'{"detail":"bad field"}', {}, FatalAPIError, None),
        (200, b"{not json", {}, RetryableAPIError, None),
        (200, b'{"choices":[]}', {}, RetryableAPIError, None),
    ],
)
def test_openai_errors_are_classified(
    status: int, body: bytes, headers: dict, kind: type, wait: float | None
) -> None:
    with pytest.raises(kind) as info:
        openai.parse(status, headers, body)
    assert type(info.value) is kind
    if wait is not None:
        assert info.value.retry_after == wait  # type: ignore[attr-defined]
    if status == 429 and kind is RunStopError:
        assert info.value.reason == "quota"  # type: ignore[attr-defined]


def test_rate_hints_from_headers() -> None:
    hints = openai.rate_hints(
        {
            "x-ratelimit-limit-requests": "1200",
            "x-ratelimit-remaining-requests": "1199",
            "x-ratelimit-reset-requests": "6m0s",
            "x-ratelimit-limit-tokens": "40000",
            "x-ratelimit-reset-tokens": "120ms",
        }
    )
    assert hints == RateHints(1200, 1199, 360.0, 40000, None, 0.12)
    assert openai.rate_hints({}) is None
    assert get_provider("dataoorts").rate_hints({"x-ratelimit-limit-requests": "5"}) is None


def test_a_stated_limit_is_paced_just_under_and_never_above() -> None:
    now = [0.0]
    limiter = RateLimiter(None, auto=True, start_rpm=300, clock=lambda: now[0])
    limiter.on_hints(RateHints(limit_requests=1200))
    assert limiter.rate == pytest.approx(0.98 * 1200) and not limiter.slow_start
    for _ in range(100):  # growth never passes the stated limit
        limiter._bound = True
        now[0] += 1
        limiter.on_success()
    assert limiter.rate <= 0.98 * 1200
    capped = RateLimiter(600, clock=lambda: now[0])
    capped.on_hints(RateHints(limit_requests=1200))
    assert capped.rate == 600  # --rpm stays a ceiling


def test_request_key_is_canonical_and_stable_across_processes() -> None:
    msgs = (Message("system", "s"), Message("user", "héllo"))
    a = Request("openai", "m", msgs, {"temperature": 0.0, "max_tokens": 5})
    b = Request("openai", "m", msgs, {"max_tokens": 5, "temperature": 0.0})
    assert a.key() == b.key()
    assert a.key() != Request("dataoorts", "m", msgs, dict(a.params)).key()
    code = (
        "from batchllm.records import Message, Request;"
        "print(Request('openai','m',(Message('system','s'),Message('user','héllo')),"
        "{'max_tokens':5,'temperature':0.0}).key())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == a.key()


def test_provider_ranges_and_parameters() -> None:
    base = ["run", "x.csv", "-o", "o.parquet", "--provider", "openai"]
    result = run_cli([*base, "--temperature", "3"])
    assert result.exit_code == 2 and "--temperature must be a number from 0 to 2" in result.output
    result = run_cli([*base, "--top-k", "5"])
    assert result.exit_code == 2 and "not a parameter of the openai provider" in result.output
    result = run_cli([*base, "--max-cost", "1"])
    assert result.exit_code == 2


def test_the_sample_job_through_the_openai_face(sandbox, tmp_path: Path) -> None:
    dataoorts_out, openai_out = tmp_path / "d.parquet", tmp_path / "o.parquet"
    assert run_cli([*JOB, "-o", str(dataoorts_out), "--rpm", "0"], env=sandbox.env()).exit_code == 0
    result = run_cli(
        [*JOB, "-o", str(openai_out), "--rpm", "0", "--provider", "openai", *PRICES], env=sandbox.openai_env()
    )
    assert result.exit_code == 0, result.output
    d, o = pq.read_table(dataoorts_out), pq.read_table(openai_out)
    assert d.schema.remove_metadata() == o.schema.remove_metadata()
    rows = o.to_pylist()
    assert all(r["status"] == "ok" for r in rows) and len(rows) == 200
    # truncated is the server's finish_reason: the face says "length" exactly when it cut a reply.
    paid = [r for r in rows if not r["answered_by"]]  # identical prompts are sent once
    assert sum(r["truncated"] for r in paid) == sum(
        1 for r in paid if r["completion_tokens"] == 16 and r["truncated"]
    )
    assert any(r["truncated"] for r in rows)
    for r in rows:
        assert r["cost_usd"] == pytest.approx(
            (r["prompt_tokens"] * 0.31 + r["completion_tokens"] * 0.34) / 1e6
        )
        assert r["tokens_counted"] is False


def test_a_reply_without_usage_is_counted_and_says_so(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(no_usage=1.0)
    out = tmp_path / "o.parquet"
    result = run_cli(
        [*JOB, "-o", str(out), "--rpm", "0", "--provider", "openai", *PRICES], env=box.openai_env()
    )
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    assert all(r["tokens_counted"] for r in rows)
    assert all(r["prompt_tokens"] > 0 and r["completion_tokens"] > 0 for r in rows if not r["answered_by"])
    # Said where the cost is: how many replies' tokens are batchllm's count, and how exact it is.
    counted = sum(1 for r in rows if r["tokens_counted"])
    tokens = summary_of(out)["tokens"]
    assert tokens["counted_rows"] == counted and tokens["counted_exactly"] is True
    said = f"the server reported no usage for {counted} replies: batchllm counted their tokens exactly"
    assert said in result.output
    assert f"tokens of {counted} replies counted by batchllm" in run_cli(["report", str(out)]).output
    guessed = tmp_path / "mini.parquet"
    mini = run_cli(
        [*JOB, "-o", str(guessed), "--rpm", "0", "--provider", "openai", "--model", "gpt-4o-mini"],
        env=box.openai_env(),
    )
    assert mini.exit_code == 0, mini.output
    assert "counted their tokens approximately" in mini.output and "their cost is an estimate" in mini.output
    reported = run_cli(["report", str(guessed)]).output
    assert (
        "counted by batchllm (the server reported no usage; approximately: their cost is an estimate)"
        in reported
    )


def test_unpriced_model_has_null_costs_and_one_warning(sandbox, tmp_path: Path) -> None:
    out = tmp_path / "o.parquet"
    src = ROOT / "sample_data" / "reviews.csv"
    args = ["run", str(src), "-o", str(out), "--template", "Label: {review}", "--max-tokens", "8"]
    args += ["--rpm", "0", "--provider", "openai"]
    assert run_cli([*args, "--max-cost", "1"], env=sandbox.openai_env()).exit_code == 2  # a cap needs prices
    result = run_cli(args, env=sandbox.openai_env())
    assert result.exit_code == 0, result.output
    assert result.output.count("has no price") == 1
    assert "cost: unknown" in result.output
    rows = [r for r in pq.read_table(out).to_pylist() if r["review"]]  # one review is empty: not sent
    assert all(r["cost_usd"] is None and r["status"] == "ok" for r in rows)
    report = run_cli(["report", str(out)])
    assert report.exit_code == 0 and "unknown (no price)" in report.output


def test_unpriced_model_with_no_row_answered_reports_an_unknown_cost(sandbox_factory, tmp_path: Path) -> None:
    """No price and no row answered (the run stopped at its first requests): the cost is unknown,
    not $0.00, as it is with rows answered."""
    box = sandbox_factory(refuse_response_format=True)
    out = tmp_path / "o.parquet"
    args = ["run", str(ROOT / "sample_data" / "reviews.csv"), "-o", str(out), "--template", "Label: {review}"]
    args += ["--provider", "openai", "--rpm", "0", "--labels", "good,bad", "--structured", "on"]
    result = run_cli(args, env=box.openai_env())
    assert result.exit_code == 4 and box.count(200) == 0, result.output
    report = run_cli(["report", str(out)])
    assert report.exit_code == 0, report.output
    assert "unknown (no price)" in report.output and "$0.00" not in report.output, report.output


@pytest.mark.parametrize(
    ("options", "env_key", "code", "needle"),
    [
        ({"quota": 5}, None, 4, "OPENAI_API_KEY"),
        ({}, "wrong-key", 4, "OPENAI_API_KEY"),
    ],
)
def test_quota_and_bad_key_stop_with_exit_4(
    sandbox_factory, tmp_path: Path, options: dict, env_key: str | None, code: int, needle: str
) -> None:
    box = sandbox_factory(**options)
    env = box.openai_env()
    if env_key:
        env["OPENAI_API_KEY"] = env_key
    out = tmp_path / "o.parquet"
    result = run_cli([*JOB, "-o", str(out), "--rpm", "0", "--provider", "openai", *PRICES], env=env)
    assert result.exit_code == code, result.output
    assert needle in result.output
    assert env["OPENAI_API_KEY"] not in result.output
    rows = pq.read_table(out).to_pylist()
    assert not any(r["status"] == "error" for r in rows)  # nothing recorded as a failed row


def test_retry_after_ms_pauses_the_pool(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(throttle_first=1, throttle_ms=1500)
    out = tmp_path / "o.parquet"
    result = run_cli(
        [*JOB, "-o", str(out), "--rpm", "0", "--provider", "openai", "--concurrency", "1", *PRICES],
        env=box.openai_env(),
    )
    assert result.exit_code == 0, result.output
    log = box.log()
    assert log[0][1] == 429 and log[1][1] == 200
    assert 1.4 <= log[1][0] - log[0][0] <= 3.0
    assert all(r["status"] == "ok" for r in pq.read_table(out).to_pylist())


def test_auto_paces_under_the_limit_the_headers_state(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(rate_limit=20)  # 1,200/min, stated in x-ratelimit-* headers
    out = tmp_path / "o.parquet"
    result = run_cli(
        [*JOB, "-o", str(out), "--rpm", "auto", "--provider", "openai", *PRICES], env=box.openai_env()
    )
    assert result.exit_code == 0, result.output
    statuses = [s for _, s, _ in box.log()]
    rows = pq.read_table(out).to_pylist()
    assert statuses.count(200) == sum(not r["answered_by"] for r in rows)  # identical prompts: once
    assert statuses.count(429) <= 2  # at most 1%


def test_prices_given_later_price_the_rows_done_without_one(sandbox, tmp_path: Path) -> None:
    out = tmp_path / "o.parquet"
    src = ROOT / "sample_data" / "reviews.csv"
    args = ["run", str(src), "-o", str(out), "--template", "Label: {review}", "--max-tokens", "8"]
    args += ["--rpm", "0", "--provider", "openai"]
    assert run_cli(args, env=sandbox.openai_env()).exit_code == 0
    sent = sandbox.count()
    result = run_cli([*args, *PRICES], env=sandbox.openai_env())
    assert result.exit_code == 0, result.output
    assert "priced the 199 rows done earlier without a price" in result.output  # and 1 empty review
    assert sandbox.count() == sent  # nothing sent again
    rows = [r for r in pq.read_table(out).to_pylist() if r["review"]]
    assert all(
        r["cost_usd"] == pytest.approx((r["prompt_tokens"] * 0.31 + r["completion_tokens"] * 0.34) / 1e6)
        for r in rows
    )


def test_new_prices_on_a_resume_are_said_and_each_row_keeps_the_price_it_was_answered_at(
    sandbox, tmp_path: Path
) -> None:
    out = tmp_path / "o.parquet"
    base = ["-o", str(out), "--rpm", "0", "--provider", "openai", "--max-tokens", "16"]
    first = run_cli(
        ["run", str(prompts_csv(tmp_path / "a.csv", 20)), *base, *PRICES], env=sandbox.openai_env()
    )
    assert first.exit_code == 0, first.output
    dearer = ["--input-price", "1.5", "--output-price", "2.25"]
    src = prompts_csv(tmp_path / "b.csv", 30)
    result = run_cli(["run", str(src), *base, *dearer], env=sandbox.openai_env())
    assert result.exit_code == 0, result.output
    assert (
        "prices changed since the last run ($0.31 in / $0.34 out per million tokens -> $1.5 in / $2.25 out "
        "per million tokens): the 20 rows answered before keep their costs" in result.output
    )
    rows = pq.read_table(out).to_pylist()
    total = 0
    for r in rows:  # picodollars a token: $P a million tokens is P * 10**6
        i, o = (310_000, 340_000) if int(r["id"][2:]) < 20 else (1_500_000, 2_250_000)
        pico = r["prompt_tokens"] * i + r["completion_tokens"] * o
        assert r["cost_usd"] == pytest.approx(pico / 1e12, rel=1e-12)
        total += pico
    assert summary_of(out)["cost_usd"]["total"] == str(Decimal(total) / 10**12)
    again = run_cli(["run", str(src), *base, *dearer], env=sandbox.openai_env())
    assert again.exit_code == 0 and "prices changed" not in again.output


def test_a_key_never_travels_over_plain_http_to_another_host(tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_text("prompt\nhello\n")
    base = ["run", str(src), "-o", str(tmp_path / "o.parquet"), "--provider", "openai"]
    result = run_cli(
        [*base, "--endpoint", "http://192.0.2.1:8000/v1"], env={"OPENAI_API_KEY": "sk-secret-42"}
    )
    assert result.exit_code == 2
    assert "plain http would send the key in clear text" in result.output
    assert "sk-secret-42" not in result.output


def test_the_model_that_answered_is_kept_beside_the_one_asked_for(sandbox_factory, tmp_path: Path) -> None:
    # A self-hosted server answers with the model it has loaded, whatever was asked.
    box = sandbox_factory(served_model="/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    out = tmp_path / "o.parquet"
    asked = "meta-llama/Llama-3.1-70B-Instruct"
    args = [*JOB, "-o", str(out), "--rpm", "0", "--provider", "openai", "--model", asked, *PRICES]
    result = run_cli([*args, "--labels", "positive,negative,neutral"], env=box.openai_env())
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    assert {(r["model"], r["served_model"]) for r in rows} == {
        (asked, "/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    }
    said = [line for line in result.output.splitlines() if "SmolLM2" in line]
    assert len(said) == 1 and asked in said[0], result.output  # once, naming both
    summary = summary_of(out)
    assert summary["model"] == asked and len([w for w in summary["warnings"] if "SmolLM2" in w]) == 1
    # Answered as asked (or as a dated snapshot of it, as OpenAI does): nothing to say.
    same = tmp_path / "same.parquet"
    plain = run_cli(
        [*JOB, "-o", str(same), "--rpm", "0", "--provider", "openai", *PRICES], env=box.openai_env()
    )
    assert plain.exit_code == 0 and "answered as model" in plain.output
    quiet = sandbox_factory()
    again = run_cli([*JOB, "-o", str(tmp_path / "q.parquet"), "--rpm", "0", "--provider", "openai", *PRICES],
                    env=quiet.openai_env())  # fmt: skip
    assert again.exit_code == 0 and "answered as model" not in again.output
    kept = pq.read_table(tmp_path / "q.parquet").to_pylist()
    assert all(r["served_model"] == r["model"] for r in kept)
    assert same_model("gpt-4o-mini-2024-07-18", "gpt-4o-mini") and not same_model("gpt-4o-mini", "gpt-4o")
    # Dataoorts names no model in its replies: the column is empty, and nothing is said.
    dataoorts = run_cli([*JOB, "-o", str(tmp_path / "d.parquet"), "--rpm", "0"], env=quiet.env())
    assert dataoorts.exit_code == 0 and "answered as model" not in dataoorts.output
    assert {r["served_model"] for r in pq.read_table(tmp_path / "d.parquet").to_pylist()} == {None}
