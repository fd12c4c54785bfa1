"""import-batch refuses replies to requests the job no longer sends (batch_keys.py), against the sandbox."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

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
            f"since export-batch; first: row {first!r}); not imported: export again"
        )
        assert refused.stderr.count(line) == 1, refused.stderr
        assert "imported 0 replies and 0 failed requests" in refused.stderr
        assert (
            "200 rows are still pending (no result in these files, expired, 429/5xx, or asked otherwise"
            in refused.stderr
        )
        assert set(_status(out).values()) == {"pending"} and len(_status(out)) == 200
    # The job as it was exported: imported as ever.
    same = run_cli(base)
    assert same.exit_code == 0 and CHANGED not in same.stderr, same.output
    assert set(_status(out).values()) == {"ok"}


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
