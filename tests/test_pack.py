"""Several rows per request (--pack): every row still validated, re-asked, costed and resumed on its own."""

from __future__ import annotations

import json
import re
import signal
import time
from decimal import Decimal
from pathlib import Path

import orjson
import pyarrow.parquet as pq

from batchllm.labeling import pack
from batchllm.labeling.spec import Labeling

from .conftest import run_cli, spawn, summary_of, write_csv
from .test_labeling import LABELS, labeling_input, run_labels, texts

PRICE_IN, PRICE_OUT = 310_000, 340_000  # picodollars per token
CLEAN = {"pack_missing": 0.0, "pack_prose": 0.0, "pack_fenced": 0.0, "pack_decay": 0.0}


def billed(box) -> int:
    stats = box.sandbox.stats
    return stats["prompt_tokens"] * PRICE_IN + stats["completion_tokens"] * PRICE_OUT


def pico(rows: list[dict]) -> int:
    return sum(round((r["cost_usd"] or 0) * 1e12) for r in rows)


def test_split_and_read_are_exact() -> None:
    shares = pack.prompt_shares(103, [10, 20, 30])
    assert shares == [25, 34, 44] and sum(shares) == 103  # shared 43 -> 15, 14, 14
    assert sum(pack.prompt_shares(40, [30, 30])) == 40  # fewer than counted: in proportion
    assert sum(pack.completion_shares(17, ["positive", "", "neutral"])) == 17
    assert pack.completion_shares(17, ["positive", "", "neutral"])[1] == 0
    items, error = pack.read_reply('Sure:\n```json\n{"1": "a", "[3]": {"x": 1}}\n```', 3)
    assert error is None and items == ["a", "", '{"x":1}']
    assert pack.read_reply('{"1": "a", "2": "b', 2) == (None, "invalid_json")
    assert pack.read_reply("no object here", 2) == (None, "no_json")
    turns = pack.reask_turns(Labeling(labels=("a", "b")), ["one", "two"], ["c", ""])
    assert turns[-1].content.startswith("Your answer") and "[1] 'c' is not one" in turns[-1].content
    assert "[2] was left out" in turns[-1].content and turns[0].content == "[1] one\n[2] two"


