"""Labeling: label sets, typed JSON fields, re-asks, samples, eval, against the sandbox's labeling model."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from batchllm.labeling.parse import parse_label, parse_object
from batchllm.labeling.spec import Field
from batchllm.labeling.votes import majority, settled
from batchllm.sandbox.labeler import expected_label, fault, truth

from .conftest import run_cli, spawn, summary_of, write_csv

LABELS = ["positive", "negative", "neutral"]
FAULTS = {"label_wrong": 0.10, "label_prose": 0.10, "label_out_of_set": 0.05, "label_invalid_json": 0.05}
RATES = [("wrong", 0.10), ("prose", 0.10), ("out_of_set", 0.05), ("invalid_json", 0.05), ("truncated", 0.0)]
WORDS = ["love it", "broke after a week", "it's okay", "great value", "disappointed", "works well", "meh"]


def texts(n: int) -> list[str]:
    return [f"Review {i}: {WORDS[i % len(WORDS)]}, item {i * 7919 % 1000}" for i in range(n)]


def labeling_input(tmp_path: Path, n: int) -> Path:
    return write_csv(tmp_path / "in.csv", [{"id": f"r{i}", "text": t} for i, t in enumerate(texts(n))])


def schema_args(src: Path, out: Path, schema: Path) -> list[str]:
    """A --json-schema run of ``labeling_input``'s rows, unpaced."""
    return [
        "run",
        str(src),
        "-o",
        str(out),
        "--template",
        "Read: {text}",
        "--json-schema",
        str(schema),
        "--rpm",
        "0",
    ]


def run_labels(box, src: Path, out: Path, *extra: str) -> object:
    args = ["run", str(src), "-o", str(out), "--template", "Classify: {text}", "--labels", ",".join(LABELS)]
    return run_cli([*args, "--rpm", "0", "--max-tokens", "16", "--id-column", "id", *extra], env=box.env())


def test_repair_and_validation() -> None:
    labels = ("positive", "negative", "neutral")
    assert parse_label("  **Positive**. ", labels, False) == ("positive", None)
    assert parse_label("```\nnegative\n```", labels, False) == ("negative", None)
    assert parse_label("Sure! The label is: neutral.", labels, False) == ("neutral", None)
    assert parse_label("mixed", labels, False) == (None, "not_in_set:mixed")
    assert parse_label("positive or negative", labels, False)[1] == "not_in_set:positive or negative"
    assert parse_label("Let me think", labels, True) == (None, "truncated")
    assert parse_label("Negative", labels, False) == ("negative", None)  # nothing to repair
    fields = (Field("score", "integer"), Field("tone", "string", ("up", "down")), Field("tags", "array"))
    assert parse_object(
        'Here: ```json\n{"score": 3, "tone": "up", "tags": ["a"]}\n```', fields, ("score",)
    ) == (
        {"score": 3, "tone": "up", "tags": ["a"]},
        None,
    )
    assert parse_object('{"score": "3", "tone": "up"}', fields, ()) == (None, "schema:score")
    assert parse_object('{"score": 3, "tone": "sideways"}', fields, ()) == (None, "schema:tone")
    assert parse_object('{"score": 3, "tone": "u', fields, ()) == (None, "invalid_json")
    assert parse_object("no object here", fields, ()) == (None, "no_json")
    # A reply that is one object and nothing else is read whole; two objects: the first is taken.
    assert parse_object(' {"score": 2, "tags": ["}"]}\n', fields, ()) == (
        {"score": 2, "tone": None, "tags": ["}"]},
        None,
    )
    assert parse_object('{"score": 1} {"score": 2}', fields, ())[0] == {
        "score": 1,
        "tone": None,
        "tags": None,
    }
    assert majority(["a", "b", "a"]) == ("a", 2 / 3, {"a": 2, "b": 1})
    assert majority(["a", "b"])[0] is None
    assert settled(["a", "a"], 3) and not settled(["a", "b"], 3)


