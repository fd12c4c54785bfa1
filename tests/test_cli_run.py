"""End to end through the CLI against the sandbox over loopback HTTP (issue 2)."""

from __future__ import annotations

import io
import json
import re
from decimal import Decimal
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchllm.engine.output import RESULT_NAMES

from .conftest import PAGE_EXAMPLE, ROOT, prompts_csv, run_cli, spawn, summary_of, write_csv

SAMPLE = ROOT / "sample_data" / "reviews.csv"
TEMPLATE = "Classify the sentiment of this review as positive, negative or neutral: {review}"


def test_sample_run_costs_and_totals(sandbox, tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    result = run_cli(
        ["run", str(SAMPLE), "-o", str(out), "--template", TEMPLATE, "--rpm", "0"], env=sandbox.env()
    )
    assert result.exit_code == 0, result.stderr
    table = pq.read_table(out)
    source = pq.read_table(ROOT / "sample_data" / "reviews.parquet")
    assert table.num_rows == source.num_rows == 200
    assert table.column_names == [
        "review_id",
        "product",
        "category",
        "rating",
        "review",
        "human_label",
        *RESULT_NAMES,
    ]
    assert table.column("review_id").to_pylist() == source.column("review_id").to_pylist()
    everything = table.to_pylist()
    # The sample's one empty review is never sent (no prompt); every other row is answered.
    empty = [r for r in everything if not r["review"]]
    assert len(empty) == 1 and empty[0]["status"] == "error" and empty[0]["error"].startswith("NoPrompt")
    rows = [r for r in everything if r["review"]]
    assert all(r["status"] == "ok" for r in rows)
    for r in rows:
        exact = Decimal(r["prompt_tokens"]) * Decimal("0.31e-6") + Decimal(r["completion_tokens"]) * Decimal(
            "0.34e-6"
        )
        assert r["cost_usd"] == float(exact)
        assert r["total_tokens"] == r["prompt_tokens"] + r["completion_tokens"]
        assert r["error"] is None and r["model"] == "meta/llama-3.1-70b-instruct"
        assert r["attempts"] == (0 if r["answered_by"] else 1)  # identical prompts are sent once
    summary = summary_of(out)
    assert summary["rows"]["ok"] == 199 and summary["rows"]["no_prompt"] == 1
    assert summary["tokens"]["prompt"] == sum(r["prompt_tokens"] for r in rows)
    assert summary["tokens"]["completion"] == sum(r["completion_tokens"] for r in rows)
    exact_total = sum(
        Decimal(r["prompt_tokens"]) * Decimal("0.31e-6")
        + Decimal(r["completion_tokens"]) * Decimal("0.34e-6")
        for r in rows
    )
    assert Decimal(summary["cost_usd"]["total"]) == exact_total
    assert summary["prices"] == {
        "input_usd_per_million_tokens": "0.31",
        "output_usd_per_million_tokens": "0.34",
    }
    assert sandbox.key not in json.dumps(summary)
    assert "done (complete): 199 ok, 0 failed, 1 without a prompt (not sent)" in result.stderr


def test_request_body_has_the_page_shape(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(keep_bodies=True)
    src = write_csv(tmp_path / "in.csv", [{"prompt": "What is Deep Learning"}])
    out = tmp_path / "out.parquet"
    args = ["run", str(src), "-o", str(out), "--system", "You are an expert deep learning engineer"]
    args += ["--temperature", "0.1", "--top-p", "0.9", "--top-k", "40", "--max-tokens", "512"]
    assert run_cli(args, env=box.env()).exit_code == 0
    assert box.sandbox.bodies == [json.dumps(PAGE_EXAMPLE, separators=(",", ":")).encode()]
    row = pq.read_table(out).to_pylist()[0]
    assert row["prompt_tokens"] == 27


ODD = [
    "naïve café — Grüße, 你好, مرحبا",
    "emoji 😀🎉👍🏽 and ZWJ 👩‍👩‍👧",
    "quotes \"double\" and 'single', commas, and semicolons;",
    "line one\nline two\r\nline three",
    "x" * 50_000,
    "  leading and trailing spaces  ",
    "tabs\tand backslashes \\ and braces {not a field}",
]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_odd_content_survives_byte_for_byte(sandbox_factory, tmp_path: Path, fmt: str) -> None:
    box = sandbox_factory(keep_bodies=True)
    if fmt == "csv":
        src = write_csv(tmp_path / "odd.csv", [{"n": i, "prompt": t} for i, t in enumerate(ODD)])
    else:
        src = tmp_path / "odd.parquet"
        pq.write_table(pa.table({"n": list(range(len(ODD) + 1)), "prompt": [*ODD, None]}), src)
    out = tmp_path / "out.parquet"
    result = run_cli(["run", str(src), "-o", str(out), "--rpm", "0"], env=box.env())
    sent = sorted(orjson.loads(b)["data"]["messages"][-1]["content"] for b in box.sandbox.bodies)
    assert sent == sorted(ODD)
    table = pq.read_table(out).to_pylist()
    assert [r["prompt"] for r in table[: len(ODD)]] == ODD
    assert all(r["status"] == "ok" for r in table[: len(ODD)])
    if fmt == "parquet":
        null_row = table[-1]
        assert null_row["prompt"] is None and null_row["status"] == "error"
        assert "NoPrompt" in null_row["error"] and null_row["attempts"] == 0
    # A row without a prompt is never sent, and no retry would send it: not a failed run.
    assert result.exit_code == 0, result.stderr


def _parquet_bytes(columns: dict[str, list[str]]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table({k: pa.array(v, pa.string()) for k, v in columns.items()}), sink)
    return sink.getvalue()


BAD_INPUTS = [
    ("missing.csv", None, [], "no such file"),
    ("empty.csv", b"", [], "the file is empty"),
    ("ragged.csv", b"prompt,x\nhello,1\nworld,2,3\n", [], "line 3 has 3 fields but the header has 2"),
    ("header_only.csv", b"prompt\n", [], "the file has a header but no rows"),
    (
        "no_rows.parquet",
        _parquet_bytes({"id": [], "prompt": []}),
        [],
        "the file has columns (id, prompt) but no rows",
    ),
    (
        "no_prompts.csv",
        b"id,prompt\n1,\n2,  \n",
        [],
        "column 'prompt' is empty (null or only whitespace) in all 2 rows: nothing to send",
    ),
    ("fake.parquet", b"this is not parquet at all", [], "not a readable Parquet file"),
    ("nocol.csv", b"text\nhello\n", [], "no column 'prompt'"),
    (
        "rows.jsonl",
        b'{"prompt": "a"}\n[1, 2]\n',
        [],
        "rows.jsonl: line 2 is a JSON array, not an object of columns",
    ),
    ("rows.jsonl", b'{"prompt": "a"}\n\n{"prompt": \n', [], "rows.jsonl: line 3 is not valid JSON"),
    ("rows.jsonl", b'[1, 2]\n{"prompt": "a"}\n', [], "rows.jsonl: line 1 is a JSON array, not an object"),
    ("rows.jsonl", b'{"prompt": \n{"prompt": "a"}\n', [], "rows.jsonl: line 1 is not valid JSON"),
    (  # a stray quote: Arrow would read every later line into row 2's prompt
        "stray.csv",
        b'id,prompt\n1,a 12" screen\n2,"a stray quote\n3,fine\n4,fine\n',  # two quotes in all
        [],
        'stray.csv: line 3 opens a quoted value (") that never closes',
    ),
    ("blank.jsonl", b"\n\n", ["--template", "Say {text}"], "blank.jsonl: the file has only blank lines"),
    (
        "rows.jsonl",
        b'{"text": "a"}\n',
        [],
        "no column 'prompt' (the --prompt-column); the columns are: 'text'",
    ),
    ("ok.csv", b"review\nhello\n", ["--template", "Say {missing}"], "no column 'missing'"),
    (
        "ok.csv",
        b"review\nhello\n",
        ["--template", "Say {Review}"],
        "(did you mean 'review'? names match case for case)",
    ),
    (
        "ok.csv",
        b"prompt\nhello\n",
        ["--input-price", "-1", "--output-price", "1"],
        "--input-price '-1' must be from 0 to 1,000,000,000",
    ),
    (
        "ok.csv",
        b"prompt\nhello\n",
        ["--input-price", "1e400", "--output-price", "1"],
        "'1e400' must be from 0",
    ),
    (
        "ok.csv",
        b"prompt\nhello\n",
        ["--max-tokens", "100000"],
        "window of 25,000 tokens (the prompt takes some): give less than 25,000",
    ),
    (  # JSON in the prompt: its braces read as a column
        "ok.csv",
        b"review\nhello\n",
        ["--template", 'Answer as {"label": ...}: {review}'],
        "no column '\"label\"' (named in --template); the columns are: 'review'; to write a literal brace, "
        "double it: {{ and }}",
    ),
    ("ok.csv", b"prompt\nhello\n", ["--temperature", "7"], "--temperature must be a number from 0 to 5"),
    ("ok.csv", b"prompt\nhello\n", ["--top-k", "0"], "--top-k must be an integer from 1 to 50"),
    ("ok.csv", b"prompt\nhello\n", ["--model", "meta/llama-9-900b"], "unknown model 'meta/llama-9-900b'"),
    (
        "ok.csv",
        b"prompt\nhello\n",
        ["--endpoint", "ftp://example.com/api/v1"],
        "is not an http(s) URL",
    ),
    ("ok.csv", b"prompt\nhello\n", ["--max-cost", "lots"], "--max-cost"),
    ("semi.csv", b"id;prompt\n1;hello\n", [], "is the file separated by ';'? pass --delimiter ';'"),
    ("tabs.csv", b"id\tprompt\n1\thello\n", [], "separated by tab? pass --delimiter tab"),
    (
        "semi_commas.csv",
        b"review;label\ngood, really good;1\nbad;2\n",
        [],
        "line 2 has 2 fields but the header has 1 (is the file separated by ';'? pass --delimiter ';')",
    ),
    (
        "tabs_commas.csv",
        b"id\tprompt\n1\tone, two, three\n2\tfour\n",
        [],
        "line 2 has 3 fields but the header has 1 (is the file separated by tab? pass --delimiter tab)",
    ),
    ("commas_semi.csv", b"id,prompt\n1,x\n", ["--delimiter", ";"], "separated by ','? pass --delimiter ','"),
    (
        "ok.csv",
        b"prompt\nhello\n",
        ["--rpm", "fast"],
        "--rpm must be auto, 0 (no pacing) or requests per minute",
    ),
    ("ok.csv", b"prompt\nhello\n", ["--cache", "sometimes"], "--cache must be off, auto, always or a folder"),
]


@pytest.mark.parametrize(("name", "content", "extra", "message"), BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_nothing_written(
    tmp_path: Path, name: str, content: bytes | None, extra: list[str], message: str
) -> None:
    src = tmp_path / name
    if content is not None:
        src.write_bytes(content)
    out = tmp_path / "out.parquet"
    result = run_cli(["run", str(src), "-o", str(out), "--sandbox", *extra])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("batchllm: error:"), result.stderr
    assert message in lines[0]
    if name == "ragged.csv":  # no other delimiter explains it: no hint
        assert "--delimiter" not in lines[0]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name] if content is not None else [])


def test_json_lines_rows_run_as_a_table_and_resume(sandbox, tmp_path: Path) -> None:
    """A .jsonl of rows (no custom_id): its keys are the columns, every value text as a CSV's,
    a key a line leaves out an empty cell; a budget stop, then the same command with a higher cap
    sends only the rest, and the output keeps every input row with its answer."""
    lines = [
        {"id": i, "text": f"review {i}: works well", "stars": i % 5, "tags": ["a", i]} for i in range(40)
    ]
    lines[3] = {"id": 3, "text": None}  # null, and keys left out
    lines[7] = {"id": 7, "text": "odd one", "extra": True}  # a key first seen on line 8
    src = tmp_path / "rows.jsonl"
    numbers = (
        b'{"id": 9, "text": "n", "stars": 1.50, "tags": [1e3, {"x": 0.10}], "extra": 12345678901234567890123}'
    )
    src.write_bytes(b"\n".join(numbers if i == 9 else orjson.dumps(x) for i, x in enumerate(lines)) + b"\n\n")
    out = tmp_path / "out.parquet"
    args = ["run", str(src), "-o", str(out), "--template", "Sentiment of: {text}", "--id-column", "id",
            "--rpm", "0", "--concurrency", "1"]  # fmt: skip
    stopped = run_cli([*args, "--max-cost", "0.0002"], env=sandbox.env())
    assert stopped.exit_code == 3, stopped.output
    first = sandbox.count()
    assert 0 < first < 39
    done = run_cli([*args, "--max-cost", "1"], env=sandbox.env())
    assert done.exit_code == 0, done.output
    assert sandbox.count() == 39  # each row with a prompt sent once, across the stop
    rows = pq.read_table(out).to_pylist()
    assert [r["id"] for r in rows] == [str(i) for i in range(40)]
    assert list(rows[0])[:5] == ["id", "text", "stars", "tags", "extra"]
    assert (rows[1]["stars"], rows[1]["tags"], rows[1]["extra"]) == ("1", '["a",1]', None)
    assert rows[7]["extra"] == "true" and rows[3]["stars"] is None
    # Numbers as the file wrote them, nested ones too: no float in between.
    assert (rows[9]["stars"], rows[9]["tags"], rows[9]["extra"]) == (
        "1.50",
        '[1e3,{"x":0.10}]',
        "12345678901234567890123",
    )
    assert rows[3]["status"] == "error" and "empty in row 4" in rows[3]["error"]
    assert all(r["status"] == "ok" and r["response"] for i, r in enumerate(rows) if i != 3)


def test_json_lines_rows_with_a_custom_id_key_are_rows(sandbox, tmp_path: Path) -> None:
    """A line with a custom_id and no body object is a data row (a request line has both): the file
    runs as rows, custom_id an ordinary column usable as --id-column."""
    src = tmp_path / "rows.jsonl"
    lines = [{"custom_id": f"c{i}", "text": f"review {i}: works well"} for i in range(6)]
    src.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines))
    out = tmp_path / "out.parquet"
    args = ["run", str(src), "-o", str(out), "--template", "Sentiment of: {text}", "--rpm", "0"]
    result = run_cli([*args, "--id-column", "custom_id"], env=sandbox.env())
    assert result.exit_code == 0, result.output
    assert sandbox.count() == 6
    rows = pq.read_table(out).to_pylist()
    assert [r["custom_id"] for r in rows] == [f"c{i}" for i in range(6)]
    assert [r["text"] for r in rows] == [x["text"] for x in lines]
    assert all(r["status"] == "ok" and r["response"] for r in rows)


