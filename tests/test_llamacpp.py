"""batchllm against a real OpenAI-compatible server: llama.cpp serving SmolLM2-135M-Instruct
(tests/llamacpp.py), through the CLI, as the README's "any OpenAI-compatible server" invites.

What the server answered is taken from a pass-through in front of it (``Recorder``: every reply,
byte for byte, as batchllm received it) and checked against the server's own counters
(``/metrics``): each row's tokens are the server's ``usage``, each cost that usage at the prices
given, exactly. The model is small and slow on two threads (~40 tokens/s generated): few rows,
few tokens.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import signal
import sqlite3
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from batchllm.cli import cli
from batchllm.labeling.confidence import TOP

from .conftest import ROOT, prompts_csv, run_cli, spawn, summary_of, write_csv
from .llamacpp import LlamaServer, Recorder, llama_server, recorder  # noqa: F401 - the fixtures

pytestmark = pytest.mark.timeout(600)

# USD per million tokens: whole picodollars a token (150,000 and 600,000), so every cost is exact.
IN_PRICE, OUT_PRICE = Decimal("0.15"), Decimal("0.6")
LABELS = ("positive", "negative", "neutral")
SYSTEM = "You label product reviews by the sentiment of the reviewer."
TEMPLATE = "Review of {product} ({rating} stars):\n{review}\n\nSentiment:"
STRUCTURED = any(p.name == "structured" for p in cli.commands["run"].params)  # type: ignore[union-attr]
NO_STRUCTURED = (
    "needs `batchllm run --structured` (response_format from the label set or schema): not in this build"
)


def _run(src: Path, out: Path, endpoint: str, *more: str) -> list[str]:
    return ["run", str(src), "-o", str(out), "--provider", "openai", "--endpoint", endpoint,
            "--model", "smollm2", "--input-price", str(IN_PRICE), "--output-price", str(OUT_PRICE),
            "--temperature", "0", "--concurrency", "4", "--rpm", "0", "--progress", "none", *more]  # fmt: skip


def _reviews(tmp_path: Path, n: int) -> Path:
    with open(ROOT / "sample_data" / "reviews.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))[:n]
    return write_csv(tmp_path / "reviews.csv", rows)


def _labeling(src: Path, out: Path, endpoint: str, *more: str) -> list[str]:
    return [*_run(src, out, endpoint, "--id-column", "review_id", "--system", SYSTEM, "--template", TEMPLATE),
            *more]  # fmt: skip


def _usd(tokens_in: int, tokens_out: int) -> Decimal:
    return (tokens_in * IN_PRICE + tokens_out * OUT_PRICE) / 1_000_000


def _usage(reply: dict[str, Any]) -> tuple[int, int]:
    return reply["usage"]["prompt_tokens"], reply["usage"]["completion_tokens"]


def _per_review(
    replies: list[tuple[dict[str, Any], dict[str, Any]]], rows: list[dict[str, Any]]
) -> Counter[str]:
    """Each review's tokens over every request that asked about it (first answers, re-asks, packs
    share theirs out, so only totals are compared for them)."""
    tokens: Counter[str] = Counter()
    for asked, reply in replies:
        first_user = next(m["content"] for m in asked["messages"] if m["role"] == "user")
        about = [r["row_id"] for r in rows if r["review"] in first_user]
        assert len(about) == 1, first_user
        tokens[about[0] + ":prompt"] += _usage(reply)[0]
        tokens[about[0] + ":completion"] += _usage(reply)[1]
    return tokens


def test_each_row_is_what_the_server_answered_at_the_prices_given(
    llama_server: LlamaServer,  # noqa: F811
    recorder: Recorder,  # noqa: F811
    tmp_path: Path,
) -> None:
    src = prompts_csv(tmp_path / "in.csv", 6)
    out = tmp_path / "out.parquet"
    before = llama_server.metrics()
    result = run_cli(_run(src, out, recorder.base_url, "--max-tokens", "12"))
    assert result.exit_code == 0, result.output
    after = llama_server.metrics()
    replies = recorder.replies()
    assert len(replies) == 6  # each row asked once
    by_prompt = {asked["messages"][-1]["content"]: reply for asked, reply in replies}
    rows = pq.read_table(out).to_pylist()
    for row in rows:
        reply = by_prompt[row["prompt"]]
        assert row["status"] == "ok" and row["response"] == reply["choices"][0]["message"]["content"]
        assert (row["prompt_tokens"], row["completion_tokens"]) == _usage(reply)
        assert row["input_cost_usd"] == float(_usd(row["prompt_tokens"], 0))
        assert row["output_cost_usd"] == float(_usd(0, row["completion_tokens"]))
        assert row["cost_usd"] == float(_usd(row["prompt_tokens"], row["completion_tokens"]))
        # The model column keeps the name asked for (and priced); the server named its file.
        assert row["model"] == "smollm2" and row["served_model"] == reply["model"] == llama_server.model_path
    # The server's own count of what it generated agrees with the replies, and so the rows.
    generated = after["llamacpp:tokens_predicted_total"] - before["llamacpp:tokens_predicted_total"]
    assert generated == sum(r["completion_tokens"] for r in rows)
    summary = summary_of(out)
    assert Decimal(summary["cost_usd"]["total"]) == sum(_usd(*_usage(r)) for _, r in replies)
    assert summary["model"] == "smollm2"
    said = [w for w in summary["warnings"] if llama_server.model_path in w]
    assert len(said) == 1 and "'smollm2'" in said[0], summary["warnings"]
    assert result.output.count(llama_server.model_path) == 1, result.output


def test_labels_in_the_set_at_the_servers_tokens_per_review(
    llama_server: LlamaServer,  # noqa: F811
    recorder: Recorder,  # noqa: F811
    tmp_path: Path,
) -> None:
    src = _reviews(tmp_path, 12)
    out = tmp_path / "out.parquet"
    args = _labeling(
        src, out, recorder.base_url, "--labels", ",".join(LABELS), "--reask", "1", "--max-tokens", "16"
    )
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 12 and all(r["status"] == "ok" and r["label"] in LABELS for r in rows), [
        (r["row_id"], r["response"], r["label"]) for r in rows if r["label"] not in LABELS
    ]
    # A row's tokens: every request about its review (a re-ask too), as the server counted them.
    tokens = _per_review(recorder.replies(), rows)
    for r in rows:
        assert (r["prompt_tokens"], r["completion_tokens"]) == (
            tokens[r["row_id"] + ":prompt"],
            tokens[r["row_id"] + ":completion"],
        )
    assert Decimal(summary_of(out)["cost_usd"]["total"]) == sum(
        _usd(*_usage(reply)) for _, reply in recorder.replies()
    )


def test_packs_share_out_what_the_server_billed(
    llama_server: LlamaServer,  # noqa: F811
    recorder: Recorder,  # noqa: F811
    tmp_path: Path,
) -> None:
    src = _reviews(tmp_path, 8)
    out = tmp_path / "out.parquet"
    args = _labeling(src, out, recorder.base_url, "--labels", ",".join(LABELS), "--pack", "4", "--reask", "0",
                     "--max-tokens", "8")  # fmt: skip
    result = run_cli(args)
    assert result.exit_code in (0, 1), result.output  # 1: some rows invalid (a small model's packs)
    rows = pq.read_table(out).to_pylist()
    replies = recorder.replies()
    assert {r["status"] for r in rows} <= {"ok", "invalid"} and all(r["pack_id"] for r in rows)
    assert len({r["pack_id"] for r in rows}) <= len(replies)
    # Whatever the replies said, the rows' shares add up to what the server counted, exactly.
    assert sum(r["prompt_tokens"] for r in rows) == sum(_usage(x)[0] for _, x in replies)
    assert sum(r["completion_tokens"] for r in rows) == sum(_usage(x)[1] for _, x in replies)
    assert Decimal(summary_of(out)["cost_usd"]["total"]) == sum(_usd(*_usage(x)) for _, x in replies)


def _journaled(journal: Path) -> set[str]:
    with sqlite3.connect(f"file:{journal}?mode=ro", uri=True) as conn:
        return {r[0] for r in conn.execute("SELECT row_id FROM rows")}


def test_sigkill_mid_run_then_resume_sends_only_what_was_not_saved(
    llama_server: LlamaServer,  # noqa: F811
    recorder: Recorder,  # noqa: F811
    tmp_path: Path,
) -> None:
    src = prompts_csv(tmp_path / "in.csv", 16)
    out = tmp_path / "out.parquet"
    journal = Path(str(out) + ".batchllm") / "journal.sqlite"
    args = _run(src, out, recorder.base_url, "--max-tokens", "16", "--concurrency", "2")
    proc = spawn(args)
    deadline = time.monotonic() + 240
    saved: set[str] = set()
    while time.monotonic() < deadline and len(saved) < 4 and proc.poll() is None:
        time.sleep(0.1)
        with contextlib.suppress(sqlite3.Error):  # the journal mid-write
            saved = _journaled(journal) if journal.exists() else set()
    assert len(saved) >= 4 and proc.poll() is None, "the run never saved 4 rows while running"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    saved = _journaled(journal)
    assert 4 <= len(saved) < 16
    recorder.settle()  # the killed run's last requests are still computed: not the rerun's
    asked_before = len(recorder.replies())
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 16 and all(r["status"] == "ok" for r in rows)
    # The rerun asked only for the rows the killed run had not saved, each once.
    resent = [asked["messages"][-1]["content"] for asked, _ in recorder.replies()[asked_before:]]
    prompts = {r["row_id"]: r["prompt"] for r in rows}
    assert sorted(resent) == sorted(prompts[i] for i in prompts if i not in saved)
    last = {asked["messages"][-1]["content"]: reply for asked, reply in recorder.replies()}
    for r in rows:  # each row: the reply that was saved for it
        assert (r["prompt_tokens"], r["completion_tokens"]) == _usage(last[r["prompt"]])


def _schema(tmp_path: Path) -> Path:
    path = tmp_path / "fields.json"
    path.write_text(
        json.dumps(
            {
                "type": "object",
                "properties": {
                    "sentiment": {"type": "string", "enum": list(LABELS)},
                    "mentions_price": {"type": "boolean"},
                },
                "required": ["sentiment", "mentions_price"],
            }
        )
    )
    return path


@pytest.mark.skipif(not STRUCTURED, reason=NO_STRUCTURED)
def test_json_schema_answers_validate(
    llama_server: LlamaServer,  # noqa: F811
    recorder: Recorder,  # noqa: F811
    tmp_path: Path,
) -> None:
    src = _reviews(tmp_path, 24)
    out = tmp_path / "out.parquet"
    args = _labeling(src, out, recorder.base_url, "--json-schema", str(_schema(tmp_path)), "--reask", "0",
                     "--max-tokens", "40")  # fmt: skip
    result = run_cli(args)
    assert result.exit_code in (0, 1), result.output
    rows = pq.read_table(out).to_pylist()
    valid = [r for r in rows if r["status"] == "ok"]
    assert len(valid) >= 22, [(r["row_id"], r["response"]) for r in rows if r["status"] != "ok"]
    assert all(r["sentiment"] in LABELS and isinstance(r["mentions_price"], bool) for r in valid)
    assert all("response_format" in asked for asked, _ in recorder.replies())


@pytest.mark.skipif(not STRUCTURED, reason=NO_STRUCTURED)
def test_labels_in_packs_every_review_in_the_set(
    llama_server: LlamaServer,  # noqa: F811
    recorder: Recorder,  # noqa: F811
    tmp_path: Path,
) -> None:
    src = _reviews(tmp_path, 24)
    out = tmp_path / "out.parquet"
    args = _labeling(src, out, recorder.base_url, "--labels", ",".join(LABELS), "--pack", "4", "--reask", "1",
                     "--max-tokens", "8")  # fmt: skip
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    assert all(r["status"] == "ok" and r["label"] in LABELS for r in rows), [
        (r["row_id"], r["response"]) for r in rows if r["label"] not in LABELS
    ]
    replies = recorder.replies()
    assert all("response_format" in asked for asked, _ in replies)
    assert sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows) == sum(
        sum(_usage(x)) for _, x in replies
    )


def test_a_confidence_for_every_labeled_review(
    llama_server: LlamaServer,  # noqa: F811
    recorder: Recorder,  # noqa: F811
    tmp_path: Path,
) -> None:
    src = _reviews(tmp_path, 24)
    out = tmp_path / "out.parquet"
    args = _labeling(
        src, out, recorder.base_url, "--labels", ",".join(LABELS), "--reask", "1", "--max-tokens", "24"
    )
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    assert all(r["status"] == "ok" and 0 < r["confidence"] <= 1 for r in rows), [
        (r["row_id"], r["response"], r["confidence"]) for r in rows
    ]
    # Held to the label enum (--structured auto), the server reports each token's probability before
    # its grammar narrowed the choice; so each confidence is the label's probability among the
    # labels, at the token that wrote it (a reply held to the schema comes in a code fence there):
    # its share of the listed labels' mass, a label not listed counted at the list's floor.
    replies = recorder.replies()
    assert all(asked["logprobs"] is True and asked["top_logprobs"] == TOP for asked, _ in replies)
    raw = []
    for r in rows:
        if r["reasks"]:
            continue  # its kept answer is its re-ask's
        (reply,) = [reply for asked, reply in replies if r["review"] in asked["messages"][-1]["content"]]
        tokens = reply["choices"][0]["logprobs"]["content"]
        written = "".join(t["token"] for t in tokens)
        start = written.index(f'"{r["label"]}"') + 1
        ends = [sum(len(t["token"]) for t in tokens[: k + 1]) for k in range(len(tokens))]
        (at,) = [k for k, end in enumerate(ends) if end - len(tokens[k]["token"]) == start]
        token = tokens[at]
        assert token["token"] == r["label"]  # SmolLM2 writes each of these labels as one token
        top = {x["token"]: math.exp(x["logprob"]) for x in token["top_logprobs"]}
        others = [top.get(label, min(top.values())) for label in LABELS if label != r["label"]]
        p = math.exp(token["logprob"])
        assert r["confidence"] == pytest.approx(p / (p + sum(others)), rel=1e-3)
        raw.append(p)
    mean = sum(r["confidence"] for r in rows) / len(rows)
    print(f"mean confidence {mean:.3f} (the label token's own probability, as reported: "
          f"{sum(raw) / len(raw):.3f}, {min(raw):.3f} to {max(raw):.3f})")  # fmt: skip
    assert mean > 0.6  # three labels: a model choosing among them is surer than 1/3
    # Its reliability table against the reviews' human labels (printed: a small model's is poor).
    report = run_cli(["eval", str(out), "--gold", "human_label"])
    assert report.exit_code == 0 and "calibration of the confidence (24 rows)" in report.stdout
    print(report.stdout[report.stdout.index("calibration") :])


def test_max_cost_holds_on_the_real_server_and_a_higher_cap_finishes(
    llama_server: LlamaServer,  # noqa: F811
    recorder: Recorder,  # noqa: F811
    tmp_path: Path,
) -> None:
    """--max-cost against a real server, whose tokenizer and chat template are not batchllm's:
    what the server billed stays under the cap, the stop says so (exit 3), and the same command
    with a higher cap sends only the rows that were not answered."""
    src = prompts_csv(tmp_path / "in.csv", 12)
    out = tmp_path / "out.parquet"
    cap = Decimal("0.00006")  # a few rows' worth at 12 tokens a reply
    capped = run_cli(_run(src, out, recorder.base_url, "--max-tokens", "12", "--max-cost", str(cap)))
    assert capped.exit_code == 3 and "budget reached" in capped.output, capped.output
    first = recorder.replies()
    billed = sum(_usd(*_usage(r)) for _, r in first)
    assert 0 < billed <= cap and 0 < len(first) < 12, (billed, len(first))
    summary = summary_of(out)
    assert Decimal(summary["cost_usd"]["total"]) == billed
    if summary["tokens"].get("cached"):  # llama.cpp reuses a slot's prefix; no cached price was given
        assert "no discount at these prices (--cached-input-price sets one)" in capped.output
    answered = {r["prompt"] for r in pq.read_table(out).to_pylist() if r["status"] == "ok"}
    assert answered == {asked["messages"][-1]["content"] for asked, _ in first}

    done = run_cli(_run(src, out, recorder.base_url, "--max-tokens", "12", "--max-cost", "1"))
    assert done.exit_code == 0, done.output
    again = [asked["messages"][-1]["content"] for asked, _ in recorder.replies()[len(first) :]]
    assert sorted(again + sorted(answered)) == sorted(r["prompt"] for r in pq.read_table(out).to_pylist())
    assert Decimal(summary_of(out)["cost_usd"]["total"]) == sum(
        _usd(*_usage(r)) for _, r in recorder.replies()
    )
