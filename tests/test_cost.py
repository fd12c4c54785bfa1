"""Cost you can trust: exact estimates and a budget that is never exceeded (issue 5)."""

from __future__ import annotations

import itertools
import json
import random
import re
import shlex
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pyarrow.parquet as pq

from batchllm.reports.svg import money

from .conftest import ROOT, SandboxThread, prompts_csv, run_cli, spawn, summary_of, write_csv

TEMPLATE = "Classify the sentiment of this review: {review}"


def test_estimate_of_the_page_example(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "page.csv", [{"prompt": "What is Deep Learning"}])
    result = run_cli(
        [
            "estimate",
            str(src),
            "--system",
            "You are an expert deep learning engineer",
            "--max-tokens",
            "512",
            "--format",
            "json",
        ]
    )
    assert result.exit_code == 0, result.stderr
    e = json.loads(result.stdout)
    assert e["prompt_tokens"]["total"] == 27
    assert e["cost_usd"]["worst_case"] == "0.00018245"
    text = run_cli(
        ["estimate", str(src), "--system", "You are an expert deep learning engineer", "--max-tokens", "512"]
    )
    assert "27" in text.stdout and "$0.00018245" in text.stdout


def test_estimate_equals_what_the_api_bills_row_by_row(sandbox, tmp_path: Path) -> None:
    sample = ROOT / "sample_data" / "reviews.csv"
    out = tmp_path / "out.parquet"
    est = run_cli(["estimate", str(sample), "--template", TEMPLATE, "--format", "json"])
    assert est.exit_code == 0, est.stderr
    run = run_cli(
        ["run", str(sample), "-o", str(out), "--template", TEMPLATE, "--rpm", "0"], env=sandbox.env()
    )
    assert run.exit_code == 0, run.stderr
    billed = pq.read_table(out).column("prompt_tokens").to_pylist()
    assert json.loads(est.stdout)["prompt_tokens"]["total"] == sum(t or 0 for t in billed)  # 1 empty: None
    # Row by row: the counter the estimate uses against the sandbox's usage.
    from batchllm.tokens import get_counter

    rows = [r for r in pq.read_table(out).to_pylist() if r["review"]]  # an empty review is not sent
    paid = [r for r in rows if not r["answered_by"]]  # identical prompts are sent (and billed) once
    assert len(paid) < len(rows)
    assert [get_counter().count(TEMPLATE.format(review=r["review"])) for r in paid] == [
        r["prompt_tokens"] for r in paid
    ]
    expected = run_cli(
        ["estimate", str(sample), "--template", TEMPLATE, "--from-run", str(out), "--format", "json"]
    )
    assert "expected" in json.loads(expected.stdout)["cost_usd"]


def test_rows_over_the_window_are_listed_and_never_sent(sandbox, tmp_path: Path) -> None:
    rows = [{"id": f"r{i}", "prompt": f"short {i}"} for i in range(5)]
    rows[2]["prompt"] = "word " * 25_000
    src = write_csv(tmp_path / "in.csv", rows)
    result = run_cli(["estimate", str(src), "--format", "json"])
    e = json.loads(result.stdout)
    assert e["rows_over_window"] == 1 and e["rows_over_window_ids"][0].startswith("2-")
    out = tmp_path / "out.parquet"
    assert run_cli(["run", str(src), "-o", str(out), "--rpm", "0"], env=sandbox.env()).exit_code == 1
    assert sandbox.count() == 4


