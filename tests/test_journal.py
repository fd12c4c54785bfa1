"""The journal: group commit, resume lookups, and no paid reply lost when it cannot be written."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from batchllm.engine.budget import Budget
from batchllm.engine.client import Client
from batchllm.engine.dispatch import Dispatcher, StopReason
from batchllm.engine.inflight import LOG_NAME, InflightLog, count, read_log, replay
from batchllm.engine.journal import KEY_BATCH, RESCUE_NAME, RESUME_ATTEMPTS, Journal, settings_diff
from batchllm.engine.journal_schema import SCHEMA_VERSION
from batchllm.engine.plan import WorkItem
from batchllm.engine.ratelimit import Backoff, RateLimiter
from batchllm.job import build_job
from batchllm.pricing import resolve_model
from batchllm.prompts import RequestMaker
from batchllm.providers import get_provider
from batchllm.records import Entry

SETTINGS = {"model": "m", "system": None, "prompt_column": "prompt", "params": {"max_tokens": 16}}


def record(i: int, status: str = "ok", size: int = 10) -> Entry:
    return Entry(
        f"{i}-h", "h", status, "x" * size, 1, 2, 3, 4, None, None, 1, 1.0, time.time(), "m", False, False
    )


def test_unfinished_returns_only_rows_to_send(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path, SETTINGS)
    for i in range(5):
        journal.add(record(i, "ok" if i % 2 == 0 else "error"))
    journal.flush()
    ids = [f"{i}-h" for i in range(7)]
    assert journal.unfinished(ids) == [(1, "error", 1), (3, "error", 1), (5, None, 1), (6, None, 1)]
    assert journal.unfinished(ids[:3], ["h", "other", "other"]) == [(1, "error", 0), (2, "ok", 0)]
    journal.close()
    again = Journal.open(tmp_path, SETTINGS)
    assert again.counts_before == {"ok": 3, "error": 2}
    again.close()


def test_every_kind_of_row_reads_back_as_written_alone_or_mixed(tmp_path: Path) -> None:
    """A flush whose rows are all alike leaves out their empty columns; mixed ones write all."""
    kinds = [
        record(0)._replace(request_key="k0"),  # an answer of its own
        record(1)._replace(extra='{"label": "a"}', request_key="k1"),  # a labeling row
        record(2, "error")._replace(response=None, error="boom", error_class="FatalAPIError"),
        record(3)._replace(answered_by="0-h", request_key="k0", input_cost_pico=0, output_cost_pico=0),
        record(4)._replace(cached=True, request_key="k4"),
    ]
    journal = Journal.open(tmp_path, SETTINGS)
    for e in kinds:  # one kind per flush
        journal.add(e)
        journal.flush()
    alone = journal.fetch([e.row_id for e in kinds])
    journal.close()
    journal = Journal.open(tmp_path / "mixed", SETTINGS)
    for e in kinds:
        journal.add(e)
    journal.flush()
    mixed = journal.fetch([e.row_id for e in kinds])
    journal.close()
    for e in kinds:
        assert alone[e.row_id] == mixed[e.row_id] == e  # bools read back as 0/1, equal to them


def test_answered_finds_rows_before_and_after_the_last_bulk_index(tmp_path: Path) -> None:
    """The request-key index is built in bulk every KEY_BATCH rows: a row is found either way."""
    journal = Journal.open(tmp_path, SETTINGS)
    total = KEY_BATCH + 50
    for i in range(total):
        status = "error" if i == 7 else "ok"
        journal.add(record(i, status)._replace(request_key=f"k{i}", answered_by="0-h" if i == 9 else None))
        if i % 100 == 99:
            journal.flush()
    journal.flush()
    assert 0 < journal.keyed_to < total  # some rows indexed, the last ones not yet
    wanted = ["k0", "k7", "k9", f"k{total - 1}", "missing"]
    found = journal.answered(wanted)
    assert sorted(found) == ["k0", f"k{total - 1}"]  # errors and copies answer nothing
    assert found["k0"].row_id == "0-h" and found[f"k{total - 1}"].row_id == f"{total - 1}-h"
    journal.close()
    again = Journal.open(tmp_path, SETTINGS)
    assert again.keyed_to == total  # what was left unindexed is indexed at open
    assert sorted(again.answered(wanted)) == ["k0", f"k{total - 1}"]
    again.close()


def test_a_schema_4_journal_is_rebuilt_and_its_rows_still_answer(tmp_path: Path) -> None:
    import sqlite3

    import orjson

    conn = sqlite3.connect(tmp_path / "journal.sqlite")
    conn.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "CREATE TABLE rows (row_id TEXT PRIMARY KEY, content_hash TEXT NOT NULL, status TEXT NOT NULL,"
        " response TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, input_cost_pico INTEGER,"
        " output_cost_pico INTEGER, error TEXT, error_class TEXT, attempts INTEGER NOT NULL, latency_ms REAL,"
        " finished_at REAL NOT NULL, model TEXT, truncated INTEGER, tokens_counted INTEGER, extra TEXT,"
        " request_key TEXT, answered_by TEXT, cached INTEGER) WITHOUT ROWID;"
        "CREATE INDEX rows_by_key ON rows (request_key);"
    )
    conn.execute("INSERT INTO meta VALUES ('settings', ?)", (orjson.dumps(SETTINGS).decode(),))
    for i in range(3):
        conn.execute("INSERT INTO rows VALUES (?, 'h', 'ok', 'x', 5, 3, 1, 2, NULL, NULL, 1, 1.0, ?, 'm',"
                     " 0, 0, NULL, ?, NULL, NULL)", (f"{i}-h", float(i), f"k{i}"))  # fmt: skip
    conn.commit()
    conn.close()
    journal = Journal.open(tmp_path, SETTINGS)
    assert journal.counts_before == {"ok": 3} and journal.keyed_to == 3
    assert sorted(journal.answered(["k0", "k2", "k3"])) == ["k0", "k2"]
    assert journal.fetch(["1-h"])["1-h"].request_key == "k1"
    journal.close()


def test_the_inflight_log_replays_what_was_sent_and_not_done(tmp_path: Path) -> None:
    log = InflightLog(tmp_path)
    for i in range(200_000):  # ~6 MB of lines: the 4 MB log is rewritten when it fills
        log.sent(f"row-{i}", i)
        if i % 1000 != 7:
            log.done([f"row-{i}"])
    expected = {f"row-{i}": [i] for i in range(200_000) if i % 1000 == 7}
    assert count(log.pending) == (200, sum(w for [w] in expected.values()))
    assert replay(tmp_path / LOG_NAME) == expected  # what a kill right now would leave
    log.close()
    assert replay(tmp_path / LOG_NAME) == {}
    # A kill in the middle of a line leaves it without its newline (then zeros): not sent yet.
    (tmp_path / LOG_NAME).write_bytes(b"S\ta\t5\nS\tb\t7\nD\ta\nS\tc\t12" + bytes(100))
    assert replay(tmp_path / LOG_NAME) == {"b": [7]}


def test_the_inflight_log_counts_every_request_its_run_sent_across_rewrites(tmp_path: Path) -> None:
    # What a killed run sent, for its record in the ledger: the log is rewritten twice here, and
    # row ids ending in "S" put "S<tab>" mid-line, which is not a request.
    log = InflightLog(tmp_path)
    for i in range(300_000):
        log.sent(f"row-{i:08d}-S", 1)
        if i in (5, 150_000):
            log.sent(f"row-{i:08d}-S", 1, again=True)  # a retry of a request still open: not new
        if i % 1000:
            log.done([f"row-{i:08d}-S"])
    left, sent = read_log(tmp_path / LOG_NAME)
    assert sent == 300_000 and count(left) == (300, 300)
    assert read_log(tmp_path / "nothing") == ({}, None)
    log.close()


def test_a_rows_next_request_may_leave_before_its_last_reply_is_committed(tmp_path: Path) -> None:
    # A labeling row: its re-ask leaves while the first reply's commit is still to come. That
    # commit closes the first request only; the re-ask stays in flight, with its own worst case.
    log = InflightLog(tmp_path)
    log.sent("r", 5)
    log.sent("r", 9)
    log.done(["r"])  # the commit of the first reply
    assert replay(tmp_path / LOG_NAME) == {"r": [9]} and count(log.pending) == (1, 9)
    # A retry after an error answer is the same request; after no answer, maybe a second bill.
    log.sent("r", 9, again=True)
    assert count(log.pending) == (1, 9)
    log.sent("s", 3)
    log.sent("s", 3, again=False)
    assert replay(tmp_path / LOG_NAME) == {"r": [9], "s": [3, 3]}
    log.close()


def test_settings_diff_names_each_difference() -> None:
    other = {**SETTINGS, "model": "n", "params": {"max_tokens": 32}}
    assert settings_diff(SETTINGS, other) == [
        "max_tokens: journal has 16, this run has 32",
        "model: journal has 'm', this run has 'n'",
    ]


def test_a_full_disk_rescues_replies_and_the_next_open_imports_them(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path, SETTINGS)
    pages = journal.conn.execute("PRAGMA page_count").fetchone()[0]
    journal.conn.execute(f"PRAGMA max_page_count = {pages + 2}")  # SQLite's own "disk is full"
    for i in range(40):
        journal.add(record(i, size=4000))  # no event loop: each add commits at once
    assert journal.write_error is not None and "full" in str(journal.write_error)
    assert journal.rescued > 0 and not journal.unsaved
    assert (tmp_path / RESCUE_NAME).exists()
    journal.close()
    reopened = Journal.open(tmp_path, SETTINGS)  # a new connection: no page limit
    assert reopened.imported == journal.rescued
    assert reopened.counts_before == {"ok": 40}
    assert not (tmp_path / RESCUE_NAME).exists()
    reopened.close()


def test_the_dispatcher_stops_when_the_journal_cannot_be_written(sandbox, tmp_path: Path) -> None:
    job = build_job({"input": "in.csv", "output": str(tmp_path / "o.parquet")})
    journal = Journal.open(tmp_path / "j", job.request_settings())
    pages = journal.conn.execute("PRAGMA page_count").fetchone()[0]
    journal.conn.execute(f"PRAGMA max_page_count = {pages + 3}")
    maker, provider = RequestMaker(job), get_provider(job.provider)
    requests = (maker.make(f"question {i} " * 200) for i in range(2000))
    items = (WorkItem(f"{i}-h", "h", r, provider.encode(r), 0, 0) for i, r in enumerate(requests))

    async def go() -> Dispatcher:
        async with Client(provider, sandbox.url, sandbox.key, concurrency=8, timeout=10) as client:
            dispatcher = Dispatcher(
                client=client,
                provider=provider,
                journal=journal,
                model=resolve_model(job.provider, job.model),
                max_tokens=job.max_tokens,
                concurrency=8,
                limiter=RateLimiter(0),
                backoff=Backoff(3),
                budget=Budget(None),
                max_error_rate=0.5,
                error_window=100,
            )
            await dispatcher.run(items)
            return dispatcher

    dispatcher = asyncio.run(go())
    assert dispatcher.stop_reason is StopReason.JOURNAL
    sent = sandbox.count(200)
    assert sent < 2000
    journal.close()
    reopened = Journal.open(tmp_path / "j", job.request_settings())
    assert reopened.rows_before == sent  # every reply received is in the journal after the import
    reopened.close()


def test_a_schema_1_journal_is_migrated_and_resumes(tmp_path: Path) -> None:
    """Journals written before providers existed: two columns added, truncated filled from max_tokens."""
    import sqlite3

    import orjson

    conn = sqlite3.connect(tmp_path / "journal.sqlite")
    conn.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "CREATE TABLE rows (row_id TEXT PRIMARY KEY, content_hash TEXT NOT NULL, status TEXT NOT NULL,"
        " response TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, input_cost_pico INTEGER,"
        " output_cost_pico INTEGER, error TEXT, error_class TEXT, attempts INTEGER NOT NULL, latency_ms REAL,"
        " finished_at REAL NOT NULL, model TEXT) WITHOUT ROWID;"
    )
    conn.execute("INSERT INTO meta VALUES ('settings', ?)", (orjson.dumps(SETTINGS).decode(),))
    conn.execute("INSERT INTO rows VALUES ('a', 'h', 'ok', 'x', 5, 16, 1, 2, NULL, NULL, 1, 1.0, 0, 'm')")
    conn.execute("INSERT INTO rows VALUES ('b', 'h', 'ok', 'y', 5, 3, 1, 2, NULL, NULL, 1, 1.0, 0, 'm')")
    conn.commit()
    conn.close()
    journal = Journal.open(tmp_path, SETTINGS)
    entries = journal.fetch(["a", "b"])
    assert entries["a"].truncated == 1 and entries["b"].truncated == 0
    assert journal.counts_before == {"ok": 2}
    journal.close()


def test_a_schema_9_journal_gains_served_model_and_keeps_its_attempts(tmp_path: Path) -> None:
    """Schema 10 added served_model to rows and attempts: an older journal's rows and attempts
    read back with none, and new ones keep theirs."""
    import sqlite3

    from batchllm.labeling.rows import Attempt

    journal = Journal.open(tmp_path, SETTINGS)
    journal.add(record(1))
    journal.add_attempt("2-h", 0, Attempt(0, "first", "x", 1, 2, 3, 4, False))
    journal.close()
    conn = sqlite3.connect(tmp_path / "journal.sqlite")
    conn.execute("ALTER TABLE rows DROP COLUMN served_model")
    conn.execute("ALTER TABLE attempts DROP COLUMN served_model")
    conn.execute("UPDATE meta SET value = '9' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    journal = Journal.open(tmp_path, SETTINGS)
    assert journal.fetch(["1-h"])["1-h"].served_model is None
    assert journal.attempts_for(["2-h"])["2-h"][0].served_model is None
    journal.add(record(3)._replace(served_model="/models/a.gguf"))
    journal.add_attempt("2-h", 1, Attempt(0, "reask", "y", 1, 2, 3, 4, False, served_model="/models/a.gguf"))
    journal.flush()
    assert journal.fetch(["3-h"])["3-h"].served_model == "/models/a.gguf"
    assert [a.served_model for a in journal.attempts_for(["2-h"])["2-h"]] == [None, "/models/a.gguf"]
    journal.close()


def _older_attempts(tmp_path: Path, column: str, version: int) -> Journal:
    """A journal with one attempt, made as schema ``version`` wrote it (without ``column`` in
    its attempts), opened again: migrated."""
    import sqlite3

    from batchllm.labeling.rows import Attempt

    journal = Journal.open(tmp_path, SETTINGS)
    journal.add_attempt("2-h", 0, Attempt(0, "first", "x", 1, 2, 3, 4, False))
    journal.close()
    conn = sqlite3.connect(tmp_path / "journal.sqlite")
    conn.execute(f"ALTER TABLE attempts DROP COLUMN {column}")
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
    conn.commit()
    conn.close()
    return Journal.open(tmp_path, SETTINGS)


def test_a_schema_10_journal_gains_the_attempts_confidence(tmp_path: Path) -> None:
    """Schema 11 added confidence to attempts: an older journal's attempts read back with none,
    new ones keep theirs (a label's with the label it measured, labeling/confidence.py)."""
    from batchllm.labeling.rows import Attempt

    journal = _older_attempts(tmp_path, "confidence", 10)
    assert journal.get_meta("schema_version") == SCHEMA_VERSION
    assert journal.attempts_for(["2-h"])["2-h"][0].confidence is None
    journal.add_attempt("2-h", 1, Attempt(0, "reask", "positive", 1, 2, 3, 4, False), '["positive",0.25]')
    journal.add_attempt("3-h", 0, Attempt(0, "first", "{}", 1, 2, 3, 4, False), '{"a":0.5,"b":null}')
    journal.flush()
    assert journal.attempts_for(["2-h"])["2-h"][1].confidence == ["positive", 0.25]
    assert journal.attempts_for(["3-h"])["3-h"][0].confidence == {"a": 0.5, "b": None}
    # An entry superseded to go on from its reply (a re-ask) keeps its figure, digit for digit;
    # one read as attempt 0 without being superseded (``--reparse``) reads the same.
    sure = 0.12345678901234568
    journal.add(record(4)._replace(response="positive", extra=f'{{"value":"positive","confidence":{sure}}}'))
    journal.flush()
    assert journal.first_attempts(["4-h"])["4-h"][0].confidence == ["positive", sure]
    journal.supersede("4-h", RESUME_ATTEMPTS)
    journal.flush()
    assert journal.attempts_for(["4-h"])["4-h"][0].confidence == ["positive", sure]
    journal.close()


def test_a_schema_11_journal_gains_the_attempts_cached_tokens(tmp_path: Path) -> None:
    """Schema 12 added cached_tokens to attempts: an older journal's attempts read back with 0,
    new ones keep theirs, and an entry made an attempt (a row re-asked) keeps its own."""
    from batchllm.labeling.rows import Attempt

    journal = _older_attempts(tmp_path, "cached_tokens", 11)
    assert journal.get_meta("schema_version") == SCHEMA_VERSION >= 12
    assert journal.attempts_for(["2-h"])["2-h"][0].cached_tokens == 0
    journal.add_attempt("2-h", 1, Attempt(0, "reask", "y", 1280, 2, 3, 4, False, cached_tokens=1024))
    journal.add(record(3)._replace(cached_tokens=512, response="z"))
    journal.flush()
    assert [a.cached_tokens for a in journal.attempts_for(["2-h"])["2-h"]] == [0, 1024]
    journal.supersede("3-h", RESUME_ATTEMPTS)
    journal.flush()
    assert [a.cached_tokens for a in journal.attempts_for(["3-h"])["3-h"]] == [512]
    journal.close()
