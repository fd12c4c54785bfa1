"""OpenAI batch files: request files as input, export-batch, import-batch, against the sandbox."""

from __future__ import annotations

import json
import shlex
import urllib.error
import urllib.request
from decimal import Decimal
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest

from .conftest import ROOT, prompts_csv, run_cli, summary_of

JOB = ["--job", str(ROOT / "jobs" / "one_word_sentiment.toml"), "--provider", "openai"]
LIVE_PRICES = ["--input-price", "0.31", "--output-price", "0.34"]
BATCH_PRICES = ["--input-price", "0.155", "--output-price", "0.17"]
TIMING_AND_COST = {"latency_ms", "finished_at", "input_cost_usd", "output_cost_usd", "cost_usd"}


def answer_batch(
    box,
    requests: Path,
    results: Path,
    errors: Path,
    *,
    missing: frozenset[int] = frozenset(),
    failed: frozenset[int] = frozenset(),
    expired: frozenset[int] = frozenset(),
) -> None:
    """A stand-in for a batch service: posts each body to the sandbox's OpenAI face and writes
    OpenAI's result lines (successes) and error lines (HTTP errors, expiries)."""
    with open(results, "wb") as out, open(errors, "wb") as err:
        for k, line in enumerate(requests.read_bytes().splitlines()):
            record = json.loads(line)
            cid = record["custom_id"]
            if k in missing:
                continue
            if k in expired:
                err.write(
                    orjson.dumps(
                        {
                            "id": f"batch_req_{k}",
                            "custom_id": cid,
                            "response": None,
                            "error": {
                                "code": "batch_expired",
                                "message": "This request could not be executed",
                            },
                        }
                    )
                    + b"\n"
                )
                continue
            if k in failed:
                body = {
                    "error": {"message": "Invalid 'messages'", "type": "invalid_request_error", "code": None}
                }
                line_out = {"id": f"b{k}", "custom_id": cid, "response": {"status_code": 400, "body": body}}
                err.write(orjson.dumps({**line_out, "error": None}) + b"\n")
                continue
            req = urllib.request.Request(
                box.openai_url + "/chat/completions",
                data=json.dumps(record["body"]).encode(),
                headers={"Authorization": f"Bearer {box.key}", "Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=10) as r:
                body = json.loads(r.read())
            response = {"status_code": 200, "request_id": f"req_{k}", "body": body}
            out.write(
                orjson.dumps({"id": f"b{k}", "custom_id": cid, "response": response, "error": None}) + b"\n"
            )


def table(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def test_export_answer_import_equals_a_live_run(sandbox, tmp_path: Path) -> None:
    requests, results, errors = tmp_path / "req.jsonl", tmp_path / "res.jsonl", tmp_path / "err.jsonl"
    out, live = tmp_path / "imported.parquet", tmp_path / "live.parquet"
    exported = run_cli(["export-batch", *JOB, "-o", str(requests)])
    assert exported.exit_code == 0, exported.output
    assert len(requests.read_bytes().splitlines()) == 200
    answer_batch(sandbox, requests, results, errors)
    result = run_cli(["import-batch", str(results), str(errors), *JOB, "-o", str(out), *BATCH_PRICES])
    assert result.exit_code == 0, result.output
    sent = sandbox.count()
    assert (
        run_cli(
            ["run", *JOB, "-o", str(live), "--rpm", "0", *LIVE_PRICES], env=sandbox.openai_env()
        ).exit_code
        == 0
    )
    imported, reference = table(out), table(live)
    paid = sum(not r["answered_by"] for r in reference)  # a live run sends identical prompts once
    assert sandbox.count() == sent + paid
    assert len(imported) == len(reference) == 200
    for a, b in zip(imported, reference, strict=True):
        if b["answered_by"]:
            assert a["response"] == b["response"]
            continue
        assert {k: v for k, v in a.items() if k not in TIMING_AND_COST} == {
            k: v for k, v in b.items() if k not in TIMING_AND_COST
        }
        # half the price: the batch discount
        assert a["cost_usd"] == pytest.approx(
            (a["prompt_tokens"] * 0.155 + a["completion_tokens"] * 0.17) / 1e6
        )
    # A later run of the same job into the imported output sends nothing.
    again = run_cli(["run", *JOB, "-o", str(out), "--rpm", "0", *LIVE_PRICES], env=sandbox.openai_env())
    assert again.exit_code == 0 and sandbox.count() == sent + paid


def test_missing_failed_and_expired_results(sandbox, tmp_path: Path) -> None:
    requests, results, errors = tmp_path / "req.jsonl", tmp_path / "res.jsonl", tmp_path / "err.jsonl"
    out = tmp_path / "o.parquet"
    assert run_cli(["export-batch", *JOB, "-o", str(requests)]).exit_code == 0
    missing = frozenset(range(0, 200, 10))  # 10%
    failed = frozenset(range(1, 200, 20))  # 5%
    expired = frozenset({3, 103, 153, 193})  # 2%
    answer_batch(sandbox, requests, results, errors, missing=missing, failed=failed, expired=expired)
    result = run_cli(["import-batch", str(results), str(errors), *JOB, "-o", str(out), *BATCH_PRICES])
    assert result.exit_code == 1, result.output  # some rows failed
    rows = table(out)
    ids = [json.loads(line)["custom_id"] for line in requests.read_bytes().splitlines()]
    status = {r["row_id"]: r["status"] for r in rows}
    assert {ids[k] for k in failed} == {i for i, s in status.items() if s == "error"}
    pending = {ids[k] for k in missing | expired}
    assert pending == {i for i, s in status.items() if s == "pending"}
    assert all("Invalid 'messages'" in r["error"] for r in rows if r["status"] == "error")
    # status counts add up
    shown = run_cli(["status", str(out)])
    assert (
        f"rows: {200 - len(pending):,} done ({200 - len(pending) - len(failed):,} ok, {len(failed)} error)"
        in shown.output
    )
    # export --skip-done lists exactly the pending rows
    rest = tmp_path / "rest.jsonl"
    assert run_cli(["export-batch", *JOB, "-o", str(rest), "--skip-done", str(out)]).exit_code == 0
    assert {json.loads(line)["custom_id"] for line in rest.read_bytes().splitlines()} == pending
    # the live run sends exactly the missing and expired rows
    before = sandbox.count()
    live = run_cli(["run", *JOB, "-o", str(out), "--rpm", "0", *LIVE_PRICES], env=sandbox.openai_env())
    assert live.exit_code == 1  # the failed rows are still failed
    assert sandbox.count() - before == len(pending)
    final = table(out)
    assert sum(r["status"] == "ok" for r in final) == 200 - len(failed)


def test_importing_twice_changes_nothing(sandbox, tmp_path: Path) -> None:
    requests, results, errors = tmp_path / "req.jsonl", tmp_path / "res.jsonl", tmp_path / "err.jsonl"
    out = tmp_path / "o.parquet"
    assert run_cli(["export-batch", *JOB, "-o", str(requests)]).exit_code == 0
    answer_batch(sandbox, requests, results, errors, failed=frozenset({5, 6}))
    args = ["import-batch", str(results), str(errors), *JOB, "-o", str(out), *BATCH_PRICES]
    assert run_cli(args).exit_code == 1
    first = pq.read_table(out)
    journal_before = (out.with_name(out.name + ".batchllm") / "journal.sqlite").read_bytes()
    second = run_cli(args)
    assert second.exit_code == 1 and "200 were in the journal already" in second.output
    assert pq.read_table(out).equals(first)
    from batchllm.engine.journal import Journal

    journal = Journal.open_readonly(out.with_name(out.name + ".batchllm"))
    assert journal.counts_before == {"ok": 198, "error": 2}
    journal.conn.close()
    assert journal_before  # the database existed; its rows are what the counts show
    # Each import is a ledger record (issue 22): the first holds the batch's cost, the second nothing.
    runs = json.loads(run_cli(["spend", "--runs", "--format", "json"]).stdout)["runs"]
    assert [(r["kind"], r["exit_code"], r["rows_ok"]) for r in runs] == [("import", 1, 198), ("import", 1, 0)]
    assert runs[0]["cost_usd"] == summary_of(out)["cost_usd"]["total"] and runs[1]["cost_usd"] == "0.00"


def test_a_cut_off_last_line_is_reported_and_the_rest_imported(sandbox, tmp_path: Path) -> None:
    requests, results, errors = tmp_path / "req.jsonl", tmp_path / "res.jsonl", tmp_path / "err.jsonl"
    out = tmp_path / "o.parquet"
    assert run_cli(["export-batch", *JOB, "-o", str(requests)]).exit_code == 0
    answer_batch(sandbox, requests, results, errors)
    data = results.read_bytes()
    results.write_bytes(data[: len(data) - 40])  # the last line loses its end
    result = run_cli(["import-batch", str(results), *JOB, "-o", str(out), *BATCH_PRICES])
    assert result.exit_code == 0, result.output
    assert "is cut off (not imported)" in result.output
    rows = table(out)
    assert sum(r["status"] == "ok" for r in rows) == 199 and sum(r["status"] == "pending" for r in rows) == 1
    # status names the run that sends the pending row, not the import (which would send nothing).
    status = run_cli(["status", str(out)]).stdout
    assert "to send the rows not done live: batchllm run " in status and "import-batch" not in status, status


def test_vllm_results_with_errors_inline(sandbox, tmp_path: Path) -> None:
    """vLLM's run_batch: one file, flat or enveloped responses, errors as strings."""
    requests = tmp_path / "req.jsonl"
    out = tmp_path / "o.parquet"
    assert run_cli(["export-batch", *JOB, "-o", str(requests)]).exit_code == 0
    lines = []
    for k, line in enumerate(requests.read_bytes().splitlines()[:3]):
        cid = json.loads(line)["custom_id"]
        if k == 2:
            lines.append(
                {"id": "v2", "custom_id": cid, "response": {"status_code": 400}, "error": "bad request"}
            )
            continue
        body = {
            "id": "cmpl",
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": f"positive {k}"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 40, "completion_tokens": 2, "total_tokens": 42},
        }
        response = body if k == 0 else {"status_code": 200, "request_id": "x", "body": body}
        lines.append({"id": f"v{k}", "custom_id": cid, "response": response, "error": None})
    vllm = tmp_path / "vllm.jsonl"
    vllm.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines))
    result = run_cli(["import-batch", str(vllm), *JOB, "-o", str(out), *BATCH_PRICES])
    assert result.exit_code == 1, result.output
    rows = table(out)
    assert [r["status"] for r in rows[:3]] == ["ok", "ok", "error"]
    assert rows[0]["response"] == "positive 0" and "bad request" in rows[2]["error"]


OTHERS = [
    {
        "custom_id": "ticket-7f3a",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "meta/llama-3.1-70b-instruct",
            "messages": [
                {"role": "system", "content": "You triage tickets."},
                {"role": "user", "content": "Login fails"},
            ],
            "max_tokens": 5,
            "temperature": 0.3,
        },
    },
    {
        "custom_id": "ticket-9c01",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "meta/llama-3.1-70b-instruct",
            "messages": [{"role": "user", "content": "Refund please"}],
            "max_completion_tokens": 40,
        },
    },
]


