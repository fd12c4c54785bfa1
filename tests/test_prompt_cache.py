"""Cached prompt tokens end to end: the sandbox's OpenAI face caches a shared prefix as OpenAI
does, batchllm records what it says, prices it at the cached price, and earns it (the warm-up)."""

from __future__ import annotations

import random
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchllm.pricing import load_models
from batchllm.tokens import counter_for, get_counter

from .conftest import read_output, run_cli, spawn, summary_of, write_csv
from .test_openai_batch import answer_batch

MINI = load_models("openai")["gpt-4o-mini"].prices
assert MINI is not None
BILL = (MINI.input_pico, MINI.output_pico, MINI.cached_input_pico)


def long_system(tokens: int = 1500) -> str:
    """An instruction of about ``tokens`` tokens (both counts: Llama 3's, and 4 bytes a token)."""
    rng = random.Random(7)
    words = [
        "label",
        "the",
        "review",
        "by",
        "its",
        "sentiment;",
        "weigh",
        "price",
        "quality",
        "shipping",
        "and",
        "service",
    ]
    text = "You label product reviews. "
    while get_counter().text_tokens(text) < tokens:
        text += " ".join(rng.choice(words) for _ in range(20)) + f" (rule {rng.randint(1, 999)}). "
    return text


def job_args(tmp_path: Path, rows: int, out: str, *extra: str) -> list[str]:
    data = write_csv(
        tmp_path / "reviews.csv", [{"id": i, "text": f"review {i}: it works"} for i in range(rows)]
    )
    return [
        "run", str(data), "-o", str(tmp_path / out), "--template", "Review: {text}",
        "--system", long_system(), "--id-column", "id", "--provider", "openai", "--model", "gpt-4o-mini",
        "--rpm", "0", *extra,
    ]  # fmt: skip


def pico(usd: float | str) -> int:
    """Picodollars of a Parquet float (exact to its shortest repr) or of a summary's text."""
    return round(Decimal(usd if isinstance(usd, str) else repr(usd)) * 10**12)


def test_shared_prefix_is_cached_and_billed_at_the_cached_price(sandbox_factory: Any, tmp_path: Path) -> None:
    box = sandbox_factory(latency=0.2, prices=BILL, keep_bodies=True)
    system = long_system()
    assert (
        get_counter().text_tokens(system) >= 1024 and counter_for("gpt-4o-mini").text_tokens(system) >= 1024
    )
    result = run_cli(job_args(tmp_path, 300, "out.parquet", "--concurrency", "64"), env=box.openai_env())
    assert result.exit_code == 0, result.output
    table = read_output(tmp_path / "out.parquet").to_pylist()
    stats = box.sandbox.stats
    cached = [r["cached_tokens"] for r in table]
    # Every row shares the prefix: what one row can have cached is what any row has at most.
    cacheable = max(cached)
    assert 1024 <= cacheable < table[0]["prompt_tokens"] and cacheable % 128 == 0
    assert sum(cached) >= 0.9 * cacheable * len(table)
    assert sum(cached) == stats["cached_tokens"]  # the column is the server's count
    # Exact at the cached price: every row's cost, and the summary's total, are the bill.
    assert sum(pico(r["cost_usd"]) for r in table) == stats["billed_pico"]
    for r in table:
        in_pico = (r["prompt_tokens"] - r["cached_tokens"]) * MINI.input_pico + r[
            "cached_tokens"
        ] * MINI.cached_input_pico
        assert pico(r["input_cost_usd"]) == in_pico
    summary = summary_of(tmp_path / "out.parquet")
    assert pico(summary["cost_usd"]["total"]) == stats["billed_pico"]
    assert summary["tokens"]["cached"] == stats["cached_tokens"]
    saved = stats["cached_tokens"] * (MINI.input_pico - MINI.cached_input_pico)
    assert pico(summary["tokens"]["cached_saved_usd"]) == saved
    assert "cached" in result.output
    # report, status and spend say what was cached and what it saved, exactly.
    report = orjson.loads(run_cli(["report", str(tmp_path / "out.parquet"), "--format", "json"]).output)
    assert report["overall"]["cached_tokens"] == stats["cached_tokens"]
    assert pico(report["cached_saved_usd"]) == saved
    status = run_cli(["status", str(tmp_path / "out.parquet")]).output
    assert f"prompt cache: {stats['cached_tokens']:,} of the prompt tokens cached" in status
    spend = orjson.loads(run_cli(["spend", "--runs", "--format", "json"]).output)
    (run,) = spend["runs"]
    assert run["cached_tokens"] == stats["cached_tokens"] and pico(run["cached_saved_usd"]) == saved
    assert spend["prompt_cache"]["cached_tokens"] == stats["cached_tokens"]
    # One prompt_cache_key for the job's prefix, on every request, and never the key.
    keys = {orjson.loads(b).get("prompt_cache_key") for b in box.sandbox.bodies}
    assert len(keys) == 1 and None not in keys and box.key not in next(iter(keys))
    assert stats["prompt_cache_keyed"] == stats["requests"]