def test_a_semicolon_csv_runs_with_delimiter(sandbox, tmp_path: Path) -> None:
    src = tmp_path / "semi.csv"
    src.write_bytes(b"id;prompt\n1;hello; world\n2;bye\n")
    out = tmp_path / "out.parquet"
    result = run_cli(["run", str(src), "-o", str(out), "--delimiter", ";", "--rpm", "0"], env=sandbox.env())
    assert result.exit_code == 2 and "line 2 has 3 fields but the header has 2" in result.stderr
    result = run_cli(["run", str(src), "-o", str(out), "--delimiter", "tab"], env=sandbox.env())
    assert result.exit_code == 2
    src.write_bytes(b"id;prompt\n1;hello world\n2;bye\n")
    result = run_cli(["run", str(src), "-o", str(out), "--delimiter", ";", "--rpm", "0"], env=sandbox.env())
    assert result.exit_code == 0, result.stderr
    assert pq.read_table(out).column("prompt").to_pylist() == ["hello world", "bye"]


def test_a_tsv_file_reads_with_tabs(sandbox, tmp_path: Path) -> None:
    """`.tsv` (and `.tab`) files are CSV with tabs, without a --delimiter: commas stay in the text."""
    src = tmp_path / "in.tsv"
    src.write_bytes(b"id\tprompt\n1\thello, world\n2\tbye\n")
    out = tmp_path / "out.parquet"
    result = run_cli(["run", str(src), "-o", str(out), "--rpm", "0"], env=sandbox.env())
    assert result.exit_code == 0, result.stderr
    assert pq.read_table(out).column("prompt").to_pylist() == ["hello, world", "bye"]