@pytest.mark.parametrize("provider", ["dataoorts", "openai"])
def test_someone_elses_request_file_runs(sandbox_factory, tmp_path: Path, provider: str) -> None:
    box = sandbox_factory(keep_bodies=True, reply_tokens=(20, 30))
    src = tmp_path / "theirs.jsonl"
    src.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in OTHERS) + b"\n")
    out = tmp_path / "o.parquet"
    env = box.env() if provider == "dataoorts" else box.openai_env()
    extra = [] if provider == "dataoorts" else LIVE_PRICES
    result = run_cli(["run", str(src), "-o", str(out), "--rpm", "0", "--provider", provider, *extra], env=env)
    assert result.exit_code == 0, result.output
    rows = table(out)
    assert [r["custom_id"] for r in rows] == ["ticket-7f3a", "ticket-9c01"]
    assert [r["completion_tokens"] for r in rows] == [
        5,
        20 if rows[1]["completion_tokens"] == 20 else rows[1]["completion_tokens"],
    ]
    assert rows[0]["truncated"] and rows[0]["completion_tokens"] == 5
    sent = [json.loads(b) for b in box.sandbox.bodies]
    data = [s.get("data", s) for s in sent]
    by_user = {d["messages"][-1]["content"]: d for d in data}
    assert by_user["Login fails"]["temperature"] == 0.3 and by_user["Login fails"]["max_tokens"] == 5
    assert by_user["Refund please"]["max_tokens"] == 40  # max_completion_tokens, sent as the provider's name
    assert [m["role"] for m in by_user["Login fails"]["messages"]] == ["system", "user"]
    # A second run sends nothing.
    before = box.count()
    assert (
        run_cli(
            ["run", str(src), "-o", str(out), "--rpm", "0", "--provider", provider, *extra], env=env
        ).exit_code
        == 0
    )
    assert box.count() == before