def test_faulty_answers_are_repaired_reasked_or_invalid(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(**FAULTS)
    src, out = labeling_input(tmp_path, 2000), tmp_path / "o.parquet"
    result = run_labels(box, src, out, "--reask", "1", "--concurrency", "64")
    assert result.exit_code in (0, 1), result.output
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 2000
    for r in rows:
        assert (r["status"] == "ok" and r["label"] in LABELS) or (
            r["status"] == "invalid" and r["parse_error"]
        )
    stats = box.sandbox.stats
    reasked = sum(1 for r in rows if r["reasks"])
    assert box.count() == 2000 + reasked  # requests sent = rows + rows re-asked, exactly
    assert stats["labeling_reasks"] == reasked
    # prose-wrapped answers are repaired without a re-ask; the others are re-asked once
    assert reasked == stats["label_out_of_set"] + stats["label_invalid_json"]
    prose = [r for r in rows if r["response"].startswith("Sure!")]
    assert len(prose) == stats["label_prose"] and all(r["reasks"] == 0 and r["label"] for r in prose)
    # money: every request, re-asks included, at the prices
    total_pico = sum(round(r["cost_usd"] * 1e12) for r in rows)
    assert total_pico == stats["prompt_tokens"] * 310_000 + stats["completion_tokens"] * 340_000
    assert sum(r["prompt_tokens"] for r in rows) == stats["prompt_tokens"]
    report = run_cli(["report", str(out), "--format", "json"])
    spend = json.loads(report.output)["overall"]["spend_usd"]
    assert float(spend["reasks"]) > 0


def test_eval_reproduces_the_known_accuracy_and_confusion(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(**FAULTS)
    n = 600
    all_texts = texts(n)
    users = [f"Classify: {t}" for t in all_texts]
    gold = [truth(u, LABELS) for u in users]
    src = write_csv(
        tmp_path / "in.csv",
        [{"id": f"r{i}", "text": t, "gold": g} for i, (t, g) in enumerate(zip(all_texts, gold, strict=True))],
    )
    out = tmp_path / "o.parquet"
    run_labels(box, src, out, "--reask", "1")
    e = json.loads(run_cli(["eval", str(out), "--gold", "gold", "--format", "json"]).output)
    predicted = [expected_label(u, LABELS, None, RATES) for u in users]
    correct = sum(p == g for p, g in zip(predicted, gold, strict=True))
    assert correct < n  # the sandbox's 10% wrong answers are in there
    assert e["accuracy"] == correct / n and e["n"] == n and e["coverage"] == 1.0
    confusion: dict[str, Counter[str]] = {}
    for g, p in zip(gold, predicted, strict=True):
        confusion.setdefault(g, Counter())[p] += 1
    assert e["confusion"] == {g: dict(c) for g, c in confusion.items()}
    assert set(e) >= {"macro_f1", "kappa", "per_label", "cost_usd", "cost_per_correct_usd"}
    assert e["per_label"]["positive"]["support"] == gold.count("positive")


def test_samples_and_adaptive(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(label_wrong=0.3)
    n = 120
    src = labeling_input(tmp_path, n)
    users = [f"Classify: {t}" for t in texts(n)]
    rates = [("wrong", 0.3)]
    result = run_labels(box, src, tmp_path / "a.parquet", "--samples", "3")
    assert result.exit_code in (0, 1), result.output
    assert box.count() == 3 * n
    rows = pq.read_table(tmp_path / "a.parquet").to_pylist()
    assert all(r["agreement"] is not None and sum(dict(r["label_votes"]).values()) == 3 for r in rows)
    before = box.count()
    run_labels(box, src, tmp_path / "b.parquet", "--samples", "3", "--adaptive", "--cache", "off")
    agree = sum(expected_label(u, LABELS, 1, rates) == expected_label(u, LABELS, 2, rates) for u in users)
    assert box.count() - before == 2 * agree + 3 * (n - agree)
    assert 0 < agree < n
    # Seeded samples are repeatable: another output of the same job is answered by the cache,
    # request by request, for nothing, with the same labels and votes.
    before = box.count()
    result = run_labels(box, src, tmp_path / "c.parquet", "--samples", "3")
    assert box.count() == before
    assert "from the cache" in result.stderr
    again = pq.read_table(tmp_path / "c.parquet").to_pylist()
    assert [(r["label"], r["label_votes"]) for r in again] == [(r["label"], r["label_votes"]) for r in rows]
    assert all(r["cost_usd"] == 0 for r in again)


def test_schema_gives_typed_columns(sandbox_factory, tmp_path: Path) -> None:
    schema = {
        "type": "object",
        "properties": {
            "stars": {"type": "integer"},
            "tone": {"enum": ["happy", "unhappy", "unsure"]},
            "topics": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["stars", "tone"],
    }
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    box = sandbox_factory()
    src, out = labeling_input(tmp_path, 30), tmp_path / "o.parquet"
    args = schema_args(src, out, path)
    result = run_cli([*args, "--max-tokens", "64"], env=box.env())
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table.schema.field("stars").type == pa.int64()
    assert table.schema.field("tone").type == pa.string()
    assert table.schema.field("topics").type == pa.list_(pa.string())
    assert all(
        r["tone"] in ("happy", "unhappy", "unsure") and isinstance(r["stars"], int) for r in table.to_pylist()
    )
    bad = sandbox_factory(label_out_of_set=1.0)  # the first property gets a string
    out2 = tmp_path / "o2.parquet"
    result = run_cli([*args[:3], str(out2), *args[4:], "--max-tokens", "64", "--reask", "0"], env=bad.env())
    assert result.exit_code == 1
    assert {r["parse_error"] for r in pq.read_table(out2).to_pylist()} == {"schema:stars"}
    # eval scores a schema field against gold: an enum here.
    gold = tmp_path / "gold.parquet"
    rows = table.to_pylist()
    pq.write_table(pa.table({"id": [r["id"] for r in rows], "text": [r["text"] for r in rows]}), gold)
    with_gold = pa.Table.from_pylist(
        [{**r, "gold": "happy" if k % 2 else r["tone"]} for k, r in enumerate(rows)]
    )
    pq.write_table(with_gold, tmp_path / "scored.parquet")
    result = run_cli(
        ["eval", str(tmp_path / "scored.parquet"), "--gold", "gold", "--field", "tone", "--format", "json"]
    )
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)
    expected = sum(1 for k, r in enumerate(rows) if ("happy" if k % 2 else r["tone"]) == r["tone"])
    assert scored["correct"] == expected and scored["field"] == "tone"
    missing = run_cli(["eval", str(out), "--gold", "tone"])
    assert missing.exit_code == 2 and "--field NAME" in missing.stderr


def test_reparse_reads_stored_replies_again_without_requests(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(label_out_of_set=0.2)
    src, out = labeling_input(tmp_path, 100), tmp_path / "o.parquet"
    first = run_labels(box, src, out, "--reask", "0")
    assert first.exit_code == 1  # some answered "mixed": invalid
    invalid = [r for r in pq.read_table(out).to_pylist() if r["status"] == "invalid"]
    assert invalid and all(r["parse_error"] == "not_in_set:mixed" for r in invalid)
    sent = box.count()
    args = [
        "run",
        str(src),
        "-o",
        str(out),
        "--template",
        "Classify: {text}",
        "--labels",
        "positive,negative,neutral,mixed",
    ]
    # Without --reparse, the refusal names it: the free way on, before --restart's paid one.
    refused = run_cli(
        [*args, "--rpm", "0", "--max-tokens", "16", "--id-column", "id", "--reask", "0"], env=box.env()
    )
    assert refused.exit_code == 2 and box.count() == sent
    assert "--reparse reads its replies again under these labels or schema, sending nothing" in refused.stderr
    # A --reparse refused for another change (the template) leaves the journal as it was.
    other = [a.replace("Classify: {text}", "CLASSIFY: {text}") for a in args]
    tail = ["--rpm", "0", "--max-tokens", "16", "--id-column", "id", "--reask", "0", "--reparse"]
    assert run_cli([*other, *tail], env=box.env()).exit_code == 2
    same = [a.replace(",mixed", "") for a in args]
    assert run_cli([*same, *tail[:-1]], env=box.env()).exit_code == 1  # resumes: its invalid rows stay
    result = run_cli(
        [*args, "--rpm", "0", "--max-tokens", "16", "--id-column", "id", "--reask", "0", "--reparse"],
        env=box.env(),
    )
    assert result.exit_code == 0, result.output
    assert box.count() == sent
    assert "0 to send" in result.stderr  # it reads the stored replies again; it sends nothing
    relabeled = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    assert all(relabeled[r["id"]]["label"] == "mixed" for r in invalid)


def test_retry_errors_reasks_invalid_rows_and_keeps_every_cost_under_the_cap(
    sandbox_factory, tmp_path: Path
) -> None:
    # --reask 0 under a cap, then --retry-errors five times: each retry re-asks the invalid rows
    # once, every answer stays in the output's cost, and the bill never passes the cap.
    box = sandbox_factory(label_out_of_set=0.4, label_wrong=0.1)
    src, out = labeling_input(tmp_path, 120), tmp_path / "o.parquet"
    cap = "0.004"
    first = run_labels(box, src, out, "--reask", "0", "--max-cost", cap)
    assert first.exit_code in (1, 3)
    for _ in range(5):
        result = run_labels(box, src, out, "--reask", "0", "--max-cost", cap, "--retry-errors")
        assert result.exit_code in (0, 1, 3), result.output
        stats = box.sandbox.stats
        billed = stats["prompt_tokens"] * 310_000 + stats["completion_tokens"] * 340_000
        rows = pq.read_table(out).to_pylist()
        paid = sum(round(r["cost_usd"] * 10**12) for r in rows if r["cost_usd"] is not None)
        summary = orjson.loads(pq.read_metadata(out).metadata[b"batchllm"])
        assert paid == billed == round(float(summary["cost_usd"]["total"]) * 10**12)
        assert billed <= 4_000_000_000
    assert stats["labeling_reasks"] > 0
    assert any(r["reasks"] == 1 and r["status"] == "ok" for r in rows)  # re-asked by a retry, and read


def test_sigkill_during_reasks_resumes_without_paying_twice(sandbox_factory, tmp_path: Path) -> None:
    n = 300
    src = labeling_input(tmp_path, n)
    reference = sandbox_factory(label_out_of_set=0.5)
    run_labels(reference, src, tmp_path / "ref.parquet", "--reask", "1")
    expected_requests = reference.count()
    box = sandbox_factory(label_out_of_set=0.5, latency=0.05)
    out = tmp_path / "o.parquet"
    args = ["run", str(src), "-o", str(out), "--template", "Classify: {text}", "--labels", ",".join(LABELS)]
    args += ["--rpm", "0", "--max-tokens", "16", "--id-column", "id", "--reask", "1", "--concurrency", "8"]
    proc = spawn(args, env=box.env())
    deadline = time.monotonic() + 60
    while box.sandbox.stats["labeling_reasks"] < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    assert box.sandbox.stats["labeling_reasks"] >= 20
    result = run_cli(args, env=box.env())
    assert result.exit_code == 0, result.output
    done, ref = pq.read_table(out).to_pylist(), pq.read_table(tmp_path / "ref.parquet").to_pylist()
    keys = ("id", "label", "response", "reasks", "prompt_tokens", "completion_tokens", "cost_usd", "status")
    assert [{k: r[k] for k in keys} for r in done] == [{k: r[k] for k in keys} for r in ref]
    # Every reply received before the kill was journaled and reused: only requests in flight
    # at the kill (at most --concurrency) were sent again.
    assert expected_requests <= box.count() <= expected_requests + 8


def test_bad_labeling_flags(sandbox, tmp_path: Path) -> None:
    src = labeling_input(tmp_path, 3)
    base = ["run", str(src), "-o", str(tmp_path / "o.parquet"), "--template", "C: {text}"]
    for extra, message in [
        (["--labels", "onlyone"], "at least two labels"),
        (["--labels", "pos,,neg"], "an empty label in 'pos,,neg'"),
        (["--reask", "2"], "goes with --labels or --json-schema"),
        (["--labels", "a,b", "--samples", "2", "--adaptive"], "--samples 3 or more"),
        (["--json-schema", str(tmp_path / "nope.json")], "nope.json"),
    ]:
        result = run_cli([*base, *extra], env=sandbox.env())
        assert result.exit_code == 2 and message in result.output, result.output
    clash = write_csv(tmp_path / "clash.csv", [{"text": "x", "label": "y"}])
    result = run_cli(
        ["run", str(clash), "-o", str(tmp_path / "c.parquet"), "--template", "C: {text}", "--labels", "a,b"]
    )
    assert result.exit_code == 2 and "'label'" in result.output


def test_sandbox_faults_are_deterministic() -> None:
    assert fault("x", None, RATES) == fault("x", None, RATES)
    assert orjson.dumps(truth("I love it", LABELS)) == b'"positive"'


def test_replies_cut_at_max_tokens_are_one_count_everywhere(sandbox_factory, tmp_path: Path) -> None:
    """A cut-off answer makes its row invalid (with --reask 0) and was billed all the same: the
    output's column, the summary, the report and status count it."""
    box = sandbox_factory(label_truncated=0.3, seed=7)
    out = tmp_path / "o.parquet"
    result = run_labels(box, labeling_input(tmp_path, 80), out, "--reask", "0")
    assert result.exit_code == 1, result.output
    rows = pq.read_table(out).to_pylist()
    cut = sum(bool(r["truncated"]) for r in rows)
    assert cut > 0 and all(r["status"] == "invalid" for r in rows if r["truncated"])
    summary = orjson.loads(pq.read_metadata(out).metadata[b"batchllm"])
    assert summary["rows"]["truncated"] == cut
    assert f"{cut:,} replies cut at max_tokens" in result.output
    report = json.loads(run_cli(["report", str(out), "--format", "json"]).stdout)
    assert report["overall"]["truncated"] == cut
    assert f"{cut:,} replies cut at max_tokens" in run_cli(["status", str(out)]).stdout


def test_an_object_cut_at_max_tokens_is_not_reasked_at_the_same_limit(
    sandbox_factory, tmp_path: Path
) -> None:
    """A --json-schema reply cut at max_tokens is "truncated" (not invalid_json), and not re-asked:
    at the same limit it would be cut again, paid again. A higher --max-tokens names the rows, and
    --retry-errors sends them at it; the bill is the rows' costs exactly."""
    path = tmp_path / "schema.json"
    path.write_text(
        json.dumps(
            {
                "type": "object",
                "properties": {"stars": {"type": "integer"}, "note": {"type": "string"}},
                "required": ["stars", "note"],
            }
        )
    )
    box = sandbox_factory()
    src, out = labeling_input(tmp_path, 30), tmp_path / "o.parquet"
    args = schema_args(src, out, path)
    result = run_cli([*args, "--max-tokens", "4", "--max-error-rate", "1"], env=box.env())
    assert result.exit_code == 1, result.output
    rows = pq.read_table(out).to_pylist()
    assert {(r["status"], r["parse_error"], r["attempts"]) for r in rows} == {("invalid", "truncated", 1)}
    assert box.count() == 30  # one request a row: none re-asked
    wider = run_cli([*args, "--max-tokens", "64"], env=box.env())
    assert wider.exit_code == 1 and box.count() == 30, wider.output
    assert "30 invalid rows cut at 4: --retry-errors sends them at 64" in wider.output
    result = run_cli([*args, "--max-tokens", "64", "--retry-errors"], env=box.env())
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    assert all(r["status"] == "ok" for r in rows) and box.count() == 60
    stats = box.sandbox.stats
    billed = stats["prompt_tokens"] * 310_000 + stats["completion_tokens"] * 340_000
    assert billed == sum(round(r["cost_usd"] * 10**12) for r in rows)


def test_retry_errors_says_what_is_left_of_the_whole_file(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(label_out_of_set=0.3, seed=3)
    src, out = labeling_input(tmp_path, 24), tmp_path / "o.parquet"
    assert run_labels(box, src, out, "--reask", "0").exit_code == 1
    invalid = sum(r["status"] == "invalid" for r in pq.read_table(out).to_pylist())
    again = run_labels(box, src, out, "--reask", "0", "--retry-errors")
    assert f"24 rows in {src}, {invalid} to send ({24 - invalid} already done)" in again.output


def test_too_many_invalid_answers_stop_the_run_as_failures_do(sandbox_factory, tmp_path: Path) -> None:
    """Every answer outside the label set, no re-ask: --max-error-rate stops the run after its
    window (100 rows) instead of paying for all 400; the rest stays pending for a fixed job."""
    box = sandbox_factory(label_out_of_set=1.0)
    src = labeling_input(tmp_path, 400)
    out = tmp_path / "o.parquet"
    result = run_labels(box, src, out, "--reask", "0", "--concurrency", "4", "--cache", "off")
    assert result.exit_code == 4, result.output
    assert (
        "too many errors: 100 of the last 100 rows failed or were invalid (--max-error-rate)" in result.stderr
    )
    assert "once the cause in the error column is fixed (or with a higher --max-error-rate)" in result.stderr
    assert 100 <= box.count() <= 104
    statuses = Counter(pq.read_table(out).column("status").to_pylist())
    assert statuses["invalid"] == box.count() and statuses["ok"] == 0
    assert summary_of(out)["rows"]["failed"] == statuses["invalid"]  # what a cron job alerts on


def test_eval_of_a_stopped_output_costs_a_correct_label_over_the_rows_answered(
    sandbox_factory, tmp_path: Path
) -> None:
    """A labeling run stopped by --max-cost part way: its cost paid for the rows answered only, so
    a correct label costs the output's cost over the correct labels among them, exactly (not over
    the correct labels its accuracy would project to in all its rows, pending ones included); with
    gold on some rows only, over the correct labels their accuracy projects to in the rows answered."""
    box = sandbox_factory(label_wrong=0.4)
    n = 300
    all_texts = texts(n)
    gold = [truth(f"Classify: {t}", LABELS) for t in all_texts]
    src = tmp_path / "in.parquet"  # "half": gold on every other row, null on the rest
    pq.write_table(pa.Table.from_pylist(
        [{"id": f"r{i}", "text": t, "gold": g, "half": g if i % 2 else None}
         for i, (t, g) in enumerate(zip(all_texts, gold, strict=True))]), src)  # fmt: skip
    out = tmp_path / "o.parquet"
    result = run_labels(box, src, out, "--reask", "0", "--max-cost", "0.0015", "--concurrency", "4")
    assert result.exit_code == 3, result.output
    rows = pq.read_table(out).to_pylist()
    answered = [r for r in rows if r["status"] != "pending"]
    assert 0 < len(answered) < n // 2
    cost = sum(round(r[c] * 10**12) for r in answered for c in ("input_cost_usd", "output_cost_usd"))
    stats = box.sandbox.stats
    assert cost == stats["prompt_tokens"] * 310_000 + stats["completion_tokens"] * 340_000  # the bill
    correct = sum(r["status"] == "ok" and r["label"] == r["gold"] for r in answered)
    assert 0 < correct < len(answered)

    e = json.loads(run_cli(["eval", str(out), "--gold", "gold", "--format", "json"]).stdout)
    assert e["correct"] == correct and e["n"] == len(answered) and pico(e["cost_usd"]) == cost
    assert pico(e["cost_per_correct_usd"]) == (2 * cost + correct) // (2 * correct)  # cost / correct, rounded
    pending = n - len(answered)
    assert e["cost_per_correct_basis"] == (
        f"counted: the output's cost over the {correct:,} correct labels among its {len(answered):,} rows "
        f"answered ({pending:,} not sent yet, left out)"
    )
    text = " ".join(run_cli(["eval", str(out), "--gold", "gold"]).stdout.split())
    assert f"${e['cost_per_correct_usd']} (counted: the output's cost over the {correct:,} correct" in text

    half = json.loads(run_cli(["eval", str(out), "--gold", "half", "--format", "json"]).stdout)
    scored = [r for r in answered if r["half"] is not None]
    right = sum(r["status"] == "ok" and r["label"] == r["half"] for r in scored)
    assert half["n"] == len(scored) < len(answered) and half["correct"] == right > 0
    # cost / (accuracy x rows answered) = cost x scored / (right x answered), rounded
    estimate = right * len(answered)
    assert pico(half["cost_per_correct_usd"]) == (2 * cost * len(scored) + estimate) // (2 * estimate)
    assert half["cost_per_correct_basis"].endswith(
        f"projects to among its {len(answered):,} rows answered ({pending:,} not sent yet, left out)"
    )


def pico(usd: str) -> int:
    """Picodollars of a report's exact dollars."""
    return round(Decimal(usd) * 10**12)