def test_without_the_warmup_the_first_wave_pays_full_price(sandbox_factory: Any, tmp_path: Path) -> None:
    box = sandbox_factory(latency=0.2, prices=BILL)
    args = job_args(tmp_path, 300, "cold.parquet", "--concurrency", "64", "--no-warmup")
    assert run_cli(args, env=box.openai_env()).exit_code == 0
    cached = [r["cached_tokens"] for r in read_output(tmp_path / "cold.parquet").to_pylist()]
    # The requests sent before any answer (the adaptive window's first round, 8 at least, under
    # --concurrency 64: engine/concurrency.py) found nothing cached; with the warm-up only one.
    assert cached.count(0) >= 8 and max(cached) >= 1024


def test_a_short_prefix_sends_no_cache_key_and_caches_nothing(sandbox_factory: Any, tmp_path: Path) -> None:
    box = sandbox_factory(prices=BILL, keep_bodies=True)
    data = write_csv(tmp_path / "r.csv", [{"text": f"review {i}"} for i in range(20)])
    args = ["run", str(data), "-o", str(tmp_path / "o.parquet"), "--template", "Review: {text}",
            "--system", "Label it.", "--provider", "openai", "--model", "gpt-4o-mini", "--rpm", "0"]  # fmt: skip
    assert run_cli(args, env=box.openai_env()).exit_code == 0
    table = read_output(tmp_path / "o.parquet").to_pylist()
    assert all(r["cached_tokens"] == 0 for r in table)
    assert all("prompt_cache_key" not in orjson.loads(b) for b in box.sandbox.bodies)
    assert sum(pico(r["cost_usd"]) for r in table) == box.sandbox.stats["billed_pico"]


def test_old_journal_and_ledger_gain_the_cached_columns(sandbox_factory: Any, tmp_path: Path) -> None:
    """A journal and a ledger written before cached tokens existed resume and report as before."""
    import sqlite3

    from batchllm.ledger import ledger_path

    box = sandbox_factory(prices=BILL)
    args = job_args(tmp_path, 10, "old.parquet", "--concurrency", "4")
    assert run_cli(args, env=box.openai_env()).exit_code == 0
    journal = tmp_path / "old.parquet.batchllm" / "journal.sqlite"
    ledger = ledger_path(None)
    assert ledger is not None
    for db, table in ((journal, "rows"), (ledger, "runs")):
        with sqlite3.connect(db) as conn:
            conn.execute(f"ALTER TABLE {table} DROP COLUMN cached_tokens")
            if table == "runs":
                conn.execute("ALTER TABLE runs DROP COLUMN cached_saved_pico")
    spend = orjson.loads(run_cli(["spend", "--runs", "--format", "json"]).output)  # read-only: as it is
    assert [r["cached_tokens"] for r in spend["runs"]] == [0]
    args = job_args(tmp_path, 20, "old.parquet", "--concurrency", "4")  # ten more rows: a resume
    result = run_cli(args, env=box.openai_env())
    assert result.exit_code == 0, result.output
    table = read_output(tmp_path / "old.parquet").to_pylist()
    assert [r["cached_tokens"] for r in table[:10]] == [0] * 10  # the old rows: nothing known
    assert all(r["cached_tokens"] > 0 for r in table[10:])
    assert sum(pico(r["cost_usd"]) for r in table) == box.sandbox.stats["billed_pico"]
    runs = orjson.loads(run_cli(["spend", "--runs", "--format", "json"]).output)["runs"]
    assert runs[-1]["cached_tokens"] == sum(r["cached_tokens"] for r in table)