@pytest.mark.parametrize(
    ("lines", "extra", "message"),
    [
        ([OTHERS[0], OTHERS[0]], [], "line 2: custom_id 'ticket-7f3a' is a duplicate (first on line 1)"),
        ([OTHERS[0], "{not json"], [], "line 2 is not valid JSON"),
        (
            [OTHERS[0], {**OTHERS[1], "body": {**OTHERS[1]["body"], "logit_bias": {"1": 2}}}],
            [],
            "line 2: body field 'logit_bias' is not a parameter the dataoorts provider can send",
        ),
        ([OTHERS[0]], ["--template", "x {a}"], "is a request file"),
        (
            [{**OTHERS[0], "body": {**OTHERS[0]["body"], "temperature": 9}}],
            [],
            "line 1: body field 'temperature' must be",
        ),
    ],
)
def test_bad_request_files(sandbox, tmp_path: Path, lines: list, extra: list[str], message: str) -> None:
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b"".join((x.encode() if isinstance(x, str) else orjson.dumps(x)) + b"\n" for x in lines))
    out = tmp_path / "o.parquet"
    result = run_cli(["run", str(src), "-o", str(out), *extra], env=sandbox.env())
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert sandbox.count() == 0 and not out.exists()


def test_import_takes_the_input_first_as_export_does(sandbox, tmp_path: Path) -> None:
    """import-batch INPUT RESULTS... as export-batch INPUT: the first file, when it is not a
    results file, is the job's input; --input still works, and the two naming different files is
    a one-line usage error."""
    src, other = prompts_csv(tmp_path / "in.csv", 20), prompts_csv(tmp_path / "other.csv", 20, start=50)
    requests, results, errors = tmp_path / "req.jsonl", tmp_path / "res.jsonl", tmp_path / "err.jsonl"
    job = ["--provider", "openai", "--id-column", "id", "--max-tokens", "16", *BATCH_PRICES]
    assert run_cli(["export-batch", str(src), *job, "-o", str(requests)]).exit_code == 0
    answer_batch(sandbox, requests, results, errors, missing=frozenset({3}))
    out = tmp_path / "o.parquet"
    both = run_cli(
        ["import-batch", str(src), str(results), str(errors), "--input", str(other), *job, "-o", str(out)]
    )
    assert both.exit_code == 2 and len(both.output.strip().splitlines()) == 1, both.output
    assert f"--input {other} and INPUT {src} name different files" in both.output and not out.exists()
    alone = run_cli(["import-batch", str(src), *job, "-o", str(out)])
    assert alone.exit_code == 2 and len(alone.output.strip().splitlines()) == 1, alone.output
    assert "not a batch results file" in alone.output and "import-batch INPUT RESULTS..." in alone.output
    result = run_cli(["import-batch", str(src), str(results), str(errors), *job, "-o", str(out)])
    assert result.exit_code == 0, result.output
    status = [r["status"] for r in table(out)]
    assert status.count("ok") == 19 and status[3] == "pending"
    assert f"batchllm run {src} " in result.output  # the live command that sends the rest
    same = run_cli(["import-batch", str(src), str(results), "--input", str(src), *job, "-o", str(out)])
    assert same.exit_code == 0 and "19 were in the journal already" in same.output, same.output