def test_max_cost_is_never_exceeded(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(reply_tokens=(150, 400))
    src = prompts_csv(tmp_path / "in.csv", 60)
    rng = random.Random(11)
    for i in range(20):
        cap = Decimal(rng.randint(200, 2000)) / Decimal(10**6)  # $0.0002 .. $0.002
        out = tmp_path / f"out{i}.parquet"
        args = [
            "run",
            str(src),
            "-o",
            str(out),
            "--rpm",
            "0",
            "--max-tokens",
            "400",
            "--max-cost",
            str(cap),
            "--concurrency",
            "16",
        ]
        result = run_cli(args, env=box.env())
        assert result.exit_code == 3, result.stderr
        total = Decimal(summary_of(out)["cost_usd"]["total"])
        assert 0 < total <= cap
        assert "budget reached" in result.stderr and "--max-cost" in result.stderr
    # Raising the cap resumes without re-sending finished rows.
    before = Counter(pq.read_table(out).column("status").to_pylist())["ok"]
    sent = box.count()
    result = run_cli([*args[:-4], "--max-cost", "1", "--concurrency", "16"], env=box.env())
    assert result.exit_code == 0, result.stderr
    assert box.count() - sent == 60 - before


def test_pilot_projects_and_the_run_does_not_pay_twice(sandbox, tmp_path: Path) -> None:
    sample = ROOT / "sample_data" / "reviews.csv"
    out = tmp_path / "out.parquet"
    common = [str(sample), "-o", str(out), "--template", TEMPLATE, "--max-tokens", "64", "--rpm", "0"]
    est = run_cli(["estimate", *common, "--pilot", "20", "--format", "json"], env=sandbox.env())
    assert est.exit_code == 0, est.stderr
    e = json.loads(est.stdout)
    assert e["cost_usd"]["observed_rows"] == 20 and sandbox.count() == 20
    assert (
        Decimal(e["cost_usd"]["expected_low"])
        <= Decimal(e["cost_usd"]["expected"])
        <= Decimal(e["cost_usd"]["expected_high"])
    )
    ran = run_cli(["run", *common], env=sandbox.env())
    assert ran.exit_code == 0, ran.stderr
    # The run's summary sets what the estimate said next to what it cost.
    money = e["cost_usd"]
    assert f"estimated before: expected ${money['expected']}, at most ${money['worst_case']}" in ran.stderr
    rows = pq.read_table(out).to_pylist()
    # The 20 pilot rows were not sent again; identical prompts were sent once; an empty one never.
    assert sandbox.count() == sum(not r["answered_by"] for r in rows if r["review"])
    report = json.loads(run_cli(["report", str(out), "--format", "json"]).stdout)
    versus = report["estimate_vs_actual"]
    assert versus["prompt_tokens"]["estimated"] == versus["prompt_tokens"]["actual"]
    assert versus["cost_usd"]["expected"] == e["cost_usd"]["expected"]


def test_an_estimate_of_a_partly_done_output_says_what_is_left(sandbox, tmp_path: Path) -> None:
    """A run stopped by its cap; `estimate` of the same job then says which rows are done, what
    they paid, and the worst case of the rest, which the run that finishes stays under. An
    estimate of another input is not compared with a run of this one."""
    src, out = prompts_csv(tmp_path / "in.csv", 60), tmp_path / "out.parquet"
    common = [str(src), "-o", str(out), "--rpm", "0", "--max-tokens", "64"]
    stopped = run_cli(["run", *common, "--max-cost", "0.0003"], env=sandbox.env())
    assert stopped.exit_code == 3, stopped.stderr
    paid = Decimal(
        json.loads(run_cli(["report", str(out), "--format", "json"]).stdout)["overall"]["cost_usd"]
    )
    done = Counter(pq.read_table(out).column("status").to_pylist())["ok"]
    assert 0 < done < 60
    e = json.loads(run_cli(["estimate", *common, "--format", "json"], env=sandbox.env()).stdout)
    assert e["rows_to_send"] == 60 and e["rows_already_done"] == done and e["rows_left_to_send"] == 60 - done
    assert Decimal(e["already_paid_usd"]) == paid
    text = run_cli(["estimate", *common], env=sandbox.env()).stdout
    assert (
        f"{done} rows, ${e['already_paid_usd']} paid; {60 - done} left to send, at most ${e['worst_case_left_usd']}"
        in text
    )
    finished = run_cli(["run", *common], env=sandbox.env())
    assert finished.exit_code == 0, finished.stderr
    this_run = Decimal(summary_of(out)["this_run"]["cost_usd"])
    assert 0 < this_run <= Decimal(e["worst_case_left_usd"])
    # The input loses its last 10 rows: what is done of it paid for its 50 rows alone; the
    # journal's figure for the whole output is said apart.
    costs = [Decimal(str(c)) for c in pq.read_table(out).column("cost_usd").to_pylist()]
    src.write_text("".join(src.read_text().splitlines(keepends=True)[:51]))
    e = json.loads(run_cli(["estimate", *common, "--format", "json"], env=sandbox.env()).stdout)
    assert e["rows_already_done"] == 50 and e["rows_left_to_send"] == 0
    assert Decimal(e["already_paid_usd"]) == sum(costs[:50]) < Decimal(e["output_paid_usd"]) == sum(costs)
    text = run_cli(["estimate", *common], env=sandbox.env()).stdout
    assert (
        f"50 rows, ${e['already_paid_usd']} paid (the output's journal: ${e['output_paid_usd']} in all)"
        in text
    )

    other = prompts_csv(tmp_path / "other.csv", 20, start=100)
    later = tmp_path / "later.parquet"
    assert run_cli(["estimate", str(src), "-o", str(later), "--max-tokens", "64"]).exit_code == 0
    ran = run_cli(
        ["run", str(other), "-o", str(later), "--max-tokens", "64", "--rpm", "0"], env=sandbox.env()
    )
    assert ran.exit_code == 0, ran.stderr
    assert "estimated before" not in ran.stderr
    assert "estimate_vs_actual" not in json.loads(run_cli(["report", str(later), "--format", "json"]).stdout)


def test_an_estimate_first_never_stands_in_the_way_of_the_run(sandbox, tmp_path: Path) -> None:
    """`estimate` keeps its figures in the output's journal. A run with other settings (the
    built-in sandbox, an edited template) still starts, as nothing was sent from that journal; the
    estimate stays only if it was of the same requests. A journal with rows still refuses."""
    sample = ROOT / "sample_data" / "reviews.csv"
    out = tmp_path / "out.parquet"
    common = [str(sample), "-o", str(out), "--template", TEMPLATE, "--max-tokens", "16"]
    assert run_cli(["estimate", *common]).exit_code == 0
    assert (tmp_path / "out.parquet.batchllm").is_dir()
    variant = [str(sample), "-o", str(out), "--template", TEMPLATE + " Be brief.", "--max-tokens", "16"]
    assert run_cli(["estimate", *variant]).exit_code == 0  # an estimate of a variant changes nothing
    first = run_cli(["run", *common, "--sandbox", "--rpm", "0"])
    assert first.exit_code == 0, first.stderr
    report = json.loads(run_cli(["report", str(out), "--format", "json"]).stdout)
    versus = report["estimate_vs_actual"]  # the sandbox sends the same requests: the estimate holds
    assert versus["prompt_tokens"]["estimated"] == versus["prompt_tokens"]["actual"]
    # An edited template after an estimate: the run starts, without the other requests' estimate.
    other = tmp_path / "other.parquet"
    assert run_cli(["estimate", str(sample), "-o", str(other), "--template", TEMPLATE]).exit_code == 0
    edited = run_cli(["run", *variant[:1], "-o", str(other), *variant[3:], "--rpm", "0"], env=sandbox.env())
    assert edited.exit_code == 0, edited.stderr
    assert "estimate_vs_actual" not in json.loads(run_cli(["report", str(other), "--format", "json"]).stdout)
    # Once rows were answered, other settings are refused as before.
    refused = run_cli(["run", *common, "--rpm", "0"], env=sandbox.env())
    assert (
        refused.exit_code == 2
        and "the journal was written against the sandbox; this run is a real one" in refused.stderr
    )


def test_pilot_answered_from_the_cache_learns_lengths_and_sends_nothing(sandbox, tmp_path: Path) -> None:
    """A job that has run once (temperature 0, so cached): a pilot into a new output is answered
    from the cache, costs nothing and still learns the replies' lengths, as does --compare."""
    sample = ROOT / "sample_data" / "reviews.csv"
    common = [str(sample), "--template", TEMPLATE, "--max-tokens", "64", "--temperature", "0", "--rpm", "0"]
    first = tmp_path / "first.parquet"
    assert run_cli(["run", *common, "-o", str(first)], env=sandbox.env()).exit_code == 0
    lengths = {
        r["review_id"]: r["completion_tokens"] for r in pq.read_table(first).to_pylist() if r["review"]
    }
    sent = sandbox.count()
    second = ["-o", str(tmp_path / "second.parquet")]
    est = run_cli(["estimate", *common, *second, "--pilot", "20", "--format", "json"], env=sandbox.env())
    assert est.exit_code == 0, est.stderr
    e = json.loads(est.stdout)["cost_usd"]
    assert sandbox.count() == sent and e["observed_rows"] == 20
    assert 0 < e["observed_mean_completion_tokens"] <= max(lengths.values())
    compare = run_cli(["estimate", *common, *second, "--compare", "--format", "json"])
    mine = [m for m in json.loads(compare.stdout)["models"] if m["current"]][0]
    assert mine["expected_usd"] is not None


def test_report_totals_equal_the_column_sums(sandbox, tmp_path: Path) -> None:
    sample = ROOT / "sample_data" / "reviews.csv"
    out = tmp_path / "out.parquet"
    assert (
        run_cli(
            ["run", str(sample), "-o", str(out), "--template", TEMPLATE, "--rpm", "0"], env=sandbox.env()
        ).exit_code
        == 0
    )
    table = pq.read_table(out)
    column_sum = sum(Decimal(repr(v)) for v in table.column("cost_usd").to_pylist() if v is not None)
    result = run_cli(["report", str(out), "--by", "category", "--format", "json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    total = Decimal(report["overall"]["cost_usd"])
    assert abs(total - column_sum) < Decimal("1e-15")
    assert Decimal(report["overall"]["cost_usd"]) == Decimal(summary_of(out)["cost_usd"]["total"])
    assert report["overall"]["prompt_tokens"] == sum(
        t or 0 for t in table.column("prompt_tokens").to_pylist()
    )
    # Per-row percentiles are rows' own costs, not figures between two rows' (...999 picodollars).
    costs = {Decimal(repr(v)) for v in table.column("cost_usd").to_pylist() if v is not None}
    per_row = report["overall"]["cost_per_row_usd"]
    assert Decimal(per_row["p50"]) in costs and Decimal(per_row["p95"]) in costs, per_row
    groups = report["by"]["groups"]
    assert set(groups) == set(table.column("category").to_pylist())
    assert sum(Decimal(g["cost_usd"]) for g in groups.values()) == total
    for fmt in ("text", "markdown", "csv"):
        shown = run_cli(["report", str(out), "--by", "category", "--format", fmt])
        assert shown.exit_code == 0 and report["overall"]["cost_usd"] in shown.stdout
    html = tmp_path / "report.html"
    assert run_cli(["report", str(out), "--by", "category", "--html", str(html)]).exit_code == 0
    page = html.read_text()
    assert page.count("<svg") == 5 and "<script" not in page and "http" not in page.split("<body>")[1]
    assert money(report["overall"]["cost_usd"]) in page  # the page's one money format (svg.money)
    # A run of a second or two draws no throughput line, and says why.
    assert "too short for a throughput line" in page and "<polyline" not in page
    bad = run_cli(["report", str(out), "--by", "nope"])
    assert bad.exit_code == 2 and "no column 'nope'" in bad.stderr


def test_estimate_worst_case_bounds_labeling_runs(sandbox_factory, tmp_path: Path) -> None:
    """20 random labeling jobs (samples, re-asks, label sets, examples, short max_tokens) against a
    model that answers badly: no run costs more than `estimate` said it could."""
    box = sandbox_factory(label_out_of_set=0.5, label_prose=0.2, label_truncated=0.1, seed=3)
    prices = (310_000, 340_000)  # picodollars per input / output token (models.toml)
    rng = random.Random(20)
    words = ["solid", "flimsy", "arrived", "late", "great", "value", "returned", "works", "again"]
    for n in range(20):
        rows = [
            {"id": f"j{n}r{i}", "text": " ".join(rng.choices(words, k=rng.randint(3, 40)))} for i in range(12)
        ]
        src = write_csv(tmp_path / f"in{n}.csv", rows)
        labels = rng.sample(["positive", "negative", "neutral", "mixed", "unclear"], rng.randint(2, 5))
        args = [str(src), "--template", "Classify: {text}", "--id-column", "id", "--labels", ",".join(labels)]
        samples = rng.choice([1, 1, 2, 3])
        args += ["--samples", str(samples), "--reask", str(rng.randint(0, 2))]
        args += [
            "--max-tokens",
            str(rng.choice([4, 8, 16, 48])),
            "--system",
            "Be brief. " * rng.randint(0, 30),
        ]
        if samples >= 3 and rng.random() < 0.5:
            args.append("--adaptive")
        if rng.random() < 0.5:
            examples = [{"text": "fine", "label": labels[0]}, {"text": "awful", "label": labels[1]}]
            args += ["--examples", str(write_csv(tmp_path / f"ex{n}.csv", examples))]
        est = run_cli(["estimate", *args, "--format", "json"])
        assert est.exit_code == 0, est.stderr
        worst = Decimal(json.loads(est.stdout)["cost_usd"]["worst_case"])
        box.sandbox.stats.clear()
        out = tmp_path / f"out{n}.parquet"
        result = run_cli(["run", *args, "-o", str(out), "--rpm", "0", "--cache", "off"], env=box.env())
        assert result.exit_code in (0, 1), result.stderr
        stats = box.sandbox.stats
        billed = stats["prompt_tokens"] * prices[0] + stats["completion_tokens"] * prices[1]
        assert 0 < billed <= worst * 10**12, (n, billed, worst, args)


def test_estimate_compare_lists_every_model_that_fits(tmp_path: Path) -> None:
    """The sample job on every model in `batchllm models`: Llama prompt tokens exact (the same as
    the job's own estimate), batch prices where the provider has them, and why a model does not fit."""
    job = ROOT / "jobs" / "sentiment.toml"
    here = ["-o", str(tmp_path / "o.parquet")]  # not the job's own output, in the checkout
    own = json.loads(run_cli(["estimate", "--job", str(job), *here, "--format", "json"]).stdout)
    result = run_cli(["estimate", "--job", str(job), *here, "--compare", "--format", "json"])
    assert result.exit_code == 0, result.output
    models = {f"{m['provider']}:{m['model']}": m for m in json.loads(result.stdout)["models"]}
    assert set(models) == {"dataoorts:meta/llama-3.1-70b-instruct", "dataoorts:meta/llama-3.1-8b-instruct",
                           "openai:gpt-4o-mini"}  # fmt: skip
    mine = models["dataoorts:meta/llama-3.1-70b-instruct"]
    assert mine["current"] and mine["worst_case_usd"] == own["cost_usd"]["worst_case"]
    assert models["dataoorts:meta/llama-3.1-8b-instruct"]["prompt_tokens"] == own["prompt_tokens"]["total"]
    mini = models["openai:gpt-4o-mini"]
    assert mini["fits"] and mini["rpm"] == 500 and mini["tpm"] == 200_000
    assert Decimal(mini["batch_worst_case_usd"]) * 2 == Decimal(mini["worst_case_usd"])  # half price
    text = run_cli(["estimate", "--job", str(job), *here, "--compare"]).stdout
    assert "gpt-4o-mini" in text and "(this job's)" in text
    # A window too small for the reply, and a parameter only one provider takes.
    big = run_cli(
        ["estimate", "--job", str(job), *here, "--compare", "--max-tokens", "9000", "--format", "json"]
    )
    small = {m["model"]: m for m in json.loads(big.stdout)["models"]}["meta/llama-3.1-8b-instruct"]
    assert not small["fits"] and "8,000-token window" in small["why"]
    top_k = run_cli(["estimate", "--job", str(job), *here, "--compare", "--top-k", "5", "--format", "json"])
    mini = {m["model"]: m for m in json.loads(top_k.stdout)["models"]}["gpt-4o-mini"]
    assert not mini["fits"] and "top_k" in mini["why"]


def test_help_lists_exit_codes_one_line_each() -> None:
    from batchllm.errors import EXIT_CODE_TABLE, ExitCode

    shown = run_cli(["run", "--help"]).stdout
    shown = shown[shown.index("Exit codes:") :]  # an option's help may start a line with a digit too
    for code in ExitCode:
        lines = [line.strip() for line in shown.splitlines() if line.strip().startswith(f"{int(code)} ")]
        table = [
            line.strip() for line in EXIT_CODE_TABLE.splitlines() if line.strip().startswith(f"{int(code)} ")
        ]
        assert lines == table, code


def test_plots_have_round_ticks_and_survive_an_outlier() -> None:
    import numpy as np

    from batchllm.reports import svg

    assert svg.nice_ticks(0.00197) == [0.0, 0.0005, 0.001, 0.0015, 0.002]
    assert svg.nice_ticks(1234) == [0, 500, 1000, 1500]
    assert [svg.money(v) for v in (0, 0.0005, 1.5, 1234.567, "0.000023912")] == [
        "$0", "$0.0005", "$1.50", "$1,234.57", "$0.00002391"]  # fmt: skip
    # An axis's money: one number of decimals on every tick, as many as its step needs.
    for ticks, shown in (([0, 200, 400, 600], ["$0", "$200", "$400", "$600"]),
                         ([0, 0.1, 0.2, 0.3], ["$0", "$0.10", "$0.20", "$0.30"]),
                         ([0, 0.005, 0.01], ["$0", "$0.005", "$0.010"])):  # fmt: skip
        assert [svg.money_format(ticks)(t) for t in ticks] == shown
    # Sixty days under one axis: only as many labels as fit side by side, none past the edge.
    days = [f"2026-10-{d:02d}" if d < 32 else f"2026-11-{d - 31:02d}" for d in range(1, 61)]
    plot = svg.stacked_bars("Spend by day", days, {"job": [1.0] * 60})
    xs = [
        float(x) for x in re.findall(r'<text x="([\d.]+)" y="[\d.]+" text-anchor="\w+" class="l">2026', plot)
    ]
    assert 4 <= len(xs) <= 8 and min(b - a for a, b in itertools.pairwise(xs)) > 10 * svg.CHAR_PX
    # 999 rows of 100 to 200 tokens and one of 1,000,000: the bins still cover 100 to 200.
    values = np.concatenate([np.linspace(100, 200, 999), [1_000_000.0]])
    page = svg.histogram("Prompt tokens per row", values, "prompt tokens")
    assert "1 over 200" in page and "up to 1e+06" in page
    assert ">100<" in page and ">200<" in page and ">1,000,000<" not in page


def test_pack_pilots_answered_from_the_cache_are_projected_as_if_sent(sandbox, tmp_path: Path) -> None:
    """After a --pack 10 run of the job (temperature 0: cached), a pilot at sizes 1 and 10 is
    answered from the cache at size 10: its line counts those replies' requests, tokens and cost
    as if sent, never 0 requests and $0 projected, and says so."""
    job = ["--job", str(ROOT / "jobs" / "sentiment.toml"), "--rpm", "0"]
    ran = run_cli(["run", *job, "--pack", "10", "-o", str(tmp_path / "p10.parquet")], env=sandbox.env())
    assert ran.exit_code == 0, ran.stderr
    sent = sandbox.count()
    pilot = [
        *job,
        "--pilot",
        "60",
        "--gold",
        "human_label",
        "--pack",
        "1,10",
        "-o",
        str(tmp_path / "o.parquet"),
    ]
    table = run_cli(["estimate", *pilot, "--format", "json"], env=sandbox.env())
    assert table.exit_code == 0, table.stderr
    sizes = {x["pack"]: x for x in json.loads(table.stdout)["sizes"]}
    assert sandbox.count() - sent == sizes[1]["requests"] == 60  # size 1: sent, one row a request
    ten = sizes[10]
    assert ten["replies_from_cache"] == 60 and Decimal(ten["pilot_cost_usd"]) == 0
    assert ten["requests"] == 6 and ten["prompt_tokens_per_row"] > 0
    assert 0 < Decimal(ten["projected_cost_usd"]) < Decimal(sizes[1]["projected_cost_usd"])
    text = run_cli(["estimate", *pilot], env=sandbox.env())  # the pilots' rows are done: nothing sent
    assert text.exit_code == 0 and sandbox.count() - sent == 60
    assert "answered from the cache: pack 10 (60 replies); counted as if sent" in text.stdout
    # A pilot answered from the cache still takes a request a row, at least.
    single = run_cli(["estimate", *job, "--pilot", "30", "-o", str(tmp_path / "s.parquet"), "--format", "json"],
                     env=sandbox.env())  # fmt: skip
    assert single.exit_code == 0, single.stderr
    assert json.loads(single.stdout)["requests"]["expected_per_row"] >= 1


def test_a_plain_estimate_speaks_of_no_reasks(tmp_path: Path) -> None:
    sample = str(ROOT / "sample_data" / "reviews.csv")
    plain = run_cli(["estimate", sample, "--template", TEMPLATE, "--max-tokens", "16"])
    assert plain.exit_code == 0, plain.stderr
    assert "worst case (every reply 16 tokens)" in plain.stdout and "re-ask" not in plain.stdout
    labeled = run_cli(["estimate", sample, "--template", TEMPLATE, "--max-tokens", "16", "--labels", "a,b"])
    assert "worst case (every request re-asked, every reply 16 tokens)" in labeled.stdout


def _suggested(stderr: str) -> list[str]:
    """The command a budget stop says to run next, as its arguments (without ``batchllm``)."""
    line = next(x for x in stderr.splitlines() if x.startswith("to continue, run it with"))
    return shlex.split(line.split(": ", 1)[1])[1:]


def test_a_budget_stop_says_why_and_the_cap_it_suggests_finishes(sandbox, tmp_path: Path) -> None:
    """A stop names the next request's worst case against what is left; the command it suggests
    (the same one with a --max-cost that covers the rows left) finishes the output, under that cap.
    ``status`` gives the same command until the next run. A cap under one request's worst case
    sends nothing, says so, and suggests the cap that finishes every row at its worst case."""
    src = prompts_csv(tmp_path / "in.csv", 200)
    out = tmp_path / "out.parquet"
    args = ["run", str(src), "-o", str(out), "--rpm", "0", "--progress", "none", "--max-tokens", "64"]
    first = spawn([*args, "--max-cost", "0.0012"], env=sandbox.env())
    _, err = first.communicate(timeout=120)
    assert first.returncode == 3, err
    assert re.search(r"the next request may cost up to \$[0-9.]+, more than the \$[0-9.]+ left", err), err
    suggested = _suggested(err)
    status = run_cli(["status", str(out)]).stdout  # says the same until the next run
    assert status.rstrip().endswith(shlex.join(["batchllm", *suggested])), status
    cap = Decimal(suggested[suggested.index("--max-cost") + 1])
    assert cap > Decimal("0.0012") and suggested.count("--max-cost") == 1
    second = spawn(suggested, env=sandbox.env())
    _, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    summary = summary_of(out)
    assert summary["rows"]["ok"] == 200 and Decimal(summary["cost_usd"]["total"]) <= cap

    tiny = tmp_path / "tiny.parquet"
    sent = sandbox.count()
    third = spawn(
        ["run", str(src), "-o", str(tiny), "--progress", "none", "--max-cost", "0.00001"], env=sandbox.env()
    )
    _, err = third.communicate(timeout=120)
    assert third.returncode == 3 and sandbox.count() == sent, err
    assert "more than the whole $0.00001 cap" in err
    assert "covers the 200 rows left at the next one's worst case, every reply max_tokens long" in err
    fourth = spawn(_suggested(err), env=sandbox.env())
    _, err = fourth.communicate(timeout=120)
    assert fourth.returncode == 0 and summary_of(tiny)["rows"]["ok"] == 200, err  # sure to finish


def _reviews(path: Path, edited: range = range(0)) -> Path:
    """300 short reviews to label, those at ``edited`` with other text (an input changed since)."""
    moods = ["great", "bad", "fine"]
    return write_csv(
        path,
        [
            {"id": f"id{i}", "text": f"{'edited ' * (i in edited)}review {i}: it was {moods[i % 3]}"}
            for i in range(300)
        ],
    )


def _stop_then_suggested(box: SandboxThread, args: list[str], room: str) -> tuple[str, list[str]]:
    """Run ``args`` with a --max-cost ``room`` dollars over what the output has cost: it stops at
    that cap (exit 3); its summary, and the command it suggests, whose cap is over the one given
    and whose flags are each given once, as in the command ``status`` suggests."""
    out = Path(args[args.index("-o") + 1])
    cap = Decimal(summary_of(out)["cost_usd"]["total"]) + Decimal(room)
    stopped = spawn([*args, "--max-cost", str(cap)], env=box.env())
    _, err = stopped.communicate(timeout=120)
    assert stopped.returncode == 3, err
    suggested = _suggested(err)
    assert Decimal(suggested[suggested.index("--max-cost") + 1]) > cap, err
    status = run_cli(["status", str(out)]).stdout
    assert status.rstrip().endswith(shlex.join(["batchllm", *suggested])), status
    flags = [a for a in suggested if a.startswith("--")]
    assert sorted(flags) == sorted(set(flags)), suggested
    return err, suggested


def test_a_budget_stop_retrying_rows_suggests_a_cap_that_finishes_them(
    sandbox_factory, tmp_path: Path
) -> None:
    """With --retry-errors the invalid rows keep their entries until sent again: a cap that stops
    them counts them as left (the summary, `status`) and suggests a higher cap than the one that
    stopped it, which the suggested command then does not hit again (a cron loop's exit 3)."""
    box = sandbox_factory(label_out_of_set=0.1)
    src = _reviews(tmp_path / "in.csv")
    out = tmp_path / "re.parquet"
    args = ["run", str(src), "-o", str(out), "--template", "Classify: {text}", "--labels",
            "positive,negative,neutral", "--reask", "0", "--rpm", "0", "--progress", "none"]  # fmt: skip
    assert run_cli(args, env=box.env()).exit_code == 1
    invalid = summary_of(out)["rows"]["invalid"]
    assert invalid > 3
    err, suggested = _stop_then_suggested(box, [*args, "--retry-errors"], "0.00015")
    left = summary_of(out)["rows"]
    assert left["pending"] == 0 and left["to_send_again"] == left["invalid"] > 0, left
    assert f"of 300 rows, {left['invalid']:,} of them left to send again" in err
    assert f"covers the {left['invalid']:,} rows to send again, at the next request's worst case" in err
    status = run_cli(["status", str(out)]).stdout
    assert f"{left['invalid']:,} not done of 300" in status, status
    again = spawn(suggested, env=box.env())
    _, err = again.communicate(timeout=120)
    assert again.returncode in (0, 1), err
    assert summary_of(out)["complete"] is True
    status = run_cli(["status", str(out)]).stdout  # rows still invalid: the same command, flag once
    line = next((x for x in status.splitlines() if x.startswith("send the failed rows again")), "")
    assert line.count("--retry-errors") == (1 if summary_of(out)["rows"]["invalid"] else 0), status


def test_a_budget_stop_refreshing_changed_rows_suggests_a_cap_that_finishes_them(
    sandbox, tmp_path: Path
) -> None:
    """With --refresh-changed, rows whose input changed under their id keep their old answers
    until sent again: a cap that stops them counts the rest as left and suggests a higher cap."""
    src = _reviews(tmp_path / "in.csv")
    out = tmp_path / "ch.parquet"
    args = ["run", str(src), "-o", str(out), "--template", "Classify: {text}", "--labels",
            "positive,negative,neutral", "--rpm", "0", "--progress", "none", "--id-column", "id"]  # fmt: skip
    assert run_cli(args, env=sandbox.env()).exit_code == 0
    _reviews(src, edited=range(100, 140))
    err, suggested = _stop_then_suggested(sandbox, [*args, "--refresh-changed"], "0.00015")
    left = summary_of(out)["rows"]
    assert left["pending"] == 0 and 0 < left["to_send_again"] < 40, left
    status = run_cli(["status", str(out)]).stdout
    assert f"{left['to_send_again']:,} not done of 300" in status, status
    again = spawn(suggested, env=sandbox.env())
    _, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    assert f"{left['to_send_again']:,} to send" in err and summary_of(out)["complete"] is True
    assert "0 not done of 300" in run_cli(["status", str(out)]).stdout
    sent = sandbox.count()  # every changed row was answered again: nothing is left to send
    assert run_cli([*args, "--refresh-changed"], env=sandbox.env()).exit_code == 0 and sandbox.count() == sent


def test_an_estimate_without_a_rate_says_the_server_sets_the_pace(tmp_path: Path) -> None:
    """--rpm 0 sets no rate: the estimate gives no time from the provider's documented one."""
    src = prompts_csv(tmp_path / "in.csv", 30)
    text = run_cli(["estimate", str(src), "--rpm", "0"]).output
    assert "no rate set (--rpm 0): as fast as the server answers" in text and "requests/min" not in text
    assert (
        json.loads(run_cli(["estimate", str(src), "--rpm", "0", "--format", "json"]).output)["time"][
            "minutes"
        ]
        is None
    )
    text = run_cli(["estimate", str(src), "--rpm", "0", "--tpm", "60000"]).output
    assert "time at 60,000 tokens/min" in text and "requests/min" not in text
    assert "time at 60 requests/min" in run_cli(["estimate", str(src), "--rpm", "60"]).output


def test_estimate_of_a_request_file_takes_each_lines_max_tokens(sandbox, tmp_path: Path) -> None:
    """A request file's lines carry their own max_tokens (or max_completion_tokens): the worst case
    is each line's own, as run reserves it; a line without one takes --max-tokens."""
    caps = [
        {"max_tokens": 1},
        {"max_tokens": 100},
        {"max_completion_tokens": 4000},
        {},
        {"max_tokens": 30000},
    ]
    src = tmp_path / "req.jsonl"
    src.write_text(
        "".join(
            json.dumps(
                {"custom_id": f"q{i}", "body": {"messages": [{"role": "user", "content": f"Say {i}"}], **cap}}
            )
            + "\n"
            for i, cap in enumerate(caps)
        )
    )
    args = ["estimate", str(src), "--max-tokens", "300", "--input-price", "3", "--output-price", "15"]
    e = json.loads(run_cli([*args, "--format", "json"]).stdout)
    # The last line's 30,000 does not fit the model's 25,000-token window: not sent, not counted.
    assert e["rows_over_window"] == 1 and e["rows_over_window_ids"] == ["q4"]
    assert e["tokens_worst_case"]["completion"] == 1 + 100 + 4000 + 300
    exact = (Decimal(e["prompt_tokens"]["total"]) * 3 + (1 + 100 + 4000 + 300) * 15) / 10**6
    assert Decimal(e["cost_usd"]["worst_case"]) == exact
    assert e["max_tokens_of_lines"] == {"min": 1, "max": 4000, "mean": 1100.2}
    text = run_cli(args).stdout
    assert "worst case (every reply at its line's max_tokens, 1 to 4,000)" in text and "256" not in text
    # The expected cost of a run's observed lengths stays within each line's own cap.
    out = tmp_path / "out.parquet"
    ran = run_cli(["run", str(src), "-o", str(out), *args[2:], "--rpm", "0"], env=sandbox.env())
    assert ran.exit_code == 1 and "4 ok, 1 failed" in ran.stderr, ran.stderr  # the line over the window
    after = json.loads(run_cli([*args, "--from-run", str(out), "--format", "json"]).stdout)["cost_usd"]
    assert Decimal(after["expected"]) <= Decimal(after["expected_high"]) <= Decimal(after["worst_case"])
    # Lines that agree are priced at their one value.
    src.write_text(
        "".join(line for line in src.read_text().splitlines(True)[:2]).replace(
            '"max_tokens": 1}', '"max_tokens": 100}'
        )
    )
    e = json.loads(run_cli([*args, "--format", "json"]).stdout)
    assert e["max_tokens"] == 100 and "max_tokens_of_lines" not in e
    assert "worst case (every reply 100 tokens)" in run_cli(args).stdout


# Literary Chinese and Japanese: rarer characters take a Llama 3 token or two each (the sandbox
# bills with it), well over the approximation's four bytes a token.
CJK = [
    "饕餮盛宴，觥筹交错，耄耋老人亦欣然赴约。",
    "蜻蛉や蟋蟀の声が響く晩秋の黄昏。",
    "齟齬を来した交渉は、結局頓挫してしまった。",
    "鬱蒼とした森の奥で、梟が囁くように鳴いていた。",
    "魑魅魍魎が跋扈する世の中で、矜持を失わずに生きる。",
    "蝙蝠が薄暮の空を翩翻と舞い、蜘蛛は軒下に巣を繕う。",
    "氤氲的雾气笼罩着峥嵘的山峦，潺湲的溪水蜿蜒而下。",
    "他踟蹰良久，终于在斑驳的石碑前驻足，喟然长叹。",
    "窗外的梧桐簌簌作响，檐下的燕子呢喃不休。",
    "老饕们对这道馔肴赞不绝口，觥筹之间谈笑风生。",
    "薔薇と躑躅が咲き誇る庭で、鶯が囀っている。",
    "嫦娥奔月的传说，在氤氲的桂香里流传了千年。",
]


def _estimate_and_run(
    box: SandboxThread, tmp_path: Path, rows: list[dict[str, str]], name: str
) -> tuple[Decimal, Decimal]:
    """`estimate`'s worst case, and what a run of the same job cost, on gpt-4o-mini (no tokenizer)."""
    src = write_csv(tmp_path / f"{name}.csv", rows)
    args = [str(src), "--id-column", "id", "--system", "Summarize the text in one short sentence.",
            "--provider", "openai", "--model", "gpt-4o-mini", "--max-tokens", "16"]  # fmt: skip
    est = run_cli(["estimate", *args, "--format", "json"])
    assert est.exit_code == 0, est.stderr
    e = json.loads(est.stdout)
    assert e["token_counts"].startswith("APPROXIMATE")
    out = tmp_path / f"{name}.parquet"
    ran = run_cli(["run", *args, "-o", str(out), "--rpm", "0", "--cache", "off"], env=box.openai_env())
    assert ran.exit_code == 0, ran.stderr
    report = json.loads(run_cli(["report", str(out), "--format", "json"]).stdout)
    actual = Decimal(report["overall"]["cost_usd"])
    column = pq.read_table(out).column("cost_usd").to_pylist()
    assert abs(sum(Decimal(str(c)) for c in column) - actual) < Decimal("1e-9")
    assert actual <= Decimal(e["cost_usd"]["worst_case"]), (name, actual, e["cost_usd"])
    # Said once, in every format: the worst case takes a token a byte.
    assert e["worst_case_prompts"] == "bytes"
    text = run_cli(["estimate", *args]).stdout
    assert text.count("bounded by bytes") == 1, text
    markdown = run_cli(["estimate", *args, "--format", "markdown"]).stdout
    assert "prompts bounded by bytes: counts are approximate) | $" in markdown
    return Decimal(e["cost_usd"]["worst_case"]), actual


def test_an_approximate_worst_case_bounds_a_run_of_multibyte_text(sandbox, tmp_path: Path) -> None:
    """Without the model's tokenizer, prompt tokens are a guess of about four bytes a token: CJK
    text takes more tokens than that. The worst case bounds prompts by their bytes, as the run
    reserves them, and says so once; English text is not priced absurdly high by it."""
    cjk = [
        {"id": f"c{i}", "prompt": CJK[i % 12] + CJK[(i + 1 + i // 12) % 12] + CJK[(i * 5 + 2) % 12]}
        for i in range(30)
    ]
    assert len({r["prompt"] for r in cjk}) == 30
    worst, actual = _estimate_and_run(sandbox, tmp_path, cjk, "cjk")
    assert worst <= 3 * actual, (actual, worst)  # 2.3x here
    words = ["the", "parcel", "arrived", "late", "but", "the", "quality", "is", "good", "and", "cheap"]
    rng = random.Random(7)
    english = [
        {"id": f"e{i}", "prompt": " ".join(rng.choices(words, k=3 * len(cjk[i]["prompt"]) // 5))}
        for i in range(30)
    ]
    worst_en, actual_en = _estimate_and_run(sandbox, tmp_path, english, "english")
    assert worst_en <= 4 * actual_en, (actual_en, worst_en)  # 3.2x here
    # Exact counts (a Llama model) are priced as they are, and say nothing of bytes.
    src = str(tmp_path / "cjk.csv")
    llama = json.loads(run_cli(["estimate", src, "--id-column", "id", "--format", "json"]).stdout)
    assert llama["worst_case_prompts"] == "exact"
    assert "bytes" not in run_cli(["estimate", src, "--id-column", "id"]).stdout


def test_a_pilots_usage_error_is_found_before_it_pays(sandbox, tmp_path: Path) -> None:
    """--gold without --labels is refused before the pilot sends anything (exit 2: nothing sent)."""
    src = write_csv(tmp_path / "in.csv", [{"prompt": f"Is {i} even?", "truth": "yes"} for i in range(30)])
    out = tmp_path / "out.parquet"
    result = run_cli(
        ["estimate", str(src), "-o", str(out), "--pilot", "10", "--gold", "truth"], env=sandbox.env()
    )
    assert result.exit_code == 2 and "--gold goes with --pilot and --labels" in result.stderr
    assert sandbox.count() == 0 and not out.with_name(out.name + ".batchllm").exists()


def test_an_estimate_without_limits_uses_the_models_listed_ones_as_compare_does(tmp_path: Path) -> None:
    """gpt-4o-mini is listed at 500 requests and 200,000 tokens a minute: the estimate's time is
    at those, the same as --compare's line for the job's own model (it said 300/min and 4 min
    against --compare's 15.7)."""
    src = prompts_csv(tmp_path / "in.csv", 3000)
    args = ["estimate", str(src), "--provider", "openai", "--model", "gpt-4o-mini", "--format", "json"]
    alone = json.loads(run_cli(args).output)["time"]
    assert (alone["rpm"], alone["tpm"]) == (500, 200_000), alone
    listed = json.loads(run_cli([*args, "--compare"]).output)
    own = next(x for x in listed["models"] if x["model"] == "gpt-4o-mini" and x["provider"] == "openai")
    assert own["minutes_worst_case"] == alone["minutes"] >= 3000 / 500, (own, alone)
    given = json.loads(run_cli([*args, "--rpm", "60"]).output)["time"]
    assert given["rpm"] == 60 and given["minutes"] >= 50