def test_2000_rows_in_packs_of_10_every_row_on_its_own(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(pack_missing=0.05, pack_prose=0.05, pack_fenced=0.05, pack_decay=0.0)
    src, out = labeling_input(tmp_path, 2000), tmp_path / "o.parquet"
    result = run_labels(box, src, out, "--reask", "1", "--pack", "10", "--concurrency", "16")
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 2000
    for r in rows:
        assert (r["status"] == "ok" and r["label"] in LABELS) or (
            r["status"] == "invalid" and r["parse_error"]
        )
        assert r["pack_id"] and 1 <= r["pack_position"] <= 10
    stats = box.sandbox.stats
    # 200 packs of 10, then one re-ask per pack that left items out, of those items together
    assert stats["packs"] == 200
    reasked = [r for r in rows if r["reasks"]]
    assert len(reasked) == stats["pack_items_missing"] > 0
    assert stats["pack_reasks"] == len({r["pack_id"] for r in reasked})
    assert box.count() == stats["packs"] + stats["pack_reasks"]
    assert stats["pack_items_prose"] > 0 and stats["pack_fenced"] > 0  # repaired for free
    # money: the rows' tokens and costs sum to what the sandbox billed, exactly
    assert sum(r["prompt_tokens"] for r in rows) == stats["prompt_tokens"]
    assert sum(r["completion_tokens"] for r in rows) == stats["completion_tokens"]
    assert pico(rows) == billed(box)
    report = json.loads(run_cli(["report", str(out), "--format", "json"]).output)
    assert report["packing"]["requests"] == box.count()
    assert 6 < float(report["packing"]["rows_per_request"]) < 10
    assert report["packing"]["prompt_tokens"] == stats["prompt_tokens"]
    assert report["packing"]["prompt_tokens_saved"] > 0


def test_unreadable_replies_are_sent_again_in_smaller_packs(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(pack_broken=0.3, **CLEAN)
    src, out = labeling_input(tmp_path, 400), tmp_path / "o.parquet"
    result = run_labels(box, src, out, "--reask", "1", "--pack", "8")
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    assert all(r["status"] == "ok" and r["label"] in LABELS for r in rows)
    stats = box.sandbox.stats
    assert stats["pack_broken"] > 0 and stats["packs"] > 50  # the broken ones again, in halves
    sizes = {r["pack_position"] for r in rows}
    assert max(sizes) == 8
    assert pico(rows) == billed(box)
    # Without re-asks, a row whose one-row pack came back unreadable too ends invalid, saying why.
    again = sandbox_factory(pack_broken=0.3, **CLEAN)
    result = run_labels(again, src, tmp_path / "r0.parquet", "--reask", "0", "--pack", "8")
    rows = pq.read_table(tmp_path / "r0.parquet").to_pylist()
    invalid = [r for r in rows if r["status"] != "ok"]
    assert result.exit_code == 1 and invalid
    assert {r["parse_error"] for r in invalid} == {"invalid_json"} and {
        r["pack_position"] for r in invalid
    } == {0}
    assert pico(rows) == billed(again)


def test_sigkill_mid_run_resumes_without_paying_a_pack_twice(sandbox_factory, tmp_path: Path) -> None:
    src, out = labeling_input(tmp_path, 1000), tmp_path / "o.parquet"
    box = sandbox_factory(latency=0.05, pack_missing=0.05, pack_prose=0.05, pack_fenced=0.05, pack_decay=0.0)
    args = ["run", str(src), "-o", str(out), "--template", "Classify: {text}", "--labels", ",".join(LABELS)]
    args += ["--rpm", "0", "--max-tokens", "16", "--id-column", "id", "--pack", "10", "--concurrency", "4"]
    proc = spawn(args, env=box.env())
    deadline = time.monotonic() + 60
    while box.sandbox.stats["packs"] < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    before = box.sandbox.stats["packs"]
    assert 40 <= before < 100
    result = run_cli(args, env=box.env())
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 1000 and all(r["status"] == "ok" and r["label"] in LABELS for r in rows)
    # Only packs in flight at the kill (at most 4 groups of 10 rows) were sent again.
    assert box.sandbox.stats["packs"] <= 100 + 4 + 1
    spent, bill = pico(rows), billed(box)
    report = json.loads(run_cli(["report", str(out), "--format", "json"]).output)
    maybe = round(float((report.get("maybe_billed") or {}).get("worst_case_usd") or 0) * 1e12)
    assert spent <= bill <= spent + maybe, (spent, bill, maybe)


def test_packing_saves_prompt_tokens_and_stays_under_the_rate(sandbox_factory, tmp_path: Path) -> None:
    system = "You label product reviews for a retailer's quality team. " * 30  # ~300 tokens
    examples = write_csv(
        tmp_path / "ex.csv",
        [
            {"text": t, "label": lab}
            for t, lab in [("love it", "positive"), ("broke", "negative"), ("ok", "neutral")]
        ],
    )
    src = labeling_input(tmp_path, 200)
    per_row = {}
    for n in (1, 10):
        box = sandbox_factory(rate_limit=10, rate_burst=2, **CLEAN)
        out = tmp_path / f"p{n}.parquet"
        result = run_labels(
            box, src, out, "--system", system, "--examples", str(examples), "--pack", str(n), "--rpm", "600"
        )
        assert result.exit_code == 0, result.output
        rows = pq.read_table(out).to_pylist()
        assert all(r["status"] == "ok" for r in rows)
        assert box.count(429) == 0 and box.count() == 200 // n
        per_row[n] = sum(r["prompt_tokens"] for r in rows) / len(rows)
    assert per_row[10] <= per_row[1] / 4, per_row


def test_samples_vote_over_new_orders_and_company(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(keep_bodies=True, **{**CLEAN, "pack_decay": 0.02})
    src, out = labeling_input(tmp_path, 40), tmp_path / "o.parquet"
    result = run_labels(box, src, out, "--pack", "5", "--samples", "3", "--seed", "7")
    assert result.exit_code in (0, 1), result.output
    rows = pq.read_table(out).to_pylist()
    assert all(sum(dict(r["label_votes"] or []).values()) >= 2 for r in rows if r["status"] == "ok")
    packs = [orjson.loads(b)["data"]["messages"][-1]["content"] for b in box.sandbox.bodies]
    firsts = {tuple(line.split("] ", 1)[1] for line in p.splitlines()) for p in packs}
    assert len(packs) == 3 * 8 and len(firsts) == 24  # no pack repeats another's rows in order
    company = {frozenset(p) for p in firsts}
    assert len(company) > 8  # samples put rows with other rows
    again = tmp_path / "again.parquet"
    box2 = sandbox_factory(keep_bodies=True, **{**CLEAN, "pack_decay": 0.02})
    run_labels(box2, src, again, "--pack", "5", "--samples", "3", "--seed", "7")
    # seeded: the same packs in another run (in whatever order the workers sent them)
    assert sorted(orjson.loads(b)["data"]["messages"][-1]["content"] for b in box2.sandbox.bodies) == sorted(
        packs
    )


def test_bad_pack_flags(sandbox, tmp_path: Path) -> None:
    src = labeling_input(tmp_path, 3)
    base = ["run", str(src), "-o", str(tmp_path / "o.parquet"), "--template", "C: {text}"]
    for extra, message in [
        (["--labels", "a,b", "--pack", "0"], "--pack must be an integer from 1 to 100"),
        (["--pack", "5"], "--pack: packing rows needs --labels"),
        (["--labels", "a,b", "--pack", "5", "--pack-tokens", "60"], "--pack-tokens 60 is below one row"),
    ]:
        result = run_cli([*base, *extra], env=sandbox.env())
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    # The least --pack-tokens advised is the sum of the parts it names, each part's own too.
    result = run_cli([*base, "--labels", "a,b", "--pack", "5", "--pack-tokens", "60"], env=sandbox.env())
    found = re.search(
        r"give at least (\d+) tokens = (\d+) \(a packed request's shared part\) \+ (\d+) \(one row's line: "
        r"(\d+) for its text, (\d+) around it\) \+ (\d+) \(its reply: --max-tokens (\d+), (\d+) around it\)",
        result.output,
    )
    assert found is not None, result.output
    total, shared, line, text, around, reply, max_tokens, framing = map(int, found.groups())
    assert total == shared + line + reply and line == text + around and reply == max_tokens + framing
    assert sandbox.count() == 0


def test_the_least_pack_tokens_stated_is_the_least_taken_and_runs(sandbox, tmp_path: Path) -> None:
    """The refusal of a too small --pack-tokens states the least one taken: one below it is
    refused with the same figure, and that figure runs, rows of a few dozen words each alone in a
    pack if need be, none over it."""
    words = " ".join(f"word{i}" for i in range(30))
    rows = [{"id": f"r{i}", "text": f"Review {i}: {words}"} for i in range(12)]
    src = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "o.parquet"
    args = ["--pack", "5", "--pack-tokens"]
    result = run_labels(sandbox, src, out, *args, "60")
    found = re.search(r"--pack-tokens 60 is below one row: give at least (\d+) tokens", result.output)
    assert result.exit_code == 2 and found is not None, result.output
    least = int(found.group(1))
    below = run_labels(sandbox, src, out, *args, str(least - 1))
    assert below.exit_code == 2, below.output
    assert f"--pack-tokens {least - 1} is below one row: give at least {least} tokens" in below.output
    assert len(below.output.strip().splitlines()) == 1 and sandbox.count() == 0
    at = run_labels(sandbox, src, out, *args, str(least))
    assert at.exit_code == 0, at.output
    done = pq.read_table(out).to_pylist()
    assert [r["status"] for r in done] == ["ok"] * 12, [r["error"] for r in done]


def test_pilot_table_shows_accuracy_falling_with_pack_size(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(pack_decay=0.012, pack_missing=0.0, pack_prose=0.02, pack_fenced=0.05)
    sample = Path(__file__).parent.parent / "sample_data" / "reviews.csv"
    out = tmp_path / "o.parquet"
    args = [
        "estimate",
        str(sample),
        "-o",
        str(out),
        "--template",
        "Review: {review}",
        "--labels",
        ",".join(LABELS),
    ]
    args += [
        "--max-tokens",
        "16",
        "--rpm",
        "0",
        "--pilot",
        "120",
        "--gold",
        "human_label",
        "--pack",
        "1,5,20",
    ]
    result = run_cli([*args, "--format", "json"], env=box.env())
    assert result.exit_code == 0, result.output
    table = json.loads(result.output[result.output.index("{") :])
    lines = {x["pack"]: x for x in table["sizes"]}
    assert sorted(lines) == [1, 5, 20] and all(x["rows"] == 120 for x in lines.values())
    acc = {k: x["accuracy"]["accuracy"] for k, x in lines.items()}
    assert acc[1] > acc[20] and acc[5] > acc[20], acc
    assert 110 <= lines[1]["requests"] <= 120 and lines[20]["requests"] < 15  # identical rows: once
    assert (
        lines[20]["prompt_tokens_per_row"]
        < lines[5]["prompt_tokens_per_row"]
        < lines[1]["prompt_tokens_per_row"]
    )
    assert table["recommended"] in (1, 5)
    sent = box.count()
    text = run_cli(args, env=box.env())  # again, as text: answered from the journals, nothing sent
    assert text.exit_code == 0 and "cheapest within 1 point" in text.output, text.output
    assert box.count() == sent and f"{lines[20]['requests']:,}" in text.output
    # Cheaper sizes this pilot cannot tell from pack 1 (its accuracy in their interval) are named.
    marked = Decimal(lines[table["recommended"]]["projected_cost_usd"])
    untold = [
        k for k, x in lines.items()
        if Decimal(x["projected_cost_usd"]) < marked and x["accuracy"]["low"] <= acc[1] <= x["accuracy"]["high"]
    ]  # fmt: skip
    assert ("a larger --pilot tells them apart" in text.output) == bool(untold), text.output
    assert all(f"pack {k} ({acc[k]:.1%}" in text.output for k in untold)
    bad = run_cli([*args[:-2], "--pack", "1,0"], env=box.env())
    assert bad.exit_code == 2 and "'0' must be an integer from 1 to 100" in bad.output


def _export_answer_import(box, tmp_path: Path, rows: int) -> tuple[Path, list, list[str]]:
    from .test_openai_batch import answer_batch

    src = labeling_input(tmp_path, rows)
    requests, results, errors = tmp_path / "req.jsonl", tmp_path / "res.jsonl", tmp_path / "err.jsonl"
    job = [
        "--template",
        "Classify: {text}",
        "--labels",
        ",".join(LABELS),
        "--max-tokens",
        "16",
        "--id-column",
        "id",
    ]
    job += ["--pack", "10", "--input-price", "0.31", "--output-price", "0.34"]
    exported = run_cli(["export-batch", str(src), "-o", str(requests), *job])
    assert exported.exit_code == 0, exported.output
    assert (
        len(requests.read_bytes().splitlines()) == rows // 10
        and f"exported {rows // 10} requests" in exported.output
    )
    answer_batch(box, requests, results, errors)
    args = [
        "import-batch",
        str(results),
        str(errors),
        "--input",
        str(src),
        "-o",
        str(tmp_path / "o.parquet"),
        *job,
    ]
    imported = run_cli(args)
    assert imported.exit_code in (0, 1), imported.output
    return src, args, job


def test_export_one_line_per_pack_and_import_fills_every_row(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(pack_missing=0.05, pack_prose=0.05, pack_fenced=0.05, pack_decay=0.0)
    src, args, job = _export_answer_import(box, tmp_path, 1000)
    out = tmp_path / "o.parquet"
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 1000 and all(r["status"] in ("ok", "invalid") for r in rows)  # every row filled
    stats = box.sandbox.stats
    missing = [r for r in rows if r["status"] == "invalid"]
    assert len(missing) == stats["pack_items_missing"] and all(r["parse_error"] == "missing" for r in missing)
    assert all(
        r["label"] in LABELS and r["pack_id"].startswith("pack10-") for r in rows if r["status"] == "ok"
    )
    assert pico(rows) == billed(box)  # at the prices given, the rows sum to the bill
    assert run_cli(args).exit_code == 1 and pq.read_table(out).to_pylist() == rows  # twice: no change
    # The live run re-asks the items left out, together, in packs: nothing else is sent.
    before = box.count()
    live = run_cli(["run", str(src), "-o", str(out), *job, "--retry-errors", "--rpm", "0"], env=box.env())
    assert live.exit_code == 0, live.output
    final = pq.read_table(out).to_pylist()
    assert all(r["status"] == "ok" for r in final)
    assert box.count() - before == stats["pack_reasks"] <= len(missing)
    assert pico(final) == billed(box)


def test_import_of_unreadable_packs_leaves_rows_pending_with_their_cost(
    sandbox_factory, tmp_path: Path
) -> None:
    box = sandbox_factory(pack_broken=0.2, **CLEAN)
    src, args, job = _export_answer_import(box, tmp_path, 300)
    out = tmp_path / "o.parquet"
    done = [r for r in pq.read_table(out).to_pylist() if r["status"] == "ok"]
    unread = box.sandbox.stats["pack_broken"]
    assert unread and len(done) == 300 - 10 * unread
    status = run_cli(["status", str(out)]).output
    assert f"{10 * unread:,} not done" in status, status
    spent = re.search(r"cost so far: \$([0-9.]+)", status)
    assert spent is not None and round(Decimal(spent.group(1)) * 10**12) == billed(box), status
    again = run_cli(args)  # twice: nothing changes, not even the split shares
    assert again.exit_code == 0 and spent.group(0) in run_cli(["status", str(out)]).output
    live = run_cli(["run", str(src), "-o", str(out), *job, "--rpm", "0"], env=box.env())
    assert live.exit_code == 0, live.output
    final = pq.read_table(out).to_pylist()
    assert all(r["status"] == "ok" for r in final) and pico(final) == billed(box)


def test_cache_keeps_packed_answers_apart(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(**CLEAN)
    src = labeling_input(tmp_path, 60)

    def run(name: str, size: int) -> dict:
        result = run_labels(box, src, tmp_path / f"{name}.parquet", "--pack", str(size), "--temperature", "0")
        assert result.exit_code == 0, result.output
        return summary_of(tmp_path / f"{name}.parquet")["this_run"]

    first = run("a", 10)
    assert first["requests"] == 6 and first["cache_hits"] == 0
    again = run("b", 10)  # another output, same job: every row from the cache, nothing sent
    assert again["cache_hits"] == 60 and again["requests"] == 0
    rows = pq.read_table(tmp_path / "b.parquet").to_pylist()
    assert all(r["cached"] and r["cost_usd"] == 0 and r["label"] in LABELS for r in rows)
    assert run("c", 1)["cache_hits"] == 0  # one row a request is never served a packed answer
    assert run("d", 5)["cache_hits"] == 0  # nor another pack size


def test_a_mostly_cached_packed_run_is_counted_alike_by_summary_report_and_status(
    sandbox_factory, tmp_path: Path
) -> None:
    """40 of 60 rows (one of them twice) answered from an earlier run's packs: the summary, the
    report and status count the same rows from the cache and the same copy; the report's packing
    line counts only the rows sent in packs, in the packs sent."""
    box = sandbox_factory(**CLEAN)
    rows = [{"id": f"r{i}", "text": t} for i, t in enumerate(texts(60))]
    rows.append({"id": "again", "text": rows[0]["text"]})  # a copy of a row the cache answers
    first = run_labels(box, write_csv(tmp_path / "first.csv", rows[:40]), tmp_path / "a.parquet",
                       "--pack", "10", "--temperature", "0")  # fmt: skip
    assert first.exit_code == 0, first.output
    sent = box.count()
    out = tmp_path / "b.parquet"
    second = run_labels(box, write_csv(tmp_path / "all.csv", rows), out, "--pack", "10", "--temperature", "0")
    assert second.exit_code == 0, second.output
    assert box.count() - sent == 2  # the 20 new rows, in two packs
    assert "1 row answered by an identical row's reply, 40 from the cache" in second.output
    summary = summary_of(out)["rows"]
    assert summary["from_cache"] == 40 and summary["answered_by_identical_rows"] == 1
    report = json.loads(run_cli(["report", str(out), "--format", "json"]).stdout)
    assert report["overall"]["rows_from_cache"] == 40
    assert report["overall"]["rows_answered_by_identical_rows"] == 1
    packed = report["packing"]
    assert packed["rows"] == 20 and packed["requests"] == 2 and packed["prompt_tokens_saved"] > 0
    text = run_cli(["report", str(out)]).stdout
    assert "packed: 20 rows in 2 requests (10.00 rows per request)" in text
    assert "1 row answered by an identical row's reply, 40 from the cache" in text
    status = run_cli(["status", str(out)]).stdout
    assert "never paid twice: 1 row answered by an identical row's reply, 40 from the cache" in status


def test_rows_too_long_for_the_pack_tokens_say_what_sends_them(sandbox, tmp_path: Path) -> None:
    """Rows longer than --pack-tokens allows are refused before sending; the summary names the
    setting that sends them (a higher --pack-tokens, or a lower --max-tokens); without
    --pack-tokens, a row over the model's window is said to be so."""
    words = " ".join(f"word{i}" for i in range(300))
    src = write_csv(tmp_path / "in.csv", [{"id": f"r{i}", "text": f"Review {i}: {words}"} for i in range(4)])
    out = tmp_path / "o.parquet"
    first = run_labels(sandbox, src, out, "--pack", "5", "--pack-tokens", "60")
    least = re.search(r"give at least (\d+) tokens", first.output)
    assert least is not None, first.output
    result = run_labels(sandbox, src, out, "--pack", "5", "--pack-tokens", least.group(1))
    assert result.exit_code == 1 and sandbox.count() == 0, result.output
    assert "4 rows too long for a pack of --pack-tokens, not sent: a higher --pack-tokens" in result.output
    huge = write_csv(tmp_path / "huge.csv", [{"id": "r0", "text": "x " * 25_000}, {"id": "r1", "text": "ok"}])
    over = run_labels(sandbox, huge, tmp_path / "h.parquet", "--pack", "5")
    assert over.exit_code == 1, over.output
    assert (
        "1 row over the context window with max_tokens 16, not sent: each prompt alone is over it"
        in over.output
    )


def test_estimate_cuts_packs_by_pack_tokens_as_the_run_does(sandbox_factory, tmp_path: Path) -> None:
    """`estimate --pack N --pack-tokens T` counts the packs a run makes: no more than N rows,
    and no more tokens than T with their reply allowance (it said ceil(rows / N) whatever T
    was); rows too long for any pack are counted as the run refuses them."""
    rng = __import__("random").Random(7)
    vocab = ["good", "bad", "fine", "slow", "great", "awful", "cheap", "sturdy", "late", "broken"]
    rows = [{"id": f"r{i}", "text": " ".join(rng.choices(vocab, k=rng.randint(3, 70)))} for i in range(80)]
    rows += [{"id": "long", "text": " ".join(vocab * 60)}]
    src = write_csv(tmp_path / "in.csv", rows)
    for limit in ("520", "800", "4000"):
        box = sandbox_factory(**CLEAN)
        out = tmp_path / f"o{limit}.parquet"
        flags = ["--template", "Classify: {text}", "--labels", ",".join(LABELS), "--max-tokens", "16"]
        flags += ["--pack", "10", "--pack-tokens", limit, "--id-column", "id"]
        est = run_cli(["estimate", str(src), "-o", str(out), *flags, "--format", "json"], env=box.env())
        assert est.exit_code == 0, est.output
        packing = json.loads(est.stdout)["packing"]
        run = run_cli(["run", str(src), "-o", str(out), *flags, "--rpm", "0"], env=box.env())
        assert run.exit_code in (0, 1), run.output
        assert packing["requests"] == box.sandbox.stats["packs"], (limit, packing, box.sandbox.stats)
        assert packing["rows_too_long_for_a_pack"] == summary_of(out)["rows"]["over_window"], limit
        # The report compares the packed estimate with the packed run (it took the unpacked one).
        versus = json.loads(run_cli(["report", str(out), "--format", "json"]).stdout)["estimate_vs_actual"]
        assert versus["prompt_tokens"]["estimated"] == packing["prompt_tokens"]
        assert versus["prompt_tokens"]["of"] == "first pass"
    assert packing["requests"] == 9  # 4,000 tokens: packs of 10, the long row among them
    # In text, the two prompt figures say which they are: the rows' tokens, and the packs' cost.
    text = run_cli(["estimate", str(src), *flags]).stdout
    assert "prompt tokens, one row a request" in text and "prompt cost, packed" in text, text
    # The worst case above one row a request's says why: the packs' sizes, then the rows alone.
    assert "worst case (every pack unreadable at every size, then every row alone, " in text, text
    assert "requests (samples x (1 + re-asks), each pack at every size, then each row alone)" in text