def test_a_result_for_an_unknown_row_imports_nothing(sandbox, tmp_path: Path) -> None:
    requests, results, errors = tmp_path / "req.jsonl", tmp_path / "res.jsonl", tmp_path / "err.jsonl"
    out = tmp_path / "o.parquet"
    assert run_cli(["export-batch", *JOB, "-o", str(requests)]).exit_code == 0
    answer_batch(sandbox, requests, results, errors, missing=frozenset(range(5, 200)))
    with open(results, "ab") as fh:
        fh.write(orjson.dumps({"custom_id": "nobody", "response": {"status_code": 200, "body": {}}}) + b"\n")
    result = run_cli(["import-batch", str(results), *JOB, "-o", str(out), *BATCH_PRICES])
    assert result.exit_code == 2
    assert "line 6: custom_id 'nobody' is not a row of" in result.output
    assert not out.exists() and not out.with_name(out.name + ".batchllm").exists()


def test_openai_results_import_under_a_dataoorts_job(sandbox, tmp_path: Path) -> None:
    """The README's example: the job speaks Dataoorts, the batch API answered in OpenAI's shape."""
    job = ["--job", str(ROOT / "jobs" / "one_word_sentiment.toml")]
    requests, results, errors = tmp_path / "req.jsonl", tmp_path / "res.jsonl", tmp_path / "err.jsonl"
    out = tmp_path / "imported.parquet"
    assert run_cli(["export-batch", *job, "-o", str(requests)]).exit_code == 0
    answer_batch(sandbox, requests, results, errors, missing=frozenset({3}), failed=frozenset({5}))
    result = run_cli(["import-batch", str(results), str(errors), *job, "-o", str(out)])
    assert result.exit_code == 1, result.output  # one failed request
    assert "imported 198 replies and 1 failed request" in result.stderr
    assert "done (INCOMPLETE): 198 ok, 1 failed, 1 pending of 200 rows" in result.stderr
    rows = table(out)
    assert sum(r["status"] == "ok" and bool(r["response"]) for r in rows) == 198
    status = run_cli(["status", str(out)])
    assert "1 not done of 200" in status.output
    # Dataoorts lists no batch prices: the live ones price the rows, said once, and the ledger has it.
    notice = (
        "warning: no batch prices for 'meta/llama-3.1-70b-instruct' in the dataoorts model table: imported "
        "rows are priced at its live prices ($0.31 / $0.34 per million input / output tokens)"
    )
    assert result.stderr.count(notice) == 1 and "null" not in result.stderr
    ok = [r for r in rows if r["status"] == "ok"]
    tokens = [sum(r[k] for r in ok) for k in ("prompt_tokens", "completion_tokens")]
    cost = (tokens[0] * Decimal("0.31") + tokens[1] * Decimal("0.34")) / 10**6
    assert Decimal(summary_of(out)["cost_usd"]["total"]) == cost > 0
    runs = json.loads(run_cli(["spend", "--runs", "--format", "json"]).stdout)["runs"]
    assert [(r["kind"], Decimal(r["cost_usd"])) for r in runs] == [("import", cost)]
    # The closing hint is the live run that sends the one row left, never the import again.
    hint = result.stderr.strip().splitlines()[-1]
    assert hint.startswith("1 row is still pending (no result in these files, expired, or 429/5xx)"), hint
    command = shlex.split(hint.split("to send only those live: ", 1)[1])
    assert command[:2] == ["batchllm", "run"] and "import-batch" not in hint
    before = sandbox.count()
    live = run_cli(command[1:], env=sandbox.env())
    assert live.exit_code == 1 and sandbox.count() - before == 1, live.output  # the failed row stays
    assert sum(r["status"] == "ok" for r in table(out)) == 199