def test_estimate_projects_the_cached_share(tmp_path: Path) -> None:
    args = job_args(tmp_path, 300, "e.parquet", "--concurrency", "64", "--format", "json")
    args[0] = "estimate"
    warm = orjson.loads(run_cli(args).output)["prompt_cache"]
    cold = orjson.loads(run_cli([*args, "--no-warmup"]).output)["prompt_cache"]
    assert warm["prefix_tokens"] >= 1024 and warm["prefix_tokens"] % 128 == 0
    assert warm["cached_tokens"] == warm["prefix_tokens"] * 299  # all but the warm-up
    assert cold["cached_tokens"] == warm["prefix_tokens"] * (300 - 64)  # all but the first wave
    assert warm["share"] > 0.9 > cold["share"]
    saved = warm["cached_tokens"] * (MINI.input_pico - MINI.cached_input_pico)
    assert pico(warm["saved_usd"]) == saved
    # Dataoorts reports no cached tokens: nothing is projected.
    dataoorts = [
        a.replace("e.parquet", "d.parquet")
        for a in args
        if a not in ("openai", "gpt-4o-mini", "--provider", "--model")
    ]
    assert "prompt_cache" not in orjson.loads(run_cli(dataoorts).output)


def test_labels_in_packs_cost_the_bill_at_the_cached_price(sandbox_factory: Any, tmp_path: Path) -> None:
    box = sandbox_factory(latency=0.1, prices=BILL)
    args = job_args(tmp_path, 200, "packs.parquet", "--concurrency", "16", "--labels", "positive,negative",
                    "--pack", "10", "--max-tokens", "16")  # fmt: skip
    result = run_cli(args, env=box.openai_env())
    assert result.exit_code == 0, result.output
    table = read_output(tmp_path / "packs.parquet").to_pylist()
    stats = box.sandbox.stats
    assert stats["cached_tokens"] > 0
    assert sum(r["cached_tokens"] for r in table) == stats["cached_tokens"]
    assert sum(pico(r["cost_usd"]) for r in table) == stats["billed_pico"]
    assert summary_of(tmp_path / "packs.parquet")["tokens"]["cached"] == stats["cached_tokens"]


def test_a_fleet_prices_cached_tokens_at_each_endpoints_price(sandbox_factory: Any, tmp_path: Path) -> None:
    prices = {"one": ("0.50", "1.00", "0.10"), "two": ("0.40", "0.80", "0.25")}
    boxes = {
        name: sandbox_factory(latency=0.05, prices=tuple(int(Decimal(p) * 10**6) for p in ps))
        for name, ps in prices.items()
    }
    fleet = tmp_path / "fleet.toml"
    fleet.write_text("".join(
        f'[[endpoint]]\nname = "{name}"\nprovider = "openai"\nendpoint = "{boxes[name].openai_url}"\n'
        f'key_env = "{name.upper()}_KEY"\nmodel = "gpt-4o-mini"\nconcurrency = 16\ninput_price = "{i}"\n'
        f'output_price = "{o}"\ncached_input_price = "{c}"\n\n'
        for name, (i, o, c) in prices.items()
    ))  # fmt: skip
    args = job_args(tmp_path, 200, "fleet.parquet")
    result = run_cli(
        [*args, "--fleet", str(fleet)], env={f"{n.upper()}_KEY": b.key for n, b in boxes.items()}
    )
    assert result.exit_code == 0, result.output
    table = read_output(tmp_path / "fleet.parquet").to_pylist()
    for name, box in boxes.items():
        mine = [r for r in table if r["endpoint"] == name]
        stats = box.sandbox.stats
        assert sum(r["cached_tokens"] for r in mine) == stats["cached_tokens"] > 0
        assert sum(pico(r["cost_usd"]) for r in mine) == stats["billed_pico"]


