"""import-batch refuses replies to requests the job no longer sends (batch_keys.py), against the sandbox."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pyarrow.parquet as pq

from batchllm.engine.output import read_summary

from .conftest import ROOT, run_cli, write_csv
from .test_labeling import LABELS, texts
from .test_openai_batch import BATCH_PRICES, JOB, answer_batch

CHANGED = "were for requests that differ from the job's now"


def _files(tmp_path: Path) -> tuple[Path, Path, Path]:
    return tmp_path / "req.jsonl", tmp_path / "res.jsonl", tmp_path / "err.jsonl"


def _ids(requests: Path) -> list[str]:
    return [json.loads(line)["custom_id"] for line in requests.read_bytes().splitlines()]


def _status(out: Path) -> dict[str, str]:
    return {r["row_id"]: r["status"] for r in pq.read_table(out).to_pylist()}


def _billed(out: Path, *files: Path) -> Decimal:
    """What every reply in these result files cost, in dollars, exactly: each line's usage at the
    prices the import says it used (cached prompt tokens at its cached price)."""
    prices = read_summary(out)["prices"]  # type: ignore[index]
    ip, op = Decimal(prices["input_usd_per_million_tokens"]), Decimal(prices["output_usd_per_million_tokens"])
    cp = Decimal(prices.get("cached_input_usd_per_million_tokens", ip))
    total = Decimal(0)
    for f in files:
        for line in f.read_bytes().splitlines():
            response = json.loads(line)["response"] or {}
            if response.get("status_code") != 200:
                continue
            usage = response["body"]["usage"]
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            total += (usage["prompt_tokens"] - cached) * ip + cached * cp + usage["completion_tokens"] * op
    return total / 10**6


def _costs(out: Path, ledger: Path) -> tuple[Decimal, Decimal, Decimal]:
    """The output's cost as ``report``, the stored summary and ``spend`` (the ledger) say it."""
    report = json.loads(run_cli(["report", str(out), "--format", "json"]).stdout)
    spend = json.loads(run_cli(["spend", "--ledger", str(ledger), "--format", "json"]).stdout)
    summary = read_summary(out)
    assert summary is not None
    return (
        Decimal(report["overall"]["cost_usd"]),
        Decimal(summary["cost_usd"]["total"]),
        Decimal(spend["total"]["cost_usd"]),
    )


def test_a_changed_system_prompt_or_template_refuses_every_reply(sandbox, tmp_path: Path) -> None:
    requests, results, errors = _files(tmp_path)
    out = tmp_path / "o.parquet"
    assert run_cli(["export-batch", *JOB, "-o", str(requests)]).exit_code == 0
    answer_batch(sandbox, requests, results, errors)
    first = _ids(requests)[0]
    base = ["import-batch", str(results), str(errors), *JOB, "-o", str(out), *BATCH_PRICES]
    for change in (["--system", "Answer in French."], ["--template", "Sentiment of: {review}"]):
        refused = run_cli([*base, *change])
        assert refused.exit_code == 0, refused.output  # as rows with no result: pending, not failed
        line = (
            f"warning: 200 results {CHANGED} (the --system, template, model, labels or parameters changed "
            f"since export-batch; first: row {first!r}); not imported (they cost $"
        )
        assert refused.stderr.count(line) == 1, refused.stderr
        assert "counted in the output's cost): export again\n" in refused.stderr
        assert "imported 0 replies and 0 failed requests" in refused.stderr
        assert (
            "200 rows are still pending (no result in these files, expired, 429/5xx, or asked otherwise"
            in refused.stderr
        )
        assert set(_status(out).values()) == {"pending"} and len(_status(out)) == 200
    # The job as it was exported: imported as ever, and each line counted once: the refusals
    # had counted the lines they refused (twice: --system, then --template), once each.
    same = run_cli([*base, "--ledger", str(tmp_path / "ledger.db")])
    assert same.exit_code == 0 and CHANGED not in same.stderr, same.output
    assert set(_status(out).values()) == {"ok"}
    report, summary, _ = _costs(out, tmp_path / "ledger.db")
    assert report == summary == _billed(out, results), (report, summary, _billed(out, results))
    assert "this run $0\n" in same.stderr or "this run $0.00\n" in same.stderr, same.stderr