def test_a_success_line_that_cannot_be_read_is_counted_not_dropped(sandbox, tmp_path: Path) -> None:
    job = ["--job", str(ROOT / "jobs" / "one_word_sentiment.toml")]
    requests, results, errors = tmp_path / "req.jsonl", tmp_path / "res.jsonl", tmp_path / "err.jsonl"
    assert run_cli(["export-batch", *job, "-o", str(requests)]).exit_code == 0
    answer_batch(sandbox, requests, results, errors)
    lines = results.read_bytes().splitlines()
    broken = json.loads(lines[0])
    broken["response"]["body"] = {"unexpected": "shape"}
    results.write_bytes(b"\n".join([json.dumps(broken).encode(), *lines[1:]]) + b"\n")
    result = run_cli(["import-batch", str(results), str(errors), *job, "-o", str(tmp_path / "o.parquet")])
    assert "1 success lines had no readable reply (left pending)" in result.stderr
    assert "imported 199 replies" in result.stderr


def test_a_labeling_job_imports_labels_and_retry_errors_reasks_the_invalid(
    sandbox_factory, tmp_path: Path
) -> None:
    box = sandbox_factory(label_out_of_set=0.3)
    job = ["--job", str(ROOT / "jobs" / "sentiment.toml"), "-o", str(tmp_path / "l.parquet")]
    requests, results, errors = tmp_path / "req.jsonl", tmp_path / "res.jsonl", tmp_path / "err.jsonl"
    assert run_cli(["export-batch", *job[:2], "-o", str(requests)]).exit_code == 0
    answer_batch(box, requests, results, errors)
    result = run_cli(["import-batch", str(results), str(errors), *job])
    assert result.exit_code == 1, result.output
    rows = table(tmp_path / "l.parquet")
    invalid = [r for r in rows if r["status"] == "invalid"]
    assert invalid and all(r["parse_error"].startswith("not_in_set:") for r in invalid)
    assert all(r["label"] in ("positive", "negative", "neutral") for r in rows if r["status"] == "ok")
    before = box.count()
    again = run_cli(["run", *job, "--retry-errors", "--rpm", "0"], env=box.env())
    assert again.exit_code in (0, 1)
    assert box.count() - before == len(invalid)  # one re-ask each, nothing else
    assert sum(r["reasks"] == 1 for r in table(tmp_path / "l.parquet")) == len(invalid)


