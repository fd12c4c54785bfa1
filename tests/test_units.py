"""Pricing, token counting, job validation and prompt building: the pure pieces."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pytest

from batchllm.errors import JobError
from batchllm.job import build_job
from batchllm.job_keys import parse_duration
from batchllm.jobfile import load_job_file
from batchllm.pricing import cost, format_usd, load_models, parse_usd, resolve_model, to_usd
from batchllm.prompts import PromptBuilder, template_fields
from batchllm.tokens import get_counter


def test_page_example_cost_is_exact() -> None:
    model = resolve_model("dataoorts", "meta/llama-3.1-70b-instruct")
    inp, out = cost(model.prices, 27, 512)
    assert inp is not None and out is not None
    assert format_usd(inp + out) == "$0.00018245"
    assert Decimal(inp + out) / 10**12 == Decimal("0.00018245")
    assert to_usd(inp + out) == 0.00018245


def test_prices_as_data() -> None:
    models = load_models("dataoorts")
    assert models["meta/llama-3.1-8b-instruct"].context_window == 8000
    prices = models["meta/llama-3.1-8b-instruct"].prices
    assert prices is not None and prices.input_per_million == Decimal("0.07")
    with pytest.raises(JobError, match="unknown model"):
        resolve_model("dataoorts", "nope")
    # An OpenAI-compatible server may serve anything: at the prices given, or at none.
    assert resolve_model("openai", "nope", unlisted_ok=True).prices is None
    assert cost(None, 10, 10) == (None, None)


def test_bad_price_table(tmp_path: Path) -> None:
    p = tmp_path / "m.toml"
    p.write_text(
        '[dataoorts.models.x]\ninput_price_per_million = "0.0000001"\noutput_price_per_million = "1"\ncontext_window = 10\n'
    )
    with pytest.raises(JobError, match="6 decimal places"):
        load_models(path=p)


def test_sums_are_exact_over_many_rows() -> None:
    prices = resolve_model("dataoorts", "meta/llama-3.1-70b-instruct").prices
    total = sum(sum(cost(prices, 13, 7)) for _ in range(1_000_000))  # type: ignore[arg-type]
    assert format_usd(total) == "$6.41"
    assert parse_usd("$1.50") == 1_500_000_000_000


def test_token_count_matches_the_page() -> None:
    counter = get_counter()
    assert counter.exact
    assert counter.count("What is Deep Learning", "You are an expert deep learning engineer") == 27
    assert counter.texts_tokens(["What is Deep Learning", "hi"]) == [
        counter.text_tokens("What is Deep Learning"),
        counter.text_tokens("hi"),
    ]


def test_job_ranges_and_messages() -> None:
    base = {"input": "a.csv", "output": "o.parquet"}
    for key, value, message in [
        ("temperature", 5.5, "--temperature must be a number from 0 to 5"),
        ("top_k", 0, "--top-k must be an integer from 1 to 50"),
        ("seed", 0, "--seed must be an integer from 1 to 1e+10"),
        ("concurrency", 0, "--concurrency must be an integer"),
        ("rpm", "fast", "--rpm must be auto, 0 .no pacing. or requests per minute, got 'fast'"),
        ("max_runtime", "soon", "--max-runtime must be a duration"),
        ("max_error_rate", 2, "--max-error-rate must be a number from 0 to 1"),
    ]:
        with pytest.raises(JobError, match=message.replace("+", r"\+")):
            build_job({**base, key: value})
    job = build_job({**base, "rpm": "auto", "max_runtime": "1h30m", "max_cost": "2.50"})
    assert job.rpm is None and job.max_runtime == 5400 and job.max_cost_pico == 2_500_000_000_000
    assert build_job({**base, "rpm": 0}).rpm == 0
    assert parse_duration("5s") == 5 and parse_duration(90) == 90


def test_job_file_keys_types_and_paths(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    good = jobs / "good.toml"
    good.write_text('input = "../data/in.csv"\noutput = "../out/o.parquet"\nmax_tokens = 16\n')
    values = load_job_file(good)
    assert values["input"] == str(tmp_path / "data" / "in.csv")
    bad = jobs / "bad.toml"
    bad.write_text('input = "a.csv"\noutput = "o.parquet"\ncolour = "blue"\n')
    with pytest.raises(JobError, match=r"bad.toml: unknown key 'colour'"):
        load_job_file(bad)
    typed = jobs / "typed.toml"
    typed.write_text('input = "a.csv"\noutput = "o.parquet"\nmax_tokens = "many"\n')
    with pytest.raises(JobError, match=r"typed.toml: key 'max_tokens' must be an integer"):
        build_job(load_job_file(typed), job_file=typed)
    secret = jobs / "secret.toml"
    secret.write_text('input = "a.csv"\noutput = "o.parquet"\napi_key = "sk-123"\n')
    with pytest.raises(JobError, match="must not hold the key") as info:
        load_job_file(secret)
    assert "sk-123" not in str(info.value)


def test_template_fields_and_rendering() -> None:
    assert template_fields("Classify {review} from {product} ({review})") == ["review", "product"]
    with pytest.raises(JobError):
        template_fields("bad {")
    job = build_job({"input": "a.csv", "output": "o.parquet", "template": "{a} and {{literal}} {b:>3}"})
    builder = PromptBuilder(job, ["a", "b"], "a.csv")
    batch = pa.record_batch({"a": ["x", None], "b": [1, 22]})
    assert builder.users(batch) == ["x and {literal}   1", " and {literal}  22"]
    with pytest.raises(JobError, match="no column 'c'"):
        PromptBuilder(build_job({"input": "a.csv", "output": "o.parquet", "template": "{c}"}), ["a"], "a.csv")


def test_row_ids_are_stable_and_content_sensitive() -> None:
    job = build_job({"input": "a.csv", "output": "o.parquet"})
    builder = PromptBuilder(job, ["prompt"], "a.csv")
    first = builder.build(pa.record_batch({"prompt": ["a", "b", "c"]}), 0)
    again = builder.build(pa.record_batch({"prompt": ["a", "b", "c", "d"]}), 0)
    edited = builder.build(pa.record_batch({"prompt": ["a", "B", "c"]}), 0)
    assert again.row_ids[:3] == first.row_ids
    assert edited.row_ids[0] == first.row_ids[0] and edited.row_ids[1] != first.row_ids[1]


def test_resume_hint_drops_restart() -> None:
    from batchllm.cli import command_line

    hint = command_line(["run", "in put.csv", "-o", "o.parquet", "--restart", "--rpm", "0"])
    assert hint == "batchllm run 'in put.csv' -o o.parquet --rpm 0"


def test_the_error_window_counts_the_last_n_rows_like_a_plain_list() -> None:
    import random

    from batchllm.engine.stats import ErrorWindow

    for seed in range(50):
        rnd = random.Random(seed)
        window, seen = ErrorWindow(20, 0.3), []
        for i in range(300):  # long runs of successes, then a burst of failures
            failed = rnd.random() < (0.05 if i < 150 else 0.5)
            seen.append(failed)
            over = window.add(failed)
            assert window.errors == sum(seen[-20:])
            assert over == (failed and len(seen) >= 20 and sum(seen[-20:]) > 6)


def test_progress_lines_give_the_last_minutes_rate_and_time_left() -> None:
    # An API at 20 s a reply, 5 rows/s once the first replies are in: a minute later the time
    # left is the rows left at 5 a second (140 s), where the run's average put it at 187 s.
    import io
    import json

    from batchllm.cli.progress import JsonReporter, Reporter

    def feed(reporter: Reporter) -> None:
        reporter.start({"todo": 1000, "done_before": 0, "rows": 1000, "input": "in.csv", "output": "o.parquet",
                        "provider": "dataoorts", "model": "m"})  # fmt: skip
        for t in range(10, 90, 10):
            clock[0] = float(t)
            done = max(0, (t - 20) * 5)
            reporter.progress({"done": done, "ok": done, "error": 0, "tokens": 0, "cost_pico": 0,
                               "rows_per_s": done / t})  # fmt: skip

    clock = [0.0]
    text = io.StringIO()
    feed(Reporter("lines", text, clock=lambda: clock[0]))
    last = text.getvalue().splitlines()[-1]
    assert last.startswith("progress: 300/1,000 rows") and "5.0 rows/s" in last and "~140 s left" in last
    clock[0] = 0.0
    logs = io.StringIO()
    feed(JsonReporter(logs, clock=lambda: clock[0]))
    event = json.loads(logs.getvalue().splitlines()[-1])
    assert event["recent_rows_per_s"] == 5.0 and event["seconds_left"] == 140
    assert event["rows_per_s"] == 300 / 80  # the run's own stays as it was