def test_models_lists_the_cached_input_price_and_the_flag_sets_one(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    listed = run_cli(["models"]).output
    line = next(x for x in listed.splitlines() if " gpt-4o-mini " in x)
    assert line.split()[2:5] == ["0.15", "0.075", "0.60"]
    assert "cached $/M" in listed
    # --cached-input-price wins over the table's; the bill at that price is the cost exactly.
    box = sandbox_factory(prices=(MINI.input_pico, MINI.output_pico, 20_000))
    args = job_args(tmp_path, 30, "own.parquet", "--cached-input-price", "0.02", "--concurrency", "4")
    assert run_cli(args, env=box.openai_env()).exit_code == 0
    table = read_output(tmp_path / "own.parquet").to_pylist()
    assert box.sandbox.stats["cached_tokens"] > 0
    assert sum(pico(r["cost_usd"]) for r in table) == box.sandbox.stats["billed_pico"]
    bad = run_cli([*job_args(tmp_path, 3, "bad.parquet"), "--cached-input-price", "cheap"])
    assert bad.exit_code == 2 and "--cached-input-price" in bad.output and "Traceback" not in bad.output


def test_a_cached_input_price_above_the_input_price_is_refused(sandbox: Any, tmp_path: Path) -> None:
    """A cached prompt token costs at most an uncached one: a flag, job key or fleet key that says
    otherwise is bad input, refused in one line naming both prices, before anything is sent."""
    flag = run_cli(job_args(tmp_path, 3, "o.parquet", "--cached-input-price", "5"), env=sandbox.openai_env())
    assert flag.exit_code == 2 and flag.output.strip().splitlines() == [
        "batchllm: error: --cached-input-price 5 is above the input price 0.15 of gpt-4o-mini (USD per "
        "million tokens): a prompt token served from the cache costs at most an uncached one"
    ], flag.output
    same = run_cli(
        job_args(tmp_path, 3, "same.parquet", "--cached-input-price", "0.15"), env=sandbox.openai_env()
    )
    assert same.exit_code == 0, same.output  # the input price itself: no discount, allowed
    job = tmp_path / "job.toml"
    job.write_text(
        f'input = "{tmp_path / "reviews.csv"}"\noutput = "{tmp_path / "j.parquet"}"\ntemplate = "R: {{text}}"\n'
        'provider = "openai"\nmodel = "gpt-4o-mini"\ninput_price = "0.31"\noutput_price = "1"\n'
        'cached_input_price = "5"\n'
    )
    checked = run_cli(["validate", str(job)])
    assert checked.exit_code == 2 and f"{job}: key 'cached_input_price' 5 is above the input price 0.31" in (
        checked.output
    ), checked.output
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        '[[endpoint]]\nname = "a"\nprovider = "openai"\nendpoint = "http://127.0.0.1:9/v1"\n'
        'model = "gpt-4o-mini"\ncached_input_price = "0.2"\n'
    )
    fleeted = run_cli([*job_args(tmp_path, 3, "f.parquet"), "--fleet", str(fleet)])
    assert fleeted.exit_code == 2 and "cached_input_price 0.2 is above the input price 0.15" in fleeted.output
    assert sandbox.count() == 3 and "Traceback" not in fleeted.output + checked.output


def test_a_server_without_a_prompt_cache_bills_the_input_price(sandbox_factory: Any, tmp_path: Path) -> None:
    box = sandbox_factory(prices=BILL, prompt_cache=False)
    result = run_cli(job_args(tmp_path, 20, "plain.parquet", "--concurrency", "4"), env=box.openai_env())
    assert result.exit_code == 0, result.output
    table = read_output(tmp_path / "plain.parquet").to_pylist()
    assert all(r["cached_tokens"] == 0 for r in table) and "prompt cache" not in result.output
    assert sum(pico(r["cost_usd"]) for r in table) == box.sandbox.stats["billed_pico"]