def test_export_refuses_samples_and_lists_no_run_only_flags(tmp_path: Path) -> None:
    job = ["--job", str(ROOT / "jobs" / "sentiment.toml")]
    result = run_cli(["export-batch", *job, "-o", str(tmp_path / "r.jsonl"), "--samples", "3"])
    assert result.exit_code == 2 and "--samples 3" in result.stderr
    text = run_cli(["export-batch", "--help"]).output
    for flag in ("--rpm", "--grace", "--max-cost", "--concurrency"):
        assert flag not in text
    assert "Parquet" not in text.split("-o, --output")[1].split("\n  -")[0]


def test_a_fleet_batch_goes_to_one_endpoint_and_the_live_fleet_run_finishes_it(
    sandbox, tmp_path: Path
) -> None:
    """`export-batch --fleet F` writes the file for the fleet's endpoint that takes batch files
    (its model's name in every line); `import-batch --fleet F` prices its replies at that endpoint's
    prices and names it in each row; `run --fleet F` then sends only what the batch left."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        f'[[endpoint]]\nname = "live"\nprovider = "dataoorts"\nendpoint = "{sandbox.url}"\nkey_env = "LIVE_KEY"\n'
        'model = "meta/llama-3.1-70b-instruct"\nrpm = 6000\n\n'
        f'[[endpoint]]\nname = "bulk"\nprovider = "openai"\nendpoint = "{sandbox.openai_url}"\nkey_env = "BULK_KEY"\n'
        'model = "meta-llama/Llama-3.1-70B-Instruct"\nrpm = 6000\ninput_price = "0.20"\noutput_price = "0.25"\n'
    )  # fmt: skip
    job = ["--job", str(ROOT / "jobs" / "one_word_sentiment.toml")]
    requests, results, errors = tmp_path / "req.jsonl", tmp_path / "res.jsonl", tmp_path / "err.jsonl"
    out = tmp_path / "out.parquet"
    exported = run_cli(["export-batch", *job, "-o", str(requests), "--fleet", str(fleet)])
    assert exported.exit_code == 0 and "'bulk'" in exported.stdout, exported.output
    lines = [json.loads(x) for x in requests.read_bytes().splitlines()]
    assert len(lines) == 200 and {x["body"]["model"] for x in lines} == {"meta-llama/Llama-3.1-70B-Instruct"}
    answer_batch(sandbox, requests, results, errors, missing=frozenset(range(50)))
    imported = run_cli(
        ["import-batch", str(results), str(errors), *job, "-o", str(out), "--fleet", str(fleet)]
    )
    assert imported.exit_code == 0, imported.output
    rows = [r for r in table(out) if r["status"] == "ok"]
    assert len(rows) >= 150 and {r["endpoint"] for r in rows if not r["answered_by"]} == {"bulk"}
    for r in rows:
        if not r["answered_by"]:
            assert (
                round(r["cost_usd"] * 10**12)
                == r["prompt_tokens"] * 200_000 + r["completion_tokens"] * 250_000
            )
    sent = sandbox.count()
    env = {"LIVE_KEY": sandbox.key, "BULK_KEY": sandbox.key}
    live = run_cli(["run", *job, "-o", str(out), "--fleet", str(fleet), "--progress", "none"], env=env)
    assert live.exit_code == 0, live.output
    done = table(out)
    assert all(r["status"] == "ok" for r in done) and len(done) == 200
    assert sandbox.count() - sent == sum(1 for r in done if r["status"] == "ok" and not r["answered_by"]) - sum(
        1 for r in rows if not r["answered_by"])  # fmt: skip
    by = json.loads(run_cli(["report", str(out), "--format", "json"]).stdout)
    assert sum(Decimal(e["cost_usd"]) for e in by["endpoints"].values()) == Decimal(by["overall"]["cost_usd"])


def test_an_import_without_prices_is_unpriced_in_the_ledger(sandbox, tmp_path: Path) -> None:
    """Results of a model with no price imported without prices: the ledger's record says its cost
    is unknown, and `spend`'s total is the priced import's cost alone."""
    src = prompts_csv(tmp_path / "in.csv", 12)
    opts = [
        "--template",
        "Say: {prompt}",
        "--provider",
        "openai",
        "--model",
        "meta-llama/Llama-3.1-8B-Instruct",
    ]
    job = [*opts, "--input", str(src)]
    requests, results, errors = tmp_path / "req.jsonl", tmp_path / "res.jsonl", tmp_path / "err.jsonl"
    assert run_cli(["export-batch", str(src), *opts, "-o", str(requests)]).exit_code == 0
    answer_batch(sandbox, requests, results, errors)
    bare, paid = tmp_path / "bare.parquet", tmp_path / "paid.parquet"
    result = run_cli(["import-batch", str(results), *job, "-o", str(bare)])
    assert result.exit_code == 0 and "cost columns of imported rows will be null" in result.stderr, (
        result.output
    )
    assert run_cli(["import-batch", str(results), *job, "-o", str(paid), *BATCH_PRICES]).exit_code == 0
    report = json.loads(run_cli(["spend", "--runs", "--format", "json"]).stdout)
    cost = summary_of(paid)["cost_usd"]["total"]
    assert [(Path(r["output"]).name, r["kind"], r["priced"], r["cost_usd"]) for r in report["runs"]] == [
        ("bare.parquet", "import", False, None), ("paid.parquet", "import", True, cost)]  # fmt: skip
    assert report["total"]["cost_usd"] == cost and report["total"]["unpriced"]["rows_ok"] == 12
