"""Structured output (--structured): the schemas sent, the sandbox holding replies to them, and a
server that refuses response_format, through the CLI against the sandbox's OpenAI face."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest

from batchllm.job import build_job
from batchllm.labeling.parse import parse_label
from batchllm.labeling.spec import Labeling, load_schema
from batchllm.labeling.structured import Formats, response_format, strict
from batchllm.sandbox.labeler import expected_label
from batchllm.sandbox.schema import conform, problem

from .conftest import ROOT, run_cli, write_csv

LABELS = ["positive", "negative", "neutral"]
MESSY = {
    "label_wrong": 0.10,
    "label_prose": 0.15,
    "label_out_of_set": 0.10,
    "label_invalid_json": 0.10,
    "label_truncated": 0.05,
}
RATES = [("wrong", 0.10), ("prose", 0.15), ("out_of_set", 0.10), ("invalid_json", 0.10), ("truncated", 0.05)]
PACK_MESSY = {"pack_missing": 0.05, "pack_prose": 0.10, "pack_fenced": 0.10, "pack_broken": 0.05}
WORDS = ["love it", "broke after a week", "it's okay", "great value", "disappointed", "works well", "meh"]
SCHEMA = ROOT / "sample_data" / "review_fields.json"
MODEL = ["--model", "meta-llama/Llama-3.1-70B-Instruct", "--input-price", "0.31", "--output-price", "0.34"]


def reviews(tmp_path: Path, n: int) -> Path:
    """``n`` distinct reviews (no two rows share a request)."""
    rows = [{"id": f"r{i}", "text": f"Review {i}: {WORDS[i % len(WORDS)]}"} for i in range(n)]
    return write_csv(tmp_path / "in.csv", rows)


def run_openai(box, src: Path, out: Path, *extra: str):
    args = ["run", str(src), "-o", str(out), "--template", "Classify: {text}", "--provider", "openai"]
    args += [*MODEL, "--rpm", "0", "--id-column", "id", "--cache", "off", *extra]
    return run_cli(args, env=box.openai_env())


def test_schemas_are_what_strict_mode_takes() -> None:
    raw, fields, required = load_schema(SCHEMA)
    compiled = strict(raw)
    assert compiled["required"] == list(raw["properties"]) and compiled["additionalProperties"] is False
    assert compiled["properties"]["sentiment"] == raw["properties"]["sentiment"]  # required: as given
    assert compiled["properties"]["stars_guess"]["type"] == ["integer", "null"]  # optional: nullable
    # The emulator refuses what OpenAI's strict mode refuses, and takes what we send.
    assert "additionalProperties" in (problem(response_format("x", raw)) or "")
    formats = Formats(Labeling(fields=fields, required=required, schema=raw))
    assert problem(formats.row) is None and problem(formats.pack(3)) is None
    pack = formats.pack(3)["json_schema"]["schema"]
    assert pack["required"] == ["1", "2", "3"] and pack["properties"]["2"] == compiled
    assert formats.pack(3) is formats.pack(3)  # built once per size
    labels = Formats(Labeling(labels=tuple(LABELS)))
    assert labels.row["json_schema"]["schema"]["properties"] == {"label": {"type": "string", "enum": LABELS}}
    assert labels.pack(2)["json_schema"]["schema"]["properties"]["1"] == {"type": "string", "enum": LABELS}
    # What a server holding replies to the schema answers is valid under it.
    assert conform(compiled, {"sentiment": "mixed", "topics": "price"}, 1) == {
        "sentiment": conform(compiled["properties"]["sentiment"], "mixed", (1, "sentiment")),
        "mentions_price": False,  # required: never null
        "stars_guess": None,
        "topics": [],
    }
    # The structured reply shape reads, as the old shapes do.
    assert parse_label('{"label": "Positive"}', tuple(LABELS), False) == ("positive", None)
    assert parse_label('{"label":"neutral","why":"not negative"}', tuple(LABELS), False) == ("neutral", None)
    assert parse_label('{"label": "mixed"}', tuple(LABELS), False) == (None, "not_in_set:mixed")


def test_messy_answers_held_to_the_schema_need_no_reask(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(**MESSY)
    n = 1000
    src = reviews(tmp_path, n)
    off = run_openai(box, src, tmp_path / "off.parquet", "--labels", ",".join(LABELS), "--structured", "off")
    assert off.exit_code in (0, 1), off.output
    off_rows = pq.read_table(tmp_path / "off.parquet").to_pylist()
    assert sum(r["reasks"] for r in off_rows) > 100  # the sandbox is messy without a schema
    before = box.count()
    result = run_openai(
        box, src, tmp_path / "on.parquet", "--labels", ",".join(LABELS), "--concurrency", "64"
    )
    assert result.exit_code == 0, result.output
    rows = pq.read_table(tmp_path / "on.parquet").to_pylist()
    assert len(rows) == n
    assert [r["status"] for r in rows].count("ok") == n and sum(r["reasks"] for r in rows) == 0
    assert box.count() - before == n  # one request a row: no re-ask, no retry
    for r in rows:  # what the model meant, wrong answers included, and nothing else
        user = f"Classify: {r['text']}"
        assert r["label"] == expected_label(user, LABELS, None, RATES)
        assert orjson.loads(r["response"]) == {"label": r["label"]}
    assert [r["label"] for r in rows] == [r["label"] for r in off_rows]


def test_packs_of_10_in_exactly_rows_over_10_requests(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(**MESSY, **PACK_MESSY, keep_bodies=True)
    n = 1000
    src = reviews(tmp_path, n)
    args = ["--labels", ",".join(LABELS), "--pack", "10", "--max-tokens", "8"]
    result = run_openai(box, src, tmp_path / "on.parquet", *args)
    assert result.exit_code == 0, result.output
    assert box.count() == n // 10
    rows = pq.read_table(tmp_path / "on.parquet").to_pylist()
    assert all(r["status"] == "ok" and r["label"] in LABELS and r["reasks"] == 0 for r in rows)
    schemas = {
        len(orjson.loads(b)["response_format"]["json_schema"]["schema"]["required"])
        for b in box.sandbox.bodies
    }
    assert schemas == {10}
    before = box.count()
    off = run_openai(box, src, tmp_path / "off.parquet", *args, "--structured", "off")
    assert off.exit_code in (0, 1), off.output
    assert box.count() - before > n // 10  # without it: items left out, replies broken, re-asks


def test_json_schema_jobs_are_structured_too(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(**MESSY, keep_bodies=True)
    n = 300
    src = reviews(tmp_path, n)
    result = run_openai(box, src, tmp_path / "o.parquet", "--json-schema", str(SCHEMA), "--max-tokens", "64")
    assert result.exit_code == 0, result.output
    assert box.count() == n
    rows = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert all(r["status"] == "ok" and r["reasks"] == 0 for r in rows)
    assert all(r["sentiment"] in LABELS and isinstance(r["mentions_price"], bool) for r in rows)
    sent = orjson.loads(box.sandbox.bodies[0])["response_format"]
    assert sent == response_format("answer", strict(orjson.loads(SCHEMA.read_bytes())))
    # Five rows to a request, with the messy packs' items left out, in prose, fenced or broken:
    # held to the schema, every item is there and valid.
    box = sandbox_factory(**MESSY, **PACK_MESSY)
    args = ["--json-schema", str(SCHEMA), "--max-tokens", "64", "--pack", "5"]
    result = run_openai(box, src, tmp_path / "p.parquet", *args)
    assert result.exit_code == 0, result.output
    assert box.count() == n // 5
    packed = pq.read_table(tmp_path / "p.parquet").to_pylist()
    assert all(r["status"] == "ok" and r["reasks"] == 0 and r["sentiment"] in LABELS for r in packed)


@pytest.mark.parametrize("pack", [1, 10])
def test_a_server_refusing_response_format_gets_one_warning_then_the_off_results(
    sandbox_factory, tmp_path: Path, pack: int
) -> None:
    n = 400
    src = reviews(tmp_path, n)
    messy = {**MESSY, **PACK_MESSY}
    labels = ["--labels", ",".join(LABELS), "--pack", str(pack), "--max-tokens", "16"]
    plain = sandbox_factory(**messy, keep_bodies=True)
    off = run_openai(plain, src, tmp_path / "off.parquet", *labels, "--structured", "off")
    assert off.exit_code in (0, 1), off.output
    box = sandbox_factory(**messy, refuse_response_format=True, keep_bodies=True)
    summary = tmp_path / "s.json"
    args = [*labels, "--concurrency", "16", "--summary-json", str(summary)]
    result = run_openai(box, src, tmp_path / "auto.parquet", *args)
    assert result.exit_code == off.exit_code, result.output
    assert result.stderr.count("refuses response_format") == 1
    refused = box.count(400)
    assert 1 <= refused <= 16  # the requests already out when the first refusal came back
    assert box.count() == plain.count() + refused
    # Sent again without it, byte for byte the request --structured off sends.
    sent = [b for b in box.sandbox.bodies if b"response_format" not in b]
    assert sorted(sent) == sorted(plain.sandbox.bodies)
    keys = ["id", "status", "label", "reasks", "prompt_tokens", "completion_tokens", "cost_usd", "response"]
    got = pq.read_table(tmp_path / "auto.parquet", columns=keys).to_pylist()
    assert got == pq.read_table(tmp_path / "off.parquet", columns=keys).to_pylist()
    # A 400 is not billed, and nothing is counted as maybe billed.
    assert box.sandbox.stats["prompt_tokens"] == plain.sandbox.stats["prompt_tokens"]
    assert "maybe_billed" not in json.loads(summary.read_text())
    assert "may have been billed" not in run_cli(["status", str(tmp_path / "auto.parquet")]).output


def test_a_paced_run_sends_what_waited_for_the_pace_without_the_refused_field(
    sandbox_factory, tmp_path: Path
) -> None:
    # At 20 requests/s, every request waits for its turn after being made: one refused is enough
    # for those waiting to leave without response_format (each was sent once with it, 80
    # requests for 40 rows, when the field was taken off before the wait).
    src = reviews(tmp_path, 40)
    box = sandbox_factory(refuse_response_format=True)
    args = ["--labels", ",".join(LABELS), "--max-tokens", "16", "--rpm", "1200"]
    result = run_openai(box, src, tmp_path / "paced.parquet", *args)
    assert result.exit_code in (0, 1), result.output
    assert box.count(400) <= 2, (box.count(400), box.count())  # the later ones waited for the pace


def test_structured_on_stops_when_the_server_refuses_response_format(sandbox_factory, tmp_path: Path) -> None:
    """--structured on insists on constrained output: a refusal stops the run (exit 4) with one line
    naming what the server said and the fix; nothing is billed, every row stays pending, and the
    same command with --structured auto then finishes them."""
    src = reviews(tmp_path, 200)
    box = sandbox_factory(refuse_response_format=True)
    out, summary = tmp_path / "on.parquet", tmp_path / "s.json"
    args = ["--labels", ",".join(LABELS), "--max-tokens", "16", "--concurrency", "4"]
    result = run_openai(box, src, out, *args, "--structured", "on", "--summary-json", str(summary))
    assert result.exit_code == 4, result.output
    line = next(x for x in result.stderr.splitlines() if "refuses response_format" in x)
    assert "(HTTP 400: " in line and "which --structured on requires" in line
    assert (
        "--structured auto falls back to plain requests; --structured off never sends response_format" in line
    )
    assert "off for the rest of this run" not in result.stderr  # no quiet fallback
    assert 1 <= box.count(400) <= 4 and box.count() == box.count(400)  # the requests already out
    assert box.sandbox.stats["prompt_tokens"] == 0  # a 400 is not billed
    s = json.loads(summary.read_text())
    assert "maybe_billed" not in s and s["exit_code"] == 4
    assert set(pq.read_table(out, columns=["status"]).column("status").to_pylist()) == {"pending"}
    rerun = run_openai(box, src, out, *args, "--structured", "auto")
    assert rerun.exit_code in (0, 1), rerun.output
    assert "pending" not in pq.read_table(out, columns=["status"]).column("status").to_pylist()


def test_export_batch_writes_the_structured_request_a_run_sends(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(keep_bodies=True)
    src = reviews(tmp_path, 30)
    for extra in ([], ["--pack", "10"]):
        box.sandbox.bodies.clear()
        flags = ["--template", "Classify: {text}", "--provider", "openai", *MODEL, "--id-column", "id"]
        flags += ["--labels", ",".join(LABELS), *extra]
        out = tmp_path / f"o{len(extra)}.parquet"
        assert (
            run_cli(["run", str(src), "-o", str(out), "--rpm", "0", *flags], env=box.openai_env()).exit_code
            == 0
        )
        lines = tmp_path / f"b{len(extra)}.jsonl"
        assert run_cli(["export-batch", str(src), "-o", str(lines), *flags]).exit_code == 0
        exported = sorted(orjson.dumps(json.loads(x)["body"]) for x in lines.read_text().splitlines())
        assert exported == sorted(orjson.dumps(orjson.loads(b)) for b in box.sandbox.bodies)
        assert all(b"response_format" in b for b in exported)


def test_bad_structured_settings(sandbox, tmp_path: Path) -> None:
    src = reviews(tmp_path, 3)
    base = ["run", str(src), "-o", str(tmp_path / "o.parquet"), "--template", "{text}"]
    result = run_cli([*base, "--labels", "a,b", "--structured", "on"], env=sandbox.env())
    assert result.exit_code == 2
    assert "--structured on: the dataoorts API has no JSON mode" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = run_cli([*base, "--provider", "openai", "--structured", "on"], env=sandbox.openai_env())
    assert result.exit_code == 2 and "goes with --labels" in result.stderr
    job = tmp_path / "j.toml"
    job.write_text(f'input = "{src}"\noutput = "o.parquet"\ntemplate = "{{text}}"\nstructured = "maybe"\n')
    result = run_cli(["run", "--job", str(job)], env=sandbox.env())
    assert result.exit_code == 2 and "key 'structured'" in result.stderr and "auto, on, off" in result.stderr


def test_a_job_files_own_response_format_is_sent_as_it_is(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(keep_bodies=True)
    src = reviews(tmp_path, 5)
    job = tmp_path / "j.toml"
    job.write_text(
        f'input = "{src}"\noutput = "o.parquet"\ntemplate = "Classify: {{text}}"\nprovider = "openai"\n'
        f'labels = "{",".join(LABELS)}"\n[extra_body]\nresponse_format = {{ type = "json_object" }}\n'
    )
    result = run_cli(["run", "--job", str(job), *MODEL, "--rpm", "0"], env=box.openai_env())
    assert result.exit_code == 0, result.output
    assert [orjson.loads(b)["response_format"] for b in box.sandbox.bodies] == [{"type": "json_object"}] * 5
    result = run_cli(["run", "--job", str(job), "--structured", "on"], env=box.openai_env())
    assert result.exit_code == 2 and "[extra_body] has a response_format of its own" in result.stderr


def test_job_files_say_structured_as_a_word_or_a_boolean(tmp_path: Path) -> None:
    src = reviews(tmp_path, 3)
    base = {
        "input": str(src),
        "output": str(tmp_path / "o.parquet"),
        "template": "{text}",
        "provider": "openai",
    }
    labeled = {**base, "labels": "a,b"}
    assert build_job(labeled).structured_output  # auto, with the openai provider
    assert not build_job({**labeled, "structured": False}).structured_output
    assert build_job({**labeled, "structured": True}).structured == "on"
    assert not build_job({**labeled, "provider": "dataoorts"}).structured_output  # no JSON mode
    assert not build_job(base).structured_output  # nothing to hold a reply to


@pytest.mark.parametrize("structured", ["on", "off"])
def test_replies_longer_than_max_tokens_are_cut_as_a_server_cuts_them(
    sandbox_factory, tmp_path: Path, structured: str
) -> None:
    """A schema's answer (JSON, no spaces) longer than max_tokens: the sandbox cuts it there as a
    real server does (it sent it whole, marked truncated, and the row passed as ok), so the row
    is invalid, every request billed at most max_tokens, and the bill is the rows' cost."""
    box = sandbox_factory()
    src = reviews(tmp_path, 20)
    out = tmp_path / "o.parquet"
    args = ["--json-schema", str(SCHEMA), "--max-tokens", "8", "--structured", structured]
    result = run_openai(box, src, out, *args)
    assert result.exit_code == 1, result.output
    rows = pq.read_table(out).to_pylist()
    assert all(r["status"] == "invalid" and r["truncated"] for r in rows)
    stats = box.sandbox.stats
    assert stats["completion_tokens"] <= 8 * box.count()
    assert sum(r["completion_tokens"] for r in rows) == stats["completion_tokens"]


def test_eval_of_a_list_field_says_what_it_scores(sandbox_factory, tmp_path: Path) -> None:
    """`eval --field topics` (an array in the schema): one line saying eval scores enum, boolean
    or string fields; it printed labels like "['quality' 'price']"."""
    box = sandbox_factory()
    rows = [{"id": f"r{i}", "text": f"Review {i}: {WORDS[i % len(WORDS)]}", "gold": "x"} for i in range(10)]
    src = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "o.parquet"
    assert run_openai(box, src, out, "--json-schema", str(SCHEMA), "--max-tokens", "64").exit_code == 0
    result = run_cli(["eval", str(out), "--gold", "gold", "--field", "topics"])
    assert (
        result.exit_code == 2
        and "--field 'topics' is a list: eval scores an enum, boolean or string" in result.stderr
    )
    assert run_cli(["eval", str(out), "--gold", "gold", "--field", "sentiment"]).exit_code == 0