def test_rows_answered_by_an_identical_row_count_no_cached_tokens(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    box = sandbox_factory(prices=BILL)
    data = write_csv(tmp_path / "dup.csv", [{"text": f"review {i % 10}"} for i in range(40)])
    args = ["run", str(data), "-o", str(tmp_path / "dup.parquet"), "--template", "Review: {text}",
            "--system", long_system(), "--provider", "openai", "--model", "gpt-4o-mini", "--rpm", "0"]  # fmt: skip
    assert run_cli(args, env=box.openai_env()).exit_code == 0
    table = read_output(tmp_path / "dup.parquet").to_pylist()
    assert sum(1 for r in table if r["answered_by"]) == 30
    assert sum(r["cached_tokens"] for r in table) == box.sandbox.stats["cached_tokens"] > 0
    assert sum(pico(r["cost_usd"]) for r in table) == box.sandbox.stats["billed_pico"]


def test_a_request_file_of_two_prefixes_warms_each_once(sandbox_factory: Any, tmp_path: Path) -> None:
    """Lines alternating between two long system prompts: each prefix warmed up once, its rows kept
    together and keyed apart, so all but two requests find their prefix cached."""
    box = sandbox_factory(latency=0.1, prices=BILL, keep_bodies=True)
    systems = [long_system(), "Another job entirely. " + long_system()]
    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "gpt-4o-mini", "max_tokens": 16,
                  "messages": [{"role": "system", "content": systems[i % 2]}, {"role": "user", "content": f"row {i}"}]}}
        for i in range(100)
    ]  # fmt: skip
    requests = tmp_path / "req.jsonl"
    requests.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines))
    args = ["run", str(requests), "-o", str(tmp_path / "req.parquet"), "--provider", "openai", "--rpm", "0",
            "--concurrency", "32"]  # fmt: skip
    result = run_cli(args, env=box.openai_env())
    assert result.exit_code == 0, result.output
    table = read_output(tmp_path / "req.parquet").to_pylist()
    cached = [r["cached_tokens"] for r in table]
    assert cached.count(0) == 2  # one warm-up per prefix
    assert sum(cached) == box.sandbox.stats["cached_tokens"]
    assert sum(pico(r["cost_usd"]) for r in table) == box.sandbox.stats["billed_pico"]
    keys = [orjson.loads(b)["prompt_cache_key"] for b in box.sandbox.bodies]
    assert len(set(keys)) == 2


@pytest.mark.parametrize("pack", [None, "5"], ids=["rows", "labels_in_packs"])
def test_an_imported_batch_costs_the_bill_at_the_batchs_cached_price(
    sandbox_factory: Any, tmp_path: Path, pack: str | None
) -> None:
    # A batch API reports cached prompt tokens as a live one does, and bills them at its own
    # cached price (half the live one): the imported rows carry them and cost the bill exactly.
    batch = load_models("openai")["gpt-4o-mini"].batch_prices
    assert batch is not None and batch.cached_input_pico < batch.input_pico
    box = sandbox_factory(prices=(batch.input_pico, batch.output_pico, batch.cached_input_pico))
    data = write_csv(
        tmp_path / "reviews.csv", [{"id": i, "text": f"review {i}: it works"} for i in range(40)]
    )
    job = [
        "--template", "Review: {text}", "--system", long_system(), "--id-column", "id",
        "--provider", "openai", "--model", "gpt-4o-mini",
        *(["--labels", "positive,negative", "--pack", pack] if pack else []),
    ]  # fmt: skip
    requests, results, errors = tmp_path / "req.jsonl", tmp_path / "res.jsonl", tmp_path / "err.jsonl"
    exported = run_cli(["export-batch", str(data), *job, "-o", str(requests)])
    assert exported.exit_code == 0, exported.output
    # Each line as a live run sends it: one prompt_cache_key for the job's one prefix.
    bodies = [orjson.loads(line)["body"] for line in requests.read_text().splitlines()]
    assert len({b.get("prompt_cache_key") for b in bodies}) == 1 and bodies[0]["prompt_cache_key"]
    answer_batch(box, requests, results, errors)  # one by one: each after the first finds the prefix
    out = tmp_path / "imported.parquet"
    result = run_cli(["import-batch", str(results), str(errors), "--input", str(data), *job, "-o", str(out)])
    assert result.exit_code == 0, result.output
    table = read_output(out).to_pylist()
    stats = box.sandbox.stats
    assert stats["cached_tokens"] > 0
    assert sum(r["cached_tokens"] for r in table) == stats["cached_tokens"]  # the server's count
    assert sum(pico(r["cost_usd"]) for r in table) == stats["billed_pico"]  # the bill, exactly
    summary = summary_of(out)
    assert pico(summary["cost_usd"]["total"]) == stats["billed_pico"]
    # What the cache saved, at the batch's prices too (it was said at the live ones: twice this).
    saved = stats["cached_tokens"] * (batch.input_pico - batch.cached_input_pico)
    assert pico(summary["tokens"]["cached_saved_usd"]) == saved
    assert "prompt cache:" in result.output