def test_only_the_rows_whose_request_changed_are_refused(sandbox, tmp_path: Path) -> None:
    """An edited row under an unchanged --id-column value, and another max_tokens for one run."""
    src = write_csv(tmp_path / "in.csv", [{"id": f"r{i}", "text": t} for i, t in enumerate(texts(40))])
    requests, results, errors = _files(tmp_path)
    out = tmp_path / "o.parquet"
    job = ["--template", "Say: {text}", "--id-column", "id", "--provider", "openai"]
    job += ["--max-tokens", "16"]
    assert run_cli(["export-batch", str(src), *job, "-o", str(requests)]).exit_code == 0
    answer_batch(sandbox, requests, results, errors, failed=frozenset({9}))
    edited = [
        {"id": f"r{i}", "text": t + (" (edited)" if i in (7, 30) else "")} for i, t in enumerate(texts(40))
    ]
    write_csv(src, edited)
    imported = run_cli(
        ["import-batch", str(results), str(errors), "--input", str(src), *job, "-o", str(out), *BATCH_PRICES]
    )
    assert imported.exit_code == 1, imported.output  # row r9's failed request is imported, as ever
    assert f"2 results {CHANGED}" in imported.stderr and "first: row 'r7'" in imported.stderr
    status = _status(out)
    assert status["r7"] == status["r30"] == "pending" and status["r9"] == "error"
    assert sum(s == "ok" for s in status.values()) == 37
    # Another max_tokens: every row's request changed, none of the rest is joined now.
    again = run_cli(
        [
            "import-batch",
            str(results),
            "--input",
            str(src),
            *job,
            "--max-tokens",
            "17",
            "-o",
            str(tmp_path / "p.parquet"),
        ]
    )
    assert again.exit_code == 0 and f"39 results {CHANGED}" in again.stderr, again.output


def test_rows_exported_without_a_record_import_as_before(sandbox, tmp_path: Path) -> None:
    """A file exported elsewhere (another machine, or before batchllm kept records): as today."""
    requests, results, errors = _files(tmp_path)
    out = tmp_path / "o.parquet"
    elsewhere = {"XDG_DATA_HOME": str(tmp_path / "elsewhere")}
    assert run_cli(["export-batch", *JOB, "-o", str(requests)], env=elsewhere).exit_code == 0
    answer_batch(sandbox, requests, results, errors)
    result = run_cli(
        ["import-batch", str(results), *JOB, "-o", str(out), "--system", "Other.", *BATCH_PRICES]
    )
    assert result.exit_code == 0 and CHANGED not in result.stderr, result.output
    assert set(_status(out).values()) == {"ok"}