def test_status_and_cache_clear_name_what_is_wrong(tmp_path: Path) -> None:
    result = run_cli(["status", str(tmp_path / "nowhere" / "out.parquet")])
    assert result.exit_code == 2
    assert f"{tmp_path / 'nowhere' / 'out.parquet'}: no such file" in result.stderr
    result = run_cli(["cache", "clear", "--older-than", "1"])
    assert result.exit_code == 2 and "needs a unit, like 1d or 1h" in result.stderr
    src = write_csv(tmp_path / "in.csv", [{"prompt": "hi"}])
    result = run_cli(
        ["run", str(src), "-o", str(tmp_path / "o.parquet"), "--sandbox", "--cache", "sometimes"]
    )
    assert result.exit_code == 2 and not (Path.cwd() / "sometimes").exists()


def test_status_finds_a_journal_kept_elsewhere_with_checkpoint(sandbox, tmp_path: Path) -> None:
    """`status OUT` of an output written with --checkpoint elsewhere: its summary names the
    journal (it said "no batchllm journal here" while `report OUT` found it)."""
    src = write_csv(tmp_path / "in.csv", [{"prompt": f"hi {i}"} for i in range(5)])
    out, kept = tmp_path / "o.parquet", tmp_path / "journals" / "o"
    ran = run_cli(
        ["run", str(src), "-o", str(out), "--checkpoint", str(kept), "--rpm", "0"], env=sandbox.env()
    )
    assert ran.exit_code == 0, ran.output
    said = run_cli(["status", str(out)])
    assert said.exit_code == 0 and f"journal: {kept}" in said.stdout, said.output
    assert "rows: 5 done (5 ok, 0 error)" in said.stdout
    # A relative --checkpoint, and `status` asked from another folder.
    rel = spawn(
        ["run", "in.csv", "-o", "rel.parquet", "--checkpoint", "relck", "--rpm", "0"],
        env=sandbox.env(),
        cwd=tmp_path,
    )
    assert rel.wait(timeout=60) == 0
    said = run_cli(["status", str(tmp_path / "rel.parquet")])
    assert said.exit_code == 0 and f"journal: {tmp_path / 'relck'}" in said.stdout, said.output