@pytest.mark.parametrize("pack", [[], ["--pack", "10"]], ids=["alone", "packed"])
def test_a_pilots_expected_cost_is_at_the_cached_price(
    sandbox_factory: Any, tmp_path: Path, pack: list[str]
) -> None:
    """A pilot of a job whose long shared instruction the server caches: the expected cost is
    what the run then costs within 10%, not the price of uncached prompts (it said 1.8x the
    bill), and one row a request, its interval holds the run's cost."""
    # A Llama model at given prices: its token counts are exact, so the prompt's part is too.
    box = sandbox_factory(latency=0.05, prices=(310_000, 340_000, 155_000))
    args = job_args(tmp_path, 400, "pilot.parquet", "--concurrency", "16", "--labels",
                    "positive,negative,neutral", "--max-tokens", "16", "--input-price", "0.31",
                    "--output-price", "0.34", "--cached-input-price", "0.155", *pack)  # fmt: skip
    args[args.index("gpt-4o-mini")] = "meta/llama-3.1-70b-instruct"
    estimate = ["estimate", *args[1:], "--pilot", "60", "--format", "json"]
    e = orjson.loads(run_cli(estimate, env=box.openai_env()).stdout)
    money = e["cost_usd"]
    assert "prompt_cache" in e, e
    ran = run_cli(args, env=box.openai_env())
    assert ran.exit_code == 0, ran.output
    paid = pico(summary_of(tmp_path / "pilot.parquet")["cost_usd"]["total"])
    assert paid == box.sandbox.stats["billed_pico"]
    low, expected, high = (pico(money[k]) for k in ("expected_low", "expected", "expected_high"))
    assert abs(expected - paid) / paid < 0.1, (money, paid)
    if not pack:  # packs share more than the instruction: a little more is cached than projected
        assert low <= paid <= high, (money, paid)