def test_a_pack_line_is_checked_row_by_row(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(pack_missing=0.0, pack_prose=0.0, pack_fenced=0.0, pack_decay=0.0)
    src = write_csv(tmp_path / "in.csv", [{"id": f"r{i}", "text": t} for i, t in enumerate(texts(50))])
    requests, results, errors = _files(tmp_path)
    out = tmp_path / "o.parquet"
    job = ["--template", "Classify: {text}", "--labels", ",".join(LABELS)]
    job += ["--max-tokens", "16", "--id-column", "id", "--pack", "10", *BATCH_PRICES]
    assert run_cli(["export-batch", str(src), *job, "-o", str(requests)]).exit_code == 0
    assert len(_ids(requests)) == 5 and all(c.startswith("pack10-") for c in _ids(requests))
    answer_batch(box, requests, results, errors)
    # Another label set: every row of every pack was asked something else.
    labels = ["--labels", "good,bad"]
    base = ["import-batch", str(results), str(errors), "--input", str(src), "-o", str(out)]
    refused = run_cli([*base, *job, *labels])
    assert refused.exit_code == 0 and f"50 results {CHANGED}" in refused.stderr, refused.output
    assert "first: row 'r0'" in refused.stderr and set(_status(out).values()) == {"pending"}
    # One row edited: the other nine of its pack are imported.
    edited = [{"id": f"r{i}", "text": t + (" (edited)" if i == 13 else "")} for i, t in enumerate(texts(50))]
    write_csv(src, edited)
    some = run_cli([*base, *job])
    assert some.exit_code == 0 and "1 result was for requests that differ" in some.stderr, some.output
    status = _status(out)
    assert status["r13"] == "pending" and sum(s == "ok" for s in status.values()) == 49
    # The live run sends the edited row alone.
    before = box.count()
    live = run_cli(["run", str(src), *job, "-o", str(out), "--rpm", "0"], env=box.env())
    assert live.exit_code == 0 and box.count() - before == 1, live.output


def test_a_re_export_keeps_the_record_and_another_model_is_refused(sandbox, tmp_path: Path) -> None:
    """A re-export with the same settings keeps the record; the model is part of it."""
    requests, results, errors = _files(tmp_path)
    job = ["--job", str(ROOT / "jobs" / "one_word_sentiment.toml"), "--provider", "openai"]
    for _ in range(2):  # a re-export (no --restart exists or is needed)
        assert run_cli(["export-batch", *job, "-o", str(requests)]).exit_code == 0
    answer_batch(sandbox, requests, results, errors)
    out = tmp_path / "o.parquet"
    ok = run_cli(["import-batch", str(results), *job, "-o", str(out), *BATCH_PRICES])
    assert ok.exit_code == 0 and CHANGED not in ok.stderr and set(_status(out).values()) == {"ok"}
    other = run_cli(
        ["import-batch", str(results), *job, "--model", "gpt-4o", "-o", str(tmp_path / "p.parquet")]
    )
    assert f"200 results {CHANGED}" in other.stderr, other.output


def test_an_export_older_than_the_kept_days_is_forgotten(sandbox, tmp_path: Path) -> None:
    import os
    import sqlite3

    from batchllm.backends.batch_keys import KEEP_DAYS, book_path

    requests, results, errors = _files(tmp_path)
    assert run_cli(["export-batch", *JOB, "-o", str(requests)]).exit_code == 0
    answer_batch(sandbox, requests, results, errors)
    book = book_path(os.environ)
    with sqlite3.connect(book) as conn:
        conn.execute("UPDATE exports SET exported_at = exported_at - ?", ((KEEP_DAYS + 1) * 86400,))
    conn.close()
    other = write_csv(tmp_path / "in.csv", [{"id": "a", "text": "hello"}])
    assert (
        run_cli(
            [
                "export-batch",
                str(other),
                "--id-column",
                "id",
                "--prompt-column",
                "text",
                "-o",
                str(tmp_path / "x.jsonl"),
            ]
        ).exit_code
        == 0
    )
    with sqlite3.connect(book) as conn:
        assert conn.execute("SELECT COUNT(*) FROM exported").fetchone() == (1,)  # the other input's row
    conn.close()
    out = tmp_path / "o.parquet"
    result = run_cli(
        ["import-batch", str(results), *JOB, "-o", str(out), "--system", "Other.", *BATCH_PRICES]
    )
    assert result.exit_code == 0 and CHANGED not in result.stderr, result.output


def test_refused_replies_are_paid_for_and_counted_once(sandbox, tmp_path: Path) -> None:
    """A refused reply was billed: its cost is the row's (pending) and the output's, in report,
    the summary, status and the ledger, once however often the file is imported; exported again
    and imported, each row's cost is both of its replies'."""
    src = write_csv(tmp_path / "in.csv", [{"id": f"r{i}", "text": t} for i, t in enumerate(texts(40))])
    requests, results, errors = _files(tmp_path)
    out, ledger = tmp_path / "o.parquet", tmp_path / "ledger.db"
    job = ["--template", "Say: {text}", "--id-column", "id", "--provider", "openai", "--max-tokens", "16"]
    assert run_cli(["export-batch", str(src), *job, "-o", str(requests)]).exit_code == 0
    answer_batch(sandbox, requests, results, errors, failed=frozenset({9}))
    edited = [
        {"id": f"r{i}", "text": t + (" (edited)" if i in (7, 30) else "")} for i, t in enumerate(texts(40))
    ]
    write_csv(src, edited)
    imp = ["import-batch", str(results), str(errors), "--input", str(src), *job, "-o", str(out)]
    imp += [*BATCH_PRICES, "--ledger", str(ledger)]
    first = run_cli(imp)
    assert first.exit_code == 1, first.output  # r9's failed request
    billed = _billed(out, results)
    rows = {r["row_id"]: r for r in pq.read_table(out).to_pylist()}
    refused = Decimal(repr(rows["r7"]["cost_usd"])) + Decimal(repr(rows["r30"]["cost_usd"]))
    assert rows["r7"]["status"] == rows["r30"]["status"] == "pending" and refused > 0
    assert f"2 results {CHANGED}" in first.stderr
    assert f"not imported (they cost ${refused}, counted in the output's cost): export again" in first.stderr
    assert _costs(out, ledger) == (billed, billed, billed)
    assert Decimal(read_summary(out)["this_run"]["cost_usd"]) == billed  # type: ignore[index]
    assert f"${billed}" in run_cli(["status", str(out)]).stdout
    # The same files again: nothing more was paid, nothing more is counted.
    again = run_cli(imp)
    assert f"(they cost ${refused}, counted" in again.stderr
    assert _costs(out, ledger) == (billed, billed, billed)
    # Exported again, the two rows go (and r9's failure, not retried: it is done) and come back.
    more = tmp_path / "more.jsonl"
    assert run_cli(["export-batch", str(src), *job, "-o", str(more), "--skip-done", str(out)]).exit_code == 0
    assert sorted(_ids(more)) == ["r30", "r7"]
    results2, errors2 = tmp_path / "res2.jsonl", tmp_path / "err2.jsonl"
    answer_batch(sandbox, more, results2, errors2)
    imp2 = ["import-batch", str(results2), "--input", str(src), *job, "-o", str(out)]
    done = run_cli([*imp2, *BATCH_PRICES, "--ledger", str(ledger)])
    assert done.exit_code == 1 and CHANGED not in done.stderr, done.output
    status = _status(out)
    assert status.pop("r9") == "error" and set(status.values()) == {"ok"}
    both = _billed(out, results, results2)
    assert _costs(out, ledger) == (both, both, both)
    rows = {r["row_id"]: r for r in pq.read_table(out).to_pylist()}
    assert Decimal(repr(rows["r7"]["cost_usd"])) > Decimal(repr(rows["r8"]["cost_usd"])) / 2 * 3


def test_a_refused_row_of_a_pack_keeps_its_share(sandbox_factory, tmp_path: Path) -> None:
    """A pack line with one row refused: that row's share of the pack is counted, and stays in
    the row's cost when a live run answers it."""
    box = sandbox_factory(pack_missing=0.0, pack_prose=0.0, pack_fenced=0.0, pack_decay=0.0)
    src = write_csv(tmp_path / "in.csv", [{"id": f"r{i}", "text": t} for i, t in enumerate(texts(30))])
    requests, results, errors = _files(tmp_path)
    out, ledger = tmp_path / "o.parquet", tmp_path / "ledger.db"
    job = ["--template", "Classify: {text}", "--labels", ",".join(LABELS)]
    job += ["--max-tokens", "16", "--id-column", "id", "--pack", "10", *BATCH_PRICES]
    assert run_cli(["export-batch", str(src), *job, "-o", str(requests)]).exit_code == 0
    answer_batch(box, requests, results, errors)
    edited = [{"id": f"r{i}", "text": t + (" (edited)" if i == 13 else "")} for i, t in enumerate(texts(30))]
    write_csv(src, edited)
    imp = ["import-batch", str(results), "--input", str(src), *job, "-o", str(out), "--ledger", str(ledger)]
    some = run_cli(imp)
    assert some.exit_code == 0 and "1 result was for requests that differ" in some.stderr, some.output
    share = pq.read_table(out).to_pylist()[13]
    assert share["status"] == "pending" and share["cost_usd"] > 0
    assert f"(it cost ${Decimal(repr(share['cost_usd']))}, counted in" in some.stderr
    billed = _billed(out, results)
    assert _costs(out, ledger) == (billed, billed, billed)
    # The live run sends the edited row alone, at the same prices: its cost adds to its share.
    before = box.sandbox.stats.copy()
    live = run_cli(
        ["run", str(src), *job, "-o", str(out), "--rpm", "0", "--ledger", str(ledger)], env=box.env()
    )
    assert live.exit_code == 0 and box.count() - before["requests"] == 1, live.output
    stats = box.sandbox.stats
    sent = (stats["prompt_tokens"] - before["prompt_tokens"]) * Decimal("0.155") + (
        stats["completion_tokens"] - before["completion_tokens"]
    ) * Decimal("0.17")
    assert set(_status(out).values()) == {"ok"}
    total = billed + sent / 10**6
    assert _costs(out, ledger) == (total, total, total)


def test_a_batch_exported_for_a_fleet_endpoint_is_imported_with_it(sandbox, tmp_path: Path) -> None:
    """Exported with --fleet and imported without (or the other way), every row asked another
    model: the line says to import as the file was exported, not to export again."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        f'[[endpoint]]\nname = "bulk"\nprovider = "openai"\nendpoint = "{sandbox.openai_url}"\nkey_env = "K"\n'
        'model = "meta-llama/Llama-3.1-70B-Instruct"\nrpm = 6000\ninput_price = "0.20"\noutput_price = "0.25"\n'
    )  # fmt: skip
    job = ["--job", str(ROOT / "jobs" / "one_word_sentiment.toml")]
    same = "not imported (they cost $"
    for export_with, import_with in (["--fleet", str(fleet)], []), ([], ["--fleet", str(fleet)]):
        env = {"XDG_DATA_HOME": str(tmp_path / f"data{len(export_with)}")}  # the other export unknown
        requests, results, errors = _files(tmp_path)
        assert run_cli(["export-batch", *job, "-o", str(requests), *export_with], env=env).exit_code == 0
        answer_batch(sandbox, requests, results, errors)
        out = tmp_path / f"o{len(export_with)}.parquet"
        other = run_cli(
            ["import-batch", str(results), *job, "-o", str(out), *BATCH_PRICES, *import_with], env=env
        )
        assert f"200 results {CHANGED}" in other.stderr and same in other.stderr, other.output
        assert (
            "counted in the output's cost): import with the same --fleet/--model as the export"
            in other.stderr
        )
        assert set(_status(out).values()) == {"pending"}
        right = run_cli(
            ["import-batch", str(results), *job, "-o", str(out), *BATCH_PRICES, *export_with], env=env
        )
        assert right.exit_code == 0 and CHANGED not in right.stderr, right.output
        assert set(_status(out).values()) == {"ok"}


def test_an_unreadable_pack_s_shares_stay_when_its_rows_are_imported_again(
    sandbox_factory, tmp_path: Path
) -> None:
    """The shares of a pack reply that could not be read (split attempts) stay the rows' cost when
    a second batch answers them: they were paid for."""
    knobs = {"pack_missing": 0.0, "pack_prose": 0.0, "pack_fenced": 0.0, "pack_decay": 0.0}
    broken, good = sandbox_factory(pack_broken=1.0, **knobs), sandbox_factory(**knobs)
    src = write_csv(tmp_path / "in.csv", [{"id": f"r{i}", "text": t} for i, t in enumerate(texts(20))])
    requests, results, errors = _files(tmp_path)
    out, ledger = tmp_path / "o.parquet", tmp_path / "ledger.db"
    job = ["--template", "Classify: {text}", "--labels", ",".join(LABELS)]
    job += ["--max-tokens", "16", "--id-column", "id", "--pack", "10", *BATCH_PRICES]
    assert run_cli(["export-batch", str(src), *job, "-o", str(requests)]).exit_code == 0
    answer_batch(broken, requests, results, errors)
    imp = ["import-batch", "--input", str(src), *job, "-o", str(out), "--ledger", str(ledger)]
    assert run_cli([*imp, str(results)]).exit_code == 0
    assert set(_status(out).values()) == {"pending"}
    billed = _billed(out, results)
    assert billed > 0 and _costs(out, ledger) == (billed, billed, billed)
    assert Decimal(read_summary(out)["this_run"]["cost_usd"]) == billed  # type: ignore[index]
    more, results2, errors2 = tmp_path / "more.jsonl", tmp_path / "res2.jsonl", tmp_path / "err2.jsonl"
    assert run_cli(["export-batch", str(src), *job, "-o", str(more), "--skip-done", str(out)]).exit_code == 0
    answer_batch(good, more, results2, errors2)
    assert run_cli([*imp, str(results2)]).exit_code == 0
    assert set(_status(out).values()) == {"ok"}
    both = _billed(out, results, results2)
    assert _costs(out, ledger) == (both, both, both)
    assert run_cli([*imp, str(results), str(results2)]).exit_code == 0  # again: nothing more
    assert _costs(out, ledger) == (both, both, both)