def test_sandbox_says_the_endpoint_and_key_file_given_are_not_used(tmp_path: Path) -> None:
    """--sandbox answers every request: an --endpoint or --api-key-file given beside it is said
    to be unused (it was ignored in silence)."""
    src = write_csv(tmp_path / "in.csv", [{"prompt": "hi"}])
    key = tmp_path / "key.txt"
    key.write_text("not-used\n")
    result = run_cli(["run", str(src), "-o", str(tmp_path / "o.parquet"), "--sandbox",
                      "--endpoint", "http://127.0.0.1:9/v1", "--api-key-file", str(key)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "--sandbox answers every request: --endpoint and --api-key-file not used" in result.stderr


def test_the_readme_names_only_files_that_ship() -> None:
    text = (ROOT / "README.md").read_text()
    named = set(re.findall(r"(?:sample_data|jobs|docs)/[\w.]+\.\w+", text))
    assert named and all((ROOT / path).exists() for path in named), named


def test_no_key_and_no_sandbox(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "in.csv", [{"prompt": "hi"}])
    result = run_cli(["run", str(src), "-o", str(tmp_path / "o.parquet")])
    assert result.exit_code == 2
    assert "DATAOORTS_API_KEY" in result.stderr and "--sandbox" in result.stderr


def test_every_command_help_ends_with_an_example() -> None:
    from batchllm.cli import cli

    for name in [None, *cli.commands]:
        args = ["--help"] if name is None else [name, "--help"]
        result = run_cli(args)
        assert result.exit_code in (0, None)
        text = result.stdout
        assert "Example" in text[text.rindex("Show this message and exit") :], name


def test_usage_errors_are_one_line_too(tmp_path: Path) -> None:
    from .conftest import spawn

    for args in (["run", "x.csv", "--temperature", "abc"], ["run", "x.csv", "--bogus"], ["frobnicate"]):
        proc = spawn(args)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 2
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("batchllm: error:"), err


def test_progress_bar_on_a_terminal_and_none_in_a_pipe(sandbox_factory, tmp_path: Path) -> None:
    import os
    import pty
    import subprocess

    from .conftest import BIN, prompts_csv

    box = sandbox_factory(latency=0.05)
    src = prompts_csv(tmp_path / "in.csv", 60)
    args = [
        str(BIN),
        "run",
        str(src),
        "-o",
        str(tmp_path / "tty.parquet"),
        "--rpm",
        "0",
        "--concurrency",
        "4",
    ]
    leader, follower = pty.openpty()
    env = {**os.environ, **box.env(), "COLUMNS": "120"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    assert proc.wait(30) == 0
    shown = b"".join(chunks).decode("utf-8", "replace")
    assert "row/s" in shown and "60/60" in shown and "$0.0" in shown  # rows, rate, dollars
    piped = subprocess.run(
        [*args[:4], str(tmp_path / "pipe.parquet"), *args[5:]],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert piped.returncode == 0
    assert "row/s" not in piped.stderr and "\r" not in piped.stderr


BLANKS = ["", "   ", "\t \n"]  # empty, and only whitespace: nothing to ask


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_rows_without_a_prompt_are_never_sent_and_estimate_counts_them(
    sandbox_factory, tmp_path: Path, fmt: str
) -> None:
    box = sandbox_factory(keep_bodies=True)
    prompts: list[str | None] = ["first", *BLANKS, "last"]
    if fmt == "csv":
        src = write_csv(tmp_path / "in.csv", [{"n": i, "prompt": t} for i, t in enumerate(prompts)])
    elif fmt == "parquet":
        prompts.insert(1, None)  # a null: a CSV cell has no null, it is ""
        src = tmp_path / "in.parquet"
        pq.write_table(pa.table({"n": list(range(len(prompts))), "prompt": prompts}), src)
    else:
        src = tmp_path / "in.jsonl"
        src.write_bytes(
            b"".join(
                orjson.dumps({"custom_id": f"r{i}", "body": {"messages": [{"role": "user", "content": t}]}})
                + b"\n"
                for i, t in enumerate(prompts)
            )
        )
    blank = len(prompts) - 2
    estimate = run_cli(["estimate", str(src), "--format", "json"], env=box.env())
    assert estimate.exit_code == 0, estimate.stderr
    figures = orjson.loads(estimate.stdout)
    assert figures["rows_without_prompt"] == blank and figures["rows_to_send"] == 2
    text = run_cli(["estimate", str(src)], env=box.env())
    assert re.search(rf"rows without a prompt \(not sent\) +{blank}\n", text.stdout), text.stdout

    out = tmp_path / "out.parquet"
    result = run_cli(["run", str(src), "-o", str(out), "--rpm", "0", "--cache", "off"], env=box.env())
    assert result.exit_code == 0, result.stderr
    sent = [orjson.loads(b)["data"]["messages"][-1]["content"] for b in box.sandbox.bodies]
    assert sorted(sent) == ["first", "last"] and box.count() == 2
    rows = pq.read_table(out).to_pylist()
    assert [r["status"] for r in rows] == ["ok", *["error"] * blank, "ok"]
    for r in rows[1:-1]:
        assert r["error"].startswith("NoPrompt: ") and "(not sent)" in r["error"]
        assert r["attempts"] == 0 and r["cost_usd"] is None and r["response"] is None
    summary = summary_of(out)
    assert summary["rows"]["error"] == summary["rows"]["no_prompt"] == blank
    assert summary["rows"]["failed"] == 0  # what a cron job alerts on: nothing a rerun may mend
    assert f"2 ok, 0 failed, {blank} without a prompt (not sent)" in result.stderr


def test_a_template_row_is_empty_when_every_column_it_names_is(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(keep_bodies=True)
    rows = [
        {"title": "Lamp", "body": "bright"},
        {"title": "", "body": "  "},  # nothing of the row: the template's words alone
        {"title": "Kettle", "body": ""},  # one column is enough to ask
        {"title": " ", "body": ""},
    ]
    src = write_csv(tmp_path / "in.csv", rows)
    template = "Rate this product.\nTitle: {title}\nReview: {body}"
    args = [str(src), "--template", template]
    estimate = run_cli(["estimate", *args, "--format", "json"], env=box.env())
    assert orjson.loads(estimate.stdout)["rows_without_prompt"] == 2
    out = tmp_path / "out.parquet"
    result = run_cli(["run", *args, "-o", str(out), "--rpm", "0"], env=box.env())
    assert result.exit_code == 0, result.stderr
    sent = sorted(orjson.loads(b)["data"]["messages"][-1]["content"] for b in box.sandbox.bodies)
    assert sent == sorted(template.format(**r) for r in (rows[0], rows[2]))
    table = pq.read_table(out).to_pylist()
    assert [r["status"] for r in table] == ["ok", "error", "ok", "error"]
    assert "the --template's columns ('title', 'body') are all empty in row 2 (not sent)" in table[1]["error"]


REVIEWS = 'review,stars\n"naïve café, très bien",5\nGrüße aus Köln,4\n'


@pytest.mark.parametrize("codec", ["utf-8-sig", "utf-16", "utf-16-be", "utf-32"])
def test_files_with_a_byte_order_mark_read_as_marked(sandbox_factory, tmp_path: Path, codec: str) -> None:
    box = sandbox_factory(keep_bodies=True)
    src = tmp_path / "in.csv"
    data = REVIEWS.encode(codec)
    if codec == "utf-16-be":  # Python writes no mark for an explicit byte order
        data = b"\xfe\xff" + data
    src.write_bytes(data)
    out = tmp_path / "out.parquet"
    result = run_cli(
        ["run", str(src), "-o", str(out), "--template", "Rate: {review}", "--rpm", "0"], env=box.env()
    )
    assert result.exit_code == 0, result.stderr
    table = pq.read_table(out)
    assert table.column_names[:2] == ["review", "stars"]
    assert table.column("review").to_pylist() == ["naïve café, très bien", "Grüße aus Köln"]
    sent = sorted(orjson.loads(b)["data"]["messages"][-1]["content"] for b in box.sandbox.bodies)
    assert sent == ["Rate: Grüße aus Köln", "Rate: naïve café, très bien"]


def _one_line_error(proc_args: list[str]) -> str:
    """Run the real executable: what Arrow's threads print would show here, not in CliRunner."""
    from .conftest import spawn

    proc = spawn(proc_args)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("batchllm: error:"), err
    assert "\x00" not in err and "Traceback" not in err and "Exception ignored" not in err
    return lines[0]


def test_a_file_in_another_encoding_is_named_with_the_flag_to_pass(sandbox, tmp_path: Path) -> None:
    latin = tmp_path / "latin.csv"
    latin.write_bytes("review,stars\nfine,4\nnaïve café,5\nthé,2,3\n".encode("latin-1"))
    windows = tmp_path / "windows.csv"
    windows.write_bytes("review\n\u201csmart quotes\u201d\n".encode("cp1252"))
    bare16 = tmp_path / "bare16.csv"
    bare16.write_bytes("review\nhello\n".encode("utf-16-le"))  # no byte-order mark
    out = str(tmp_path / "o.parquet")
    template = ["--template", "Rate: {review}"]
    for command in (
        ["run", "-o", out, "--sandbox"],
        ["estimate"],
        ["export-batch", "-o", str(tmp_path / "r.jsonl")],
    ):
        line = _one_line_error([*command, str(latin), *template])
        assert f"{latin}: line 3 is not UTF-8 text (byte 0xef)" in line
        assert "--encoding latin-1 (job key: encoding)" in line
    assert "--encoding cp1252" in _one_line_error(["estimate", str(windows), *template])
    line = _one_line_error(["estimate", str(bare16), *template])
    assert "looks like UTF-16 without a byte-order mark; pass --encoding utf-16-le" in line
    line = _one_line_error(["estimate", str(latin), *template, "--encoding", "latin-2000"])
    assert "--encoding must be a text encoding such as utf-8, latin-1" in line
    # With the encoding given the file reads, and a ragged row is named, not a decoding error.
    line = _one_line_error(["estimate", str(latin), *template, "--encoding", "latin-1"])
    assert f"{latin}: line 4 has 3 fields but the header has 2" in line
    latin.write_bytes("review,stars\nfine,4\nnaïve café,5\n".encode("latin-1"))
    result = run_cli(
        ["run", str(latin), "-o", out, *template, "--encoding", "latin-1", "--rpm", "0"], env=sandbox.env()
    )
    assert result.exit_code == 0, result.stderr
    assert pq.read_table(out).column("review").to_pylist() == ["fine", "naïve café"]
    result = run_cli(
        ["run", str(bare16), "-o", str(tmp_path / "b.parquet"), *template, "--encoding", "utf-16-le"],
        env=sandbox.env(),
    )
    assert result.exit_code == 0, result.stderr


def test_an_undecodable_column_the_prompt_does_not_use_stops_before_sending(sandbox, tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_bytes(b"prompt,note\nhello,fine\nbye,caf\xe9\n")
    out = tmp_path / "o.parquet"
    result = run_cli(["run", str(src), "-o", str(out), "--rpm", "0"], env=sandbox.env())
    assert result.exit_code == 2 and "line 3 is not UTF-8 text" in result.stderr
    assert sandbox.count() == 0 and not out.exists()


def test_output_folders_are_made_inside_an_existing_one_and_said(sandbox, tmp_path: Path) -> None:
    src = write_csv(tmp_path / "in.csv", [{"prompt": "hi"}])
    out = tmp_path / "new" / "deeper" / "x.parquet"
    result = run_cli(["run", str(src), "-o", str(out), "--rpm", "0"], env=sandbox.env())
    assert result.exit_code == 0, result.stderr
    assert f"warning: made the folder {tmp_path / 'new'} for {out}" in result.stderr and out.exists()
    again = run_cli(["run", str(src), "-o", str(out), "--rpm", "0"], env=sandbox.env())
    assert "made the folder" not in again.stderr
    # Bad input is refused before any folder is made (exit 2: nothing happened).
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"prompt\ncaf\xe9\n")
    for command in (["run", "--sandbox"], ["estimate"], ["export-batch"]):
        target = tmp_path / "never" / ("x.jsonl" if command == ["export-batch"] else "x.parquet")
        assert run_cli([*command, str(bad), "-o", str(target)]).exit_code == 2
        assert not (tmp_path / "never").exists()
    exported = run_cli(["export-batch", str(src), "-o", str(tmp_path / "requests" / "r.jsonl")])
    assert exported.exit_code == 0 and f"warning: made the folder {tmp_path / 'requests'}" in exported.stderr
    # Every command says it in the same words (folders.made_note).
    estimated = run_cli(["estimate", str(src), "-o", str(tmp_path / "kept" / "x.parquet")])
    assert (
        f"warning: made the folder {tmp_path / 'kept'} for {tmp_path / 'kept' / 'x.parquet'}"
        in estimated.stderr
    )
    started = run_cli(["init", str(src), "-o", str(tmp_path / "jobs" / "j.toml")])
    assert (
        f"warning: made the folder {tmp_path / 'jobs'} for {tmp_path / 'jobs' / 'j.toml'}" in started.stderr
    )
    top = Path("/batchllm-no-such-folder")
    assert not top.exists()
    for command in (["run", "--sandbox"], ["estimate"]):
        result = run_cli([*command, str(src), "-o", str(top / "dir" / "x.parquet")])
        assert result.exit_code == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and f"there is no folder {top}" in lines[0], result.stderr
        assert "mkdir -p /batchllm-no-such-folder/dir" in lines[0]
        assert not top.exists()
    result = run_cli(["run", str(src), "-o", str(src / "x.parquet"), "--sandbox"])
    assert result.exit_code == 2 and f"{src} is a file, not a folder" in result.stderr


@pytest.mark.parametrize("codec", ["utf-8-sig", "utf-16"])
def test_a_request_file_with_a_byte_order_mark_runs(sandbox_factory, tmp_path: Path, codec: str) -> None:
    box = sandbox_factory(keep_bodies=True)
    src = tmp_path / "requests.jsonl"
    lines = [
        {"custom_id": f"r{i}", "body": {"messages": [{"role": "user", "content": t}]}}
        for i, t in enumerate(["héllo", "wörld"])
    ]
    src.write_bytes("".join(orjson.dumps(line).decode() + "\n" for line in lines).encode(codec))
    out = tmp_path / "out.parquet"
    result = run_cli(["run", str(src), "-o", str(out), "--rpm", "0"], env=box.env())
    assert result.exit_code == 0, result.stderr
    assert pq.read_table(out).column("custom_id").to_pylist() == ["r0", "r1"]
    sent = sorted(orjson.loads(b)["data"]["messages"][-1]["content"] for b in box.sandbox.bodies)
    assert sent == ["héllo", "wörld"]


def test_status_does_not_offer_to_resend_rows_without_a_prompt(sandbox, tmp_path: Path) -> None:
    """Every row done but one with an empty prompt: sending failed rows again would send nothing,
    so ``status`` offers neither a resume nor --retry-errors."""
    src = write_csv(tmp_path / "in.csv", [{"prompt": "hello"}, {"prompt": ""}, {"prompt": "bye"}])
    out = tmp_path / "out.parquet"
    result = run_cli(["run", str(src), "-o", str(out), "--rpm", "0", "--progress", "none"], env=sandbox.env())
    assert result.exit_code == 0, result.output
    status = run_cli(["status", str(out)]).stdout
    assert "resume with" not in status and "--retry-errors" not in status, status


def test_quotes_that_close_read_as_written(tmp_path: Path) -> None:
    """A literal quote inside an unquoted value (an odd count of quotes in the file), quoted
    values over two lines and doubled quotes: sound CSV, read row by row, not refused."""
    src = tmp_path / "quotes.csv"
    src.write_bytes(b'id,prompt\n1,a 12" screen\n2,"two\nlines"\n3,"say ""hi"""\n')
    result = run_cli(["estimate", str(src), "--format", "json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["rows"] == 3


def test_a_reader_that_goes_away_leaves_the_run_and_its_exit_code_alone(tmp_path: Path) -> None:
    """`batchllm run ... 2>&1 | head -1`: the reader closes the pipe after the first line; the run
    finishes, writes its output, and exits 0, not as a broken pipe would."""
    src = prompts_csv(tmp_path / "in.csv", 30)
    out = tmp_path / "out.parquet"
    proc = spawn(["run", str(src), "-o", str(out), "--sandbox", "--rpm", "0", "--progress", "lines"])
    assert proc.stderr is not None
    assert proc.stderr.readline().startswith("batchllm: 30 rows in")
    proc.stderr.close()
    assert proc.wait(timeout=120) == 0
    assert pq.read_table(out).column("status").to_pylist() == ["ok"] * 30


def test_spend_since_a_day_to_come_says_so(tmp_path: Path) -> None:
    result = run_cli(["spend", "--ledger", str(tmp_path / "l.db"), "--since", "2999-01-01"])
    assert result.exit_code == 2 and "--since 2999-01-01 is in the future" in result.stderr


def test_bad_money_values_and_a_broken_journal_are_one_line_errors(tmp_path: Path) -> None:
    """NaN caps (flag or job key), a fleet price refused, and a journal that is not a database
    under status and report: one line naming the value or file, exit 2, no traceback."""
    src = write_csv(tmp_path / "in.csv", [{"prompt": "hi"}])
    out = tmp_path / "o.parquet"
    for flag in ("--max-cost", "--max-cost-per-run", "--max-cost-per-month"):
        result = run_cli(["run", str(src), "-o", str(out), "--sandbox", flag, "nan"])
        assert result.exit_code == 2 and f"{flag} 'nan' is not a dollar amount" in result.stderr, (
            result.stderr
        )
    job = tmp_path / "j.toml"
    job.write_text(f'input = "{src}"\noutput = "{out}"\nmax_cost = "nan"\n')
    checked = run_cli(["validate", str(job)])
    assert checked.exit_code == 2 and "key 'max_cost' 'nan' is not a dollar amount" in checked.output
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        '[[endpoint]]\nname = "a"\nendpoint = "http://127.0.0.1:9/v1"\nprovider = "openai"\n'
        'model = "m"\ninput_price = "abc"\noutput_price = "1"\nrpm = 60\n'
    )
    result = run_cli(["run", str(src), "-o", str(out), "--fleet", str(fleet)])
    assert result.exit_code == 2 and "key 'input_price'" in result.stderr and "Traceback" not in result.stderr
    broken = tmp_path / "b.parquet.batchllm"
    broken.mkdir()
    (broken / "journal.sqlite").write_text("not a database")
    for command in ("status", "report"):
        result = run_cli([command, str(tmp_path / "b.parquet")])
        assert result.exit_code == 2, (command, result.output)
        assert "journal.sqlite: cannot read the journal: file is not a database" in result.output


def test_an_output_that_is_the_input_is_refused(tmp_path: Path) -> None:
    """-o naming the input file would replace the input with the output: refused, the input kept."""
    converted = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": ["hi"]}), converted)
    before = converted.read_bytes()
    result = run_cli(["run", str(converted), "-o", str(tmp_path / "." / "in.parquet"), "--sandbox"])
    assert result.exit_code == 2 and "is the input: the output would replace it" in result.stderr
    assert converted.read_bytes() == before


def test_a_job_file_as_the_input_and_data_as_the_job_file_are_named(tmp_path: Path) -> None:
    """The two mix-ups of a first job: each names the way on (they said "missing --output" and
    "not valid TOML")."""
    job = ROOT / "jobs" / "sentiment.toml"
    for command in ("run", "estimate"):
        result = run_cli([command, str(job), "--sandbox"])
        assert result.exit_code == 2 and f"{job} is a job file: give it with --job {job}" in result.stderr
    data = ROOT / "sample_data" / "reviews.parquet"
    result = run_cli(["validate", str(data)])
    assert (
        result.exit_code == 2 and f"{data} is data, not a job file: `batchllm init {data}`" in result.output
    )
    result = run_cli(["run", "--job", str(ROOT / "sample_data" / "reviews.csv"), "--sandbox"])
    assert result.exit_code == 2 and "reviews.csv is data, not a job file" in result.stderr


def test_a_refused_run_rewrites_its_summary_file(sandbox, tmp_path: Path) -> None:
    """--summary-json after a refusal (a bad flag, a column the template names that is not
    there): the file says exit 2 and why, not the last night's success a monitor would read."""
    src = write_csv(tmp_path / "in.csv", [{"prompt": "hi"}])
    out, summary = tmp_path / "o.parquet", tmp_path / "s.json"
    base = ["run", str(src), "-o", str(out), "--summary-json", str(summary), "--rpm", "0"]
    assert run_cli(base, env=sandbox.env()).exit_code == 0
    assert json.loads(summary.read_text())["exit_code"] == 0
    for bad in (["--temperature", "9"], ["--template", "Say {txt}"]):
        result = run_cli([*base, *bad], env=sandbox.env())
        assert result.exit_code == 2, result.output
        written = json.loads(summary.read_text())
        assert written["exit_code"] == 2 and written["complete"] is False
        assert written["message"] in result.stderr