def test_rows_re_asked_on_a_later_run_keep_their_earlier_cached_tokens(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """Labels read again under a smaller set (--reparse), then the invalid rows re-asked
    (--retry-errors): each row's cached tokens are all its requests' (its first reply's were
    counted 0 once it was re-asked, while its cost kept them), so the column, the summary and
    the saving add up to the server's count."""
    box = sandbox_factory(prices=BILL)
    out = tmp_path / "relabel.parquet"
    three = job_args(tmp_path, 120, out.name, "--concurrency", "8", "--max-tokens", "8")
    assert run_cli([*three, "--labels", "positive,negative,neutral"], env=box.openai_env()).exit_code in (
        0,
        1,
    )
    two = [*three, "--labels", "positive,negative"]
    assert run_cli([*two, "--reparse"], env=box.openai_env()).exit_code in (0, 1)
    reasked = run_cli([*two, "--retry-errors"], env=box.openai_env())
    assert reasked.exit_code in (0, 1), reasked.output
    table = read_output(out).to_pylist()
    stats = box.sandbox.stats
    assert any(r["reasks"] for r in table)
    assert sum(r["cached_tokens"] for r in table) == stats["cached_tokens"] > 0
    assert sum(pico(r["cost_usd"]) for r in table) == stats["billed_pico"]
    assert summary_of(out)["tokens"]["cached"] == stats["cached_tokens"]


def test_a_pilot_scales_guessed_prompt_tokens_by_what_the_server_counted(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """gpt-4o-mini's tokens are guessed (about 4 bytes a token), and a long shared instruction
    makes the guess wrong by the same share on every row. A pilot's rows carry the server's own
    count: the expected cost scales by it, within 5% of the bill (at the guess it was over 10%
    off, with an interval of zero width), and the text says so."""
    box = sandbox_factory(latency=0.02, prices=BILL)
    args = job_args(tmp_path, 300, "pilot.parquet", "--concurrency", "16", "--labels", "positive,negative")
    estimate = ["estimate", *args[1:], "--pilot", "40"]
    said = run_cli([*estimate, "--format", "json"], env=box.openai_env())
    assert said.exit_code == 0, said.output
    e = orjson.loads(said.stdout)
    assert e["prompt_scale"]["rows"] == 40 and abs(e["prompt_scale"]["ratio"] - 1) > 0.1, e["prompt_scale"]
    assert (
        "prompt tokens as the server counted 40 sent rows" in run_cli(estimate, env=box.openai_env()).output
    )
    ran = run_cli(args, env=box.openai_env())
    assert ran.exit_code == 0, ran.output
    paid = pico(summary_of(tmp_path / "pilot.parquet")["cost_usd"]["total"])
    assert paid == box.sandbox.stats["billed_pico"]
    expected = pico(e["cost_usd"]["expected"])
    assert abs(expected - paid) / paid < 0.05, (e["cost_usd"], paid)
    guessed = pico(e["cost_usd"]["prompt"])  # the prompts at the guess alone
    assert abs(guessed - paid) / paid > 0.1, (e["cost_usd"], paid)


def test_a_long_instruction_at_the_head_of_a_template_is_cached_as_a_system_prompt_is(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """The same instruction at the start of --template-file instead of --system: the server
    caches it token by token inside the row's message (it reported 0 for all 200 rows), batchllm
    warms it up and keys it, the estimate projects it, and the cost is the bill exactly."""
    box = sandbox_factory(latency=0.2, prices=BILL, keep_bodies=True)
    template = tmp_path / "template.txt"
    template.write_text(long_system() + "\n\nReview: {text}\n")
    args = job_args(tmp_path, 300, "head.parquet", "--concurrency", "64")
    args[args.index("--system") : args.index("--system") + 2] = []
    args[args.index("--template") : args.index("--template") + 2] = ["--template-file", str(template)]
    said = orjson.loads(run_cli(["estimate", *args[1:], "--format", "json"], env=box.openai_env()).stdout)
    projected = said["prompt_cache"]
    result = run_cli(args, env=box.openai_env())
    assert result.exit_code == 0, result.output
    table = read_output(tmp_path / "head.parquet").to_pylist()
    stats = box.sandbox.stats
    cached = [r["cached_tokens"] for r in table]
    cacheable = max(cached)
    assert 1024 <= cacheable < table[0]["prompt_tokens"] and cacheable % 128 == 0
    # Warmed up: one request paid the prefix in full, every other found it cached.
    assert sum(cached) == cacheable * (len(table) - 1) == stats["cached_tokens"], (sum(cached), cacheable)
    # Projected from gpt-4o-mini's guessed counts (4 bytes a token), the same share of the prompts.
    assert projected["prefix_tokens"] >= 1024 and projected["share"] > 0.9, projected
    assert sum(pico(r["cost_usd"]) for r in table) == stats["billed_pico"]
    keys = {orjson.loads(b).get("prompt_cache_key") for b in box.sandbox.bodies}
    assert len(keys) == 1 and None not in keys


def test_a_pilot_on_a_server_that_caches_nothing_expects_no_hit(sandbox_factory: Any, tmp_path: Path) -> None:
    """The estimate projects the shared instruction as cached (OpenAI caches it); a server without
    a prompt cache billed about twice the expected cost. A pilot that saw no cached token says so,
    and the expected cost assumes no hit: within 5% of the bill."""
    box = sandbox_factory(latency=0.02, prices=BILL, prompt_cache=False)
    args = job_args(tmp_path, 200, "nocache.parquet", "--concurrency", "16", "--labels", "positive,negative")
    estimate = ["estimate", *args[1:], "--pilot", "30"]
    e = orjson.loads(run_cli([*estimate, "--format", "json"], env=box.openai_env()).stdout)
    assert e["prompt_cache"]["server_cached_none_of"] == 30, e["prompt_cache"]
    assert "but the server cached none of the 30 rows sent" in run_cli(estimate, env=box.openai_env()).output
    ran = run_cli(args, env=box.openai_env())
    assert ran.exit_code == 0, ran.output
    paid = pico(summary_of(tmp_path / "nocache.parquet")["cost_usd"]["total"])
    assert paid == box.sandbox.stats["billed_pico"] and box.sandbox.stats["cached_tokens"] == 0
    assert abs(pico(e["cost_usd"]["expected"]) - paid) / paid < 0.05, (e["cost_usd"], paid)


def test_a_long_system_prompt_from_a_file_is_sent_whole_and_resumed_by_its_name(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """--system-file: the file's text is the system prompt (cached as --system's is), and the
    command to resume with names the file: with `--system "$(cat f)"` it held 10 KB of text."""
    box = sandbox_factory(prices=BILL, keep_bodies=True)
    instruction = tmp_path / "instruction.txt"
    instruction.write_text(long_system())
    args = job_args(tmp_path, 60, "file.parquet", "--concurrency", "8", "--max-cost-per-run", "0.003")
    args[args.index("--system") : args.index("--system") + 2] = ["--system-file", str(instruction)]
    stopped = spawn(args, env=box.openai_env())
    _, err = stopped.communicate(timeout=120)
    assert stopped.returncode == 3, err  # the cap stops it part-way: rows are left to resume
    system = {orjson.loads(b)["messages"][0]["content"] for b in box.sandbox.bodies}
    assert system == {long_system()}
    assert box.sandbox.stats["cached_tokens"] > 0
    said = run_cli(["status", str(tmp_path / "file.parquet")]).output
    resume = next(line for line in said.splitlines() if line.startswith("resume with: "))
    assert f"--system-file {instruction}" in resume and len(resume) < 600, resume
    both = run_cli([*args, "--system", "hi"], env=box.openai_env())
    assert both.exit_code == 2 and "give --system or --system-file, not both" in both.stderr


def test_a_system_flag_stands_over_the_job_files_system_file_and_the_other_way_round(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """Flags override a job file's keys: --system-file over its `system`, --system over its
    `system_file` (refused as "give ... not both", in words naming neither rightly); both keys in
    one file are refused, naming the file."""
    box = sandbox_factory(keep_bodies=True)
    write_csv(tmp_path / "rows.csv", [{"text": "it works"}])
    (tmp_path / "instruction.txt").write_text("From the file.")
    for n, (keys, flag, sent) in enumerate(
        [
            (
                'system = "From the job."',
                ["--system-file", str(tmp_path / "instruction.txt")],
                "From the file.",
            ),
            ('system_file = "instruction.txt"', ["--system", "From the flag."], "From the flag."),
        ]
    ):
        job = tmp_path / f"job{n}.toml"
        job.write_text(f'input = "rows.csv"\noutput = "o{n}.parquet"\ntemplate = "{{text}}"\n{keys}\n')
        ran = run_cli(
            ["run", "--job", str(job), "--rpm", "0", "--provider", "openai", *flag], env=box.openai_env()
        )
        assert ran.exit_code == 0, ran.output
        assert orjson.loads(box.sandbox.bodies[-1])["messages"][0]["content"] == sent
    both = tmp_path / "both.toml"
    both.write_text(
        'input = "rows.csv"\noutput = "b.parquet"\ntemplate = "{text}"\nsystem = "x"\nsystem_file = "instruction.txt"\n'
    )
    said = run_cli(["validate", str(both)])
    assert said.exit_code == 2 and f"{both}: give key 'system' or 'system_file', not both" in said.output
