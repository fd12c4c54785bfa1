"""A labeling row's confidence (--confidence): from the reply's logprobs, against the sandbox's
OpenAI face, whose logprobs track whether its answer is right; calibration in eval; review by
confidence; samples asked only where the first answer is unsure (--vote-below)."""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest

from batchllm.labeling.confidence import TOP, joint, of_pack, of_reply, value_span
from batchllm.labeling.spec import Labeling, load_schema
from batchllm.sandbox.labeler import truth

from .conftest import ROOT, run_cli, spawn, write_csv
from .test_openai_batch import answer_batch
from .test_review import _studio_export

LABELS = ["positive", "negative", "neutral"]
WORDS = ["love it", "broke after a week", "it's okay", "great value", "disappointed", "works well", "meh"]
SCHEMA = ROOT / "sample_data" / "review_fields.json"
MODEL = ["--model", "meta-llama/Llama-3.1-70B-Instruct", "--input-price", "0.31", "--output-price", "0.34"]
TEMPLATE = "Classify: {text}"


def reviews(tmp_path: Path, n: int) -> Path:
    """``n`` distinct reviews, each with the sandbox's true label as ``gold``."""
    rows = []
    for i in range(n):
        text = f"Review {i}: {WORDS[i % len(WORDS)]}"
        rows.append({"id": f"r{i}", "text": text, "gold": truth(TEMPLATE.format(text=text), LABELS)})
    return write_csv(tmp_path / "in.csv", rows)


def run_openai(box, src: Path, out: Path, *extra: str):
    args = ["run", str(src), "-o", str(out), "--template", TEMPLATE, "--provider", "openai"]
    args += [*MODEL, "--rpm", "0", "--id-column", "id", "--cache", "off", "--concurrency", "32", *extra]
    return run_cli(args, env=box.openai_env())


def kill_and_resume(box, args: list[str], after: int, total: int) -> None:
    """Start the run, SIGKILL it once the sandbox has answered ``after`` of the ``total``
    requests the whole run takes (before it ended), and run it again."""
    proc = spawn(args, env=box.openai_env())
    deadline = time.monotonic() + 60
    while box.count() < after and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    assert box.count() < total  # killed mid-run
    result = run_cli(args, env=box.openai_env())
    assert result.exit_code in (0, 1), result.output


def tokens(*pieces: tuple[str, float]) -> list[dict[str, object]]:
    return [{"token": t, "logprob": lp} for t, lp in pieces]


def test_the_value_tokens_joint_probability() -> None:
    labels = Labeling(labels=tuple(LABELS), confidence="logprobs")
    bare = tokens(("pos", math.log(0.5)), ("itive", math.log(0.8)))
    assert of_reply(labels, "positive", False, bare) == pytest.approx(0.4)
    structured = tokens(
        ('{"', 0.0), ("label", -0.01), ('":"', 0.0), ("neg", math.log(0.9)), ("ative", 0.0), ('"}', -3)
    )
    assert of_reply(labels, '{"label":"negative"}', False, structured) == pytest.approx(0.9)
    prose = tokens(("The label is ", -2.0), ("**", 0.0), ("Neutral", math.log(0.7)), ("**.", -1.0))
    assert of_reply(labels, "The label is **Neutral**.", False, prose) == pytest.approx(0.7)
    assert of_reply(labels, "mixed", False, tokens(("mixed", -0.1))) is None  # no label: none
    # A pack: each item's own tokens, found under its own key.
    text = '{"1":"positive","2":"neutral"}'
    at = text.index("neutral")
    packed = [{"token": c, "logprob": -0.1 if at <= i < at + 7 else 0.0} for i, c in enumerate(text)]
    sure = of_pack(labels, text, ["positive", "neutral"], packed)
    assert sure[0] == pytest.approx(1.0) and sure[1] == pytest.approx(math.exp(-0.7))
    # A schema: each enum or boolean field's value.
    raw, fields, required = load_schema(SCHEMA)
    schema = Labeling(fields=fields, required=required, schema=raw, confidence="logprobs")
    reply = '{"sentiment": "negative", "mentions_price": true, "stars_guess": 2}'
    at = value_span(reply, "sentiment")
    assert at is not None and reply[at[0] : at[1]] == "negative"
    yes = reply.index("true")
    each = [{"token": c, "logprob": -0.05 if i in range(*at) else -0.2 if yes <= i < yes + 4 else 0.0}
            for i, c in enumerate(reply)]  # fmt: skip
    got = of_reply(schema, reply, False, each)
    assert got["sentiment"] == pytest.approx(math.exp(-0.05 * 8))
    assert got["mentions_price"] == pytest.approx(math.exp(-0.8))
    assert set(got) == {f.name for f in fields if f.scored}
    assert joint([{"token": "x"}], 0, 1) is None  # a token without its logprob: no confidence
    # llama.cpp holding a reply to a schema writes it in a fence and returns the object alone.
    fenced = tokens(("```", -9.0), ("json", -5.0), ("\n", 0.0), ('{"', 0.0), ("label", -3.0), ('": "', 0.0),
                    ("positive", math.log(0.2)), ('"}', -2.0), ("\n", 0.0), ("```", 0.0))  # fmt: skip
    assert of_reply(labels, '{"label": "positive"}', False, fenced) == pytest.approx(0.2)
    assert of_reply(labels, "neutral", False, tokens(("something else", -0.1))) is None


def listed(token: str, p: float, *alternatives: tuple[str, float]) -> dict[str, object]:
    """A token with its ``top_logprobs`` (itself and the alternatives, probabilities given)."""
    top = [
        {"token": t, "logprob": math.log(q)}
        for t, q in sorted([(token, p), *alternatives], key=lambda x: -x[1])
    ]
    return {"token": token, "logprob": math.log(p), "top_logprobs": top}


def test_held_to_a_schema_a_value_is_weighed_among_the_allowed_ones() -> None:
    labels = Labeling(labels=tuple(LABELS), confidence="logprobs")
    # llama.cpp (SmolLM2-135M) held to {"label": enum}: each token's probability before the grammar
    # narrowed it (the fence, the forced closing quote; "Positive" is not in the enum), top 5.
    text = '{\n  "label": "positive"\n}'
    reply = [
        listed("```", 0.0002, ("positive", 0.19), ("negative", 0.08)),
        listed("json", 0.02, ("\n", 0.63)),
        *tokens(("\n", 0.0), ("{", 0.0), ("\n ", -0.2)),
        listed(' "', 0.9654, (" {", 0.0081), (' "[', 0.0078)),
        listed("label", 0.0066, ("type", 0.37)),
        listed('":', 0.98),
        listed(' "', 0.97, (" {", 0.008)),
        listed(
            "positive",
            0.4778,
            ("Positive", 0.2985),
            ("negative", 0.0127),
            ("Negative", 0.0115),
            ("Sent", 0.0097),
        ),
        listed('"', 0.0046, ('",', 0.9671), (",", 0.009)),
        *tokens(("\n", -0.05), ("}", 0.0)),
    ]
    assert of_reply(labels, text, False, reply) == pytest.approx(0.4778)  # not held: as written
    # Held: among the labels. "neutral" is not listed: at most the list's floor (0.0097).
    assert of_reply(labels, text, False, reply, True) == pytest.approx(0.4778 / (0.4778 + 0.0127 + 0.0097))
    # A server that lists only what the schema allows (masked) gives its own figure back.
    masked = [*tokens(('{"label":', 0.0)), listed('"', 1.0),
              listed("negative", 0.9, ("positive", 0.07), ("neutral", 0.03)), listed('"}', 1.0)]  # fmt: skip
    assert of_reply(labels, '{"label":"negative"}', False, masked, True) == pytest.approx(0.9)
    # Labels that share their first characters part ways later: weighed where they do.
    split = [*tokens(('{"label":', 0.0)), listed('"', 1.0), listed("ne", 0.5, ("pos", 0.1), ("Ne", 0.3)),
             listed("g", 0.4, ("ut", 0.2), ("w", 0.3)), listed("ative", 0.01, ("ated", 0.9)), listed('"}', 0.5)]  # fmt: skip
    expected = 0.5 / (0.5 + 0.1) * 0.4 / (0.4 + 0.2)
    assert of_reply(labels, '{"label":"negative"}', False, split, True) == pytest.approx(expected)
    # No alternatives listed (a server that ignores top_logprobs): the tokens' joint probability.
    bare = [{**t, "top_logprobs": []} for t in reply]
    assert of_reply(labels, text, False, bare, True) == pytest.approx(0.4778)
    # A pack's items and a schema's enum and boolean fields alike.
    pack = [*tokens(('{"1":', 0.0)), listed('"', 1.0), listed("neutral", 0.3, ("Neutral", 0.5), ("negative", 0.1), ("positive", 0.05)),
            listed('","2":', 1.0), listed("positive", 0.6), listed('"}', 1.0)]  # fmt: skip
    got = of_pack(labels, '{"1":"neutral","2":"positive"}', ["neutral", "positive"], pack, True)
    # "2" alone in its list: the two labels not listed have at most what is left (0.4) between them.
    assert got == pytest.approx([0.3 / (0.3 + 0.1 + 0.05), 0.6 / (0.6 + 0.4)])
    raw, fields, required = load_schema(SCHEMA)
    schema = Labeling(fields=fields, required=required, schema=raw, confidence="logprobs")
    fielded = [*tokens(('{"sentiment":', 0.0)), listed(' "', 0.9, (' null', 0.05)),
               listed("negative", 0.2, ("Negative", 0.6), ("positive", 0.05), ("neutral", 0.05)),
               listed('", "mentions_price":', 1.0), listed(" true", 0.3, (" True", 0.5), (" false", 0.1)),
               listed("}", 1.0)]  # fmt: skip
    reply_text = '{"sentiment": "negative", "mentions_price": true}'
    got = of_reply(schema, reply_text, False, fielded, True)
    assert got["sentiment"] == pytest.approx(0.2 / 0.3)  # required: null is not one of its values
    assert got["mentions_price"] == pytest.approx(0.3 / 0.4)


def test_600_rows_with_a_quarter_wrong_get_a_confidence_that_tracks_the_truth(
    sandbox_factory, tmp_path: Path
) -> None:
    box = sandbox_factory(label_wrong=0.25, keep_bodies=True)
    src = reviews(tmp_path, 600)
    out = tmp_path / "out.parquet"
    result = run_openai(box, src, out, "--labels", ",".join(LABELS))
    assert result.exit_code == 0, result.output
    assert all(orjson.loads(b)["logprobs"] is True for b in box.sandbox.bodies)  # asked by default
    rows = pq.read_table(out).to_pylist()
    scored = [r for r in rows if r["confidence"] is not None]
    assert len(scored) >= 0.95 * len(rows)
    right = [r["confidence"] for r in scored if r["label"] == r["gold"]]
    wrong = [r["confidence"] for r in scored if r["label"] != r["gold"]]
    assert 100 < len(wrong) < 200  # a quarter wrong
    gap = sum(right) / len(right) - sum(wrong) / len(wrong)
    print(f"{len(scored)} of {len(rows)} rows with a confidence; right {sum(right) / len(right):.3f}, "
          f"wrong {sum(wrong) / len(wrong):.3f}")  # fmt: skip
    assert gap >= 0.15, gap
    # eval's calibration is what the column says, computed here on its own: 10 equal-width bins.
    report = run_cli(["eval", str(out), "--gold", "gold", "--format", "json"])
    assert report.exit_code == 0, report.output
    e = json.loads(report.stdout)
    pairs = [(r["confidence"], r["status"] == "ok" and r["label"] == r["gold"]) for r in scored]
    ece = _ece(pairs)
    bins: dict[int, int] = {}
    for c, _ in pairs:
        bins[min(int(c * 10), 9)] = bins.get(min(int(c * 10), 9), 0) + 1
    assert e["ece"] == pytest.approx(ece, abs=1e-12)
    assert [b["rows"] for b in e["reliability"]] == [bins[k] for k in sorted(bins)]
    surest = sorted(pairs, key=lambda p: -p[0])[: math.ceil(0.8 * len(pairs))]
    at80 = e["accuracy_at_coverage"]["0.8"]
    assert at80["rows"] == len(surest) == 0.8 * len(pairs)
    assert at80["accuracy"] == pytest.approx(sum(ok for _, ok in surest) / len(surest), abs=1e-12)
    assert set(e["accuracy_at_coverage"]) == {"0.5", "0.8", "0.9", "1.0"}
    assert e["accuracy_at_coverage"]["1.0"]["accuracy"] < at80["accuracy"]  # the surest are righter
    print(f"ECE {e['ece']:.3f}; accuracy at coverage {e['accuracy_at_coverage']}")
    text = run_cli(["eval", str(out), "--gold", "gold"]).stdout
    assert f"ECE {ece:.3f}" in text and "most confident 80%" in text
    md = run_cli(["eval", str(out), "--gold", "gold", "--format", "markdown"]).stdout
    assert "| confidence | rows | mean confidence | accuracy |" in md
    page = tmp_path / "report.html"
    shown = run_cli(["report", str(out), "--html", str(page), "--gold", "gold"])
    assert shown.exit_code == 0, shown.output
    assert f"Reliability: accuracy by confidence (against gold), ECE {ece:.3f}" in page.read_text()
    # --confidence off: no logprobs asked, no column.
    box.sandbox.bodies.clear()
    off = run_openai(box, src, tmp_path / "off.parquet", "--labels", ",".join(LABELS), "--confidence", "off")
    assert off.exit_code == 0, off.output
    assert all("logprobs" not in orjson.loads(b) for b in box.sandbox.bodies)
    assert "confidence" not in pq.read_schema(tmp_path / "off.parquet").names


def test_a_server_refusing_logprobs_warns_once_and_the_run_goes_on(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(label_wrong=0.25, refuse_logprobs=True)
    src = reviews(tmp_path, 60)
    out = tmp_path / "out.parquet"
    result = run_openai(box, src, out, "--labels", ",".join(LABELS), "--structured", "off")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("refuses logprobs") == 1
    rows = pq.read_table(out).to_pylist()
    assert all(r["status"] == "ok" for r in rows) and all(r["confidence"] is None for r in rows)
    assert box.count(200) == 60  # every row answered once; only refusals came before
    # With samples: the winning label's share of the votes instead.
    result = run_openai(box, src, tmp_path / "votes.parquet", "--labels", ",".join(LABELS), "--samples", "3")
    assert result.exit_code in (0, 1), result.output  # 1: a few rows with no majority
    rows = pq.read_table(tmp_path / "votes.parquet").to_pylist()
    assert all(r["confidence"] == r["agreement"] for r in rows if r["status"] == "ok")


def test_confidence_logprobs_stops_when_the_server_refuses_them(sandbox_factory, tmp_path: Path) -> None:
    """--confidence logprobs (asked, not auto) insists on them: a refusal stops the run (exit 4) with
    one line naming the field and the way on; nothing billed, rows pending; auto then finishes them."""
    box = sandbox_factory(refuse_logprobs=True)
    src = reviews(tmp_path, 60)
    out, summary = tmp_path / "out.parquet", tmp_path / "s.json"
    args = ["--labels", ",".join(LABELS), "--structured", "off", "--concurrency", "4"]
    result = run_openai(box, src, out, *args, "--confidence", "logprobs", "--summary-json", str(summary))
    assert result.exit_code == 4, result.output
    line = next(x for x in result.stderr.splitlines() if "refuses logprobs" in x)
    assert "(HTTP 400: " in line and "which --confidence logprobs requires" in line
    assert "use --confidence auto to go on without it" in line
    assert "off for the rest of this run" not in result.stderr  # no quiet fallback
    assert 1 <= box.count(400) <= 4 and box.count() == box.count(400)  # the requests already out
    assert box.sandbox.stats["prompt_tokens"] == 0  # a 400 is not billed
    s = json.loads(summary.read_text())
    assert "maybe_billed" not in s and s["exit_code"] == 4
    assert set(pq.read_table(out, columns=["status"]).column("status").to_pylist()) == {"pending"}
    rerun = run_openai(box, src, out, *args, "--confidence", "auto")
    assert rerun.exit_code == 0, rerun.output
    assert rerun.stderr.count("refuses logprobs") == 1  # auto: its one warning, and on
    assert set(pq.read_table(out, columns=["status"]).column("status").to_pylist()) == {"ok"}


def test_dataoorts_votes_and_usage_errors(sandbox, tmp_path: Path) -> None:
    src = reviews(tmp_path, 20)
    base = ["run", str(src), "-o", str(tmp_path / "d.parquet"), "--template", TEMPLATE, "--rpm", "0"]
    base += ["--id-column", "id", "--labels", ",".join(LABELS), "--cache", "off"]
    result = run_cli([*base, "--samples", "3"], env=sandbox.env())
    assert result.exit_code in (0, 1), result.output  # 1: a few rows with no majority
    rows = pq.read_table(tmp_path / "d.parquet").to_pylist()
    assert all(r["confidence"] == r["agreement"] for r in rows)
    assert any(r["confidence"] is not None for r in rows)
    bad = run_cli([*base, "--confidence", "logprobs"], env=sandbox.env())
    assert bad.exit_code == 2 and "returns no logprobs" in bad.output
    bad = run_cli([*base, "--vote-below", "0.8"], env=sandbox.env())
    assert bad.exit_code == 2 and "--samples 2 or more" in bad.output


def test_packs_and_schemas_get_their_own_confidences(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(label_wrong=0.25)
    src = reviews(tmp_path, 100)
    out = tmp_path / "pack.parquet"
    result = run_openai(box, src, out, "--labels", ",".join(LABELS), "--pack", "5", "--max-tokens", "8")
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    scored = [r for r in rows if r["confidence"] is not None]
    assert len(scored) >= 90
    right = [r["confidence"] for r in scored if r["label"] == r["gold"]]
    wrong = [r["confidence"] for r in scored if r["label"] != r["gold"]]
    assert wrong and sum(right) / len(right) > sum(wrong) / len(wrong) + 0.1
    out = tmp_path / "schema.parquet"
    result = run_openai(box, src, out, "--json-schema", str(SCHEMA))
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    names = [n for n in table.column_names if n.startswith("confidence_")]
    assert names == ["confidence_sentiment", "confidence_mentions_price"]
    assert all(0 < x <= 1 for n in names for x in table.column(n).to_pylist() if x is not None)
    assert sum(x is not None for x in table.column(names[0]).to_pylist()) >= 95


def test_held_to_a_schema_the_confidence_reads_as_it_does_unheld(sandbox_factory, tmp_path: Path) -> None:
    # The sandbox held to a schema reports what llama.cpp does: probabilities before the grammar,
    # much of the label's first token's on a form the enum forbids (sandbox/logprobs.py).
    box = sandbox_factory(label_wrong=0.25, keep_bodies=True)
    src = reviews(tmp_path, 300)

    def mean(path: Path, column: str) -> float:
        found = [x for x in pq.read_table(path).column(column).to_pylist() if x is not None]
        assert len(found) >= 280
        return sum(found) / len(found)

    for n, how in enumerate((["--labels", ",".join(LABELS)], ["--labels", ",".join(LABELS), "--pack", "5"],
                             ["--json-schema", str(SCHEMA)])):  # fmt: skip
        column = "confidence" if how[0] == "--labels" else "confidence_sentiment"
        box.sandbox.bodies.clear()
        held, free = tmp_path / f"held{n}.parquet", tmp_path / f"free{n}.parquet"
        assert run_openai(box, src, held, *how, "--max-tokens", "64").exit_code == 0
        bodies = [orjson.loads(b) for b in box.sandbox.bodies]
        assert all(
            "response_format" in b and b["logprobs"] is True and b["top_logprobs"] == TOP for b in bodies
        )
        box.sandbox.bodies.clear()
        assert run_openai(box, src, free, *how, "--max-tokens", "64", "--structured", "off").exit_code == 0
        assert all("top_logprobs" not in orjson.loads(b) for b in box.sandbox.bodies)  # only held
        print(how, f"held {mean(held, column):.3f}, free {mean(free, column):.3f}")
        assert mean(held, column) == pytest.approx(mean(free, column), abs=0.04)
        if how[0] == "--labels":
            rows = [r for r in pq.read_table(held).to_pylist() if r["confidence"] is not None]
            assert _ece([(r["confidence"], r["label"] == r["gold"]) for r in rows]) < 0.08
    # --vote-below votes on the unsure rows, not on every row.
    before = box.count()
    args = ["--labels", ",".join(LABELS), "--samples", "3", "--vote-below", "0.8"]
    assert run_openai(box, src, tmp_path / "votes.parquet", *args).exit_code in (0, 1)
    assert 300 < box.count() - before < 2 * 300


def test_a_server_refusing_the_schema_or_logprobs_is_asked_without_their_alternatives(
    sandbox_factory, tmp_path: Path
) -> None:
    src = reviews(tmp_path, 40)
    for refuse in ("refuse_response_format", "refuse_logprobs"):
        box = sandbox_factory(label_wrong=0.25, keep_bodies=True, **{refuse: True})
        out = tmp_path / f"{refuse}.parquet"
        result = run_openai(box, src, out, "--labels", ",".join(LABELS), "--concurrency", "1")
        assert result.exit_code == 0, result.output
        bodies = [orjson.loads(b) for b in box.sandbox.bodies]
        assert "top_logprobs" in bodies[0] and all("top_logprobs" not in b for b in bodies[2:])
        rows = pq.read_table(out).to_pylist()
        assert all(r["status"] == "ok" for r in rows)
        scored = [r["confidence"] for r in rows if r["confidence"] is not None]
        assert len(scored) == (0 if refuse == "refuse_logprobs" else len(rows))


def _ece(pairs: list[tuple[float, bool]]) -> float:
    bins: dict[int, list[tuple[float, bool]]] = {}
    for c, ok in pairs:
        bins.setdefault(min(int(c * 10), 9), []).append((c, ok))
    return sum(
        len(b) / len(pairs) * abs(sum(ok for _, ok in b) / len(b) - sum(c for c, _ in b) / len(b))
        for b in bins.values()
    )


def test_review_picks_the_least_confident_and_eval_calibrates_on_verdicts(
    sandbox_factory, tmp_path: Path
) -> None:
    box = sandbox_factory(label_wrong=0.25)
    src = reviews(tmp_path, 300)
    out = tmp_path / "out.parquet"
    assert run_openai(box, src, out, "--labels", ",".join(LABELS)).exit_code == 0
    rows = pq.read_table(out).to_pylist()
    tasks_file = tmp_path / "tasks.json"
    result = run_cli(["review", "export", str(out), "--pick", "uncertain:30", "-o", str(tasks_file)])
    assert result.exit_code == 0, result.output
    tasks = json.loads(tasks_file.read_text())
    least = sorted((r for r in rows if r["confidence"] is not None), key=lambda r: r["confidence"])[:30]
    assert {t["data"]["row_id"] for t in tasks} == {r["row_id"] for r in least}
    assert all(t["data"]["pick"].startswith("uncertain: confidence 0.") for t in tasks)
    by_id = {r["row_id"]: r for r in rows}
    assert all(t["predictions"][0]["score"] == by_id[t["data"]["row_id"]]["confidence"] for t in tasks)
    # below:P:N: a sample of the rows under P.
    result = run_cli(["review", "export", str(out), "--pick", "below:0.6:20", "-o", str(tasks_file)])
    assert result.exit_code == 0, result.output
    picked = [by_id[t["data"]["row_id"]] for t in json.loads(tasks_file.read_text())]
    assert len(picked) == 20 and all(r["confidence"] < 0.6 for r in picked)
    bad = run_cli(["review", "export", str(out), "--pick", "below:1.5:20", "-o", str(tasks_file)])
    assert bad.exit_code == 2 and "give a confidence from 0 to 1" in bad.output
    # Verdicts on 120 random picks (the true labels): eval --gold review calibrates on them.
    result = run_cli(["review", "export", str(out), "--pick", "random:120", "-o", str(tasks_file)])
    tasks = json.loads(tasks_file.read_text())
    verdicts: dict[str, str | None] = {t["data"]["row_id"]: by_id[t["data"]["row_id"]]["gold"] for t in tasks}
    export = tmp_path / "export.json"
    export.write_text(json.dumps(_studio_export(tasks, verdicts, cancelled=set())))
    assert run_cli(["review", "import", str(out), "--from", str(export)]).exit_code == 0
    e = json.loads(run_cli(["eval", str(out), "--gold", "review", "--format", "json"]).stdout)
    pairs = [(by_id[r]["confidence"], by_id[r]["label"] == g) for r, g in verdicts.items()]
    assert e["calibrated_rows"] == 120 and e["ece"] == pytest.approx(_ece(pairs), abs=1e-12)


def test_votes_only_where_the_first_answer_is_unsure(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(label_wrong=0.25)
    n = 600
    src = reviews(tmp_path, n)
    labels = ["--labels", ",".join(LABELS), "--seed", "1"]  # the first sample's request is --seed 1's
    first = tmp_path / "first.parquet"
    assert run_openai(box, src, first, *labels).exit_code == 0
    unsure = sum(r["confidence"] is None or r["confidence"] < 0.8 for r in pq.read_table(first).to_pylist())
    assert 0.2 * n < unsure < 0.7 * n
    before = box.count()
    some = tmp_path / "some.parquet"
    result = run_openai(box, src, some, *labels, "--samples", "3", "--vote-below", "0.8")
    assert result.exit_code in (0, 1), result.output
    some_requests = box.count() - before
    assert some_requests == n + 2 * unsure
    before = box.count()
    every = tmp_path / "every.parquet"
    result = run_openai(box, src, every, *labels, "--samples", "3")
    assert result.exit_code in (0, 1), result.output
    every_requests = box.count() - before
    assert every_requests == 3 * n

    def accuracy(path: Path) -> float:
        rows = pq.read_table(path).to_pylist()
        return sum(r["status"] == "ok" and r["label"] == r["gold"] for r in rows) / len(rows)

    print(
        f"first answer alone: {accuracy(first):.1%} ({n} requests); --samples 3 --vote-below 0.8: "
        f"{accuracy(some):.1%} ({some_requests} requests, {unsure} rows voted); --samples 3: "
        f"{accuracy(every):.1%} ({every_requests} requests)"
    )
    assert accuracy(some) >= accuracy(every) > accuracy(first)
    rows = pq.read_table(some).to_pylist()
    voted = [r for r in rows if sum(dict(r["label_votes"] or []).values()) > 1]
    assert len(voted) == unsure
    # --adaptive too: a voting row stops once two samples agree.
    before = box.count()
    args = ["--samples", "3", "--vote-below", "0.8", "--adaptive"]
    result = run_openai(box, src, tmp_path / "adaptive.parquet", *labels, *args)
    assert result.exit_code in (0, 1), result.output
    assert n + unsure < box.count() - before < some_requests


def test_a_pilot_projects_the_rows_that_will_vote(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(label_wrong=0.25)
    n = 600
    src = reviews(tmp_path, n)
    out = tmp_path / "out.parquet"
    args = ["--template", TEMPLATE, "--provider", "openai", *MODEL, "--rpm", "0", "--id-column", "id"]
    args += ["--labels", ",".join(LABELS), "--samples", "3", "--vote-below", "0.8", "--cache", "off"]
    result = run_cli(["estimate", str(src), "-o", str(out), "--pilot", "100", *args, "--format", "json"],
                     env=box.openai_env())  # fmt: skip
    assert result.exit_code == 0, result.output
    votes = json.loads(result.stdout)["votes"]
    assert votes["pilot_rows"] == 100 and box.count() == 100 + 2 * votes["pilot_voted"]
    assert votes["projected_rows"] == round(votes["pilot_voted"] / 100 * n)
    assert votes["projected_extra_requests"] == 2 * votes["projected_rows"]
    text = run_cli(["estimate", str(src), "-o", str(out), *args], env=box.openai_env()).stdout
    assert "rows that will vote (first answer below 0.8)" in text
    result = run_cli(["run", str(src), "-o", str(out), *args], env=box.openai_env())
    assert result.exit_code in (0, 1), result.output
    rows = pq.read_table(out).to_pylist()
    voted = sum(sum(dict(r["label_votes"] or []).values()) > 1 for r in rows)
    assert abs(voted - votes["projected_rows"]) < 0.12 * n  # a pilot of 100 rows: within its error


def test_a_pilot_the_cache_answers_projects_the_votes_the_paid_one_did(
    sandbox_factory, tmp_path: Path
) -> None:
    """--samples 3 --vote-below 0.8: the same pilot into a second output is answered from the
    cache, and projects the same requests a row and cost (each voted row's cached samples are
    its requests, not rows of their own: it said 1 request a row, at half the cost)."""
    box = sandbox_factory(label_wrong=0.25)
    src = reviews(tmp_path, 200)
    args = ["--template", TEMPLATE, "--provider", "openai", *MODEL, "--rpm", "0", "--id-column", "id",
            "--labels", ",".join(LABELS), "--samples", "3", "--vote-below", "0.8", "--temperature", "0"]  # fmt: skip
    said = []
    for name in ("paid", "cached"):
        result = run_cli(["estimate", str(src), "-o", str(tmp_path / f"{name}.parquet"), "--pilot", "50", *args,
                          "--format", "json"], env=box.openai_env())  # fmt: skip
        assert result.exit_code == 0, result.output
        said.append(json.loads(result.stdout))
        if name == "paid":
            sent = box.count()
    assert box.count() == sent  # the second pilot sent nothing
    paid, cached = said
    assert paid["requests"]["expected_per_row"] > 1.1, paid["requests"]
    assert cached["requests"]["expected_per_row"] == pytest.approx(
        paid["requests"]["expected_per_row"], rel=0.01
    )
    expected = [float(x["cost_usd"]["expected"]) for x in said]
    assert expected[1] == pytest.approx(expected[0], rel=0.05), expected


def test_sigkill_while_voting_resumes_to_the_same_votes(sandbox_factory, tmp_path: Path) -> None:
    n = 300
    src = reviews(tmp_path, n)
    labels = ["--labels", ",".join(LABELS), "--samples", "3", "--vote-below", "0.8", "--concurrency", "8"]
    reference = sandbox_factory(label_wrong=0.25)
    assert run_openai(reference, src, tmp_path / "ref.parquet", *labels).exit_code in (0, 1)
    expected_requests = reference.count()
    box = sandbox_factory(label_wrong=0.25, latency=0.05)
    out = tmp_path / "o.parquet"
    args = ["run", str(src), "-o", str(out), "--template", TEMPLATE, "--provider", "openai", *MODEL]
    args += ["--rpm", "0", "--id-column", "id", "--cache", "off", *labels]
    kill_and_resume(box, args, expected_requests // 3, expected_requests)
    done, ref = pq.read_table(out).to_pylist(), pq.read_table(tmp_path / "ref.parquet").to_pylist()
    keys = ("id", "label", "label_votes", "status", "cost_usd")
    assert [{k: r[k] for k in keys} for r in done] == [{k: r[k] for k in keys} for r in ref]
    # A row whose first answer was journaled had gone on to vote; only requests in flight at the
    # kill (at most --concurrency) were sent again.
    assert expected_requests <= box.count() <= expected_requests + 8
    assert sum(r["confidence"] is not None for r in done) == n - sum(r["status"] != "ok" for r in done)


def test_an_overconfident_sandbox_shows_in_the_calibration(sandbox_factory, tmp_path: Path) -> None:
    src = reviews(tmp_path, 300)
    ece = {}
    for over in (0.0, 0.7):
        box = sandbox_factory(label_wrong=0.25, overconfident=over)
        out = tmp_path / f"over-{over}.parquet"
        assert run_openai(box, src, out, "--labels", ",".join(LABELS)).exit_code == 0
        e = json.loads(run_cli(["eval", str(out), "--gold", "gold", "--format", "json"]).stdout)
        ece[over] = e["ece"]
        rows = pq.read_table(out).to_pylist()
        assert e["ece"] == pytest.approx(_ece([(r["confidence"], r["label"] == r["gold"]) for r in rows]))
    print(f"ECE calibrated {ece[0.0]:.3f}, overconfident 0.7 {ece[0.7]:.3f}")
    assert ece[0.0] < 0.1 < 0.2 < ece[0.7]  # calibrated, then sure of a quarter wrong answers


def test_an_imported_batch_keeps_the_confidence_of_its_lines(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(label_wrong=0.25)
    src = reviews(tmp_path, 50)
    job = ["--template", TEMPLATE, "--provider", "openai", *MODEL, "--id-column", "id"]
    job += ["--labels", ",".join(LABELS)]
    requests, results, errors = tmp_path / "req.jsonl", tmp_path / "res.jsonl", tmp_path / "err.jsonl"
    assert run_cli(["export-batch", str(src), *job, "-o", str(requests)]).exit_code == 0
    assert all(json.loads(line)["body"]["logprobs"] is True for line in requests.read_text().splitlines())
    answer_batch(box, requests, results, errors)
    out = tmp_path / "imported.parquet"
    result = run_cli(["import-batch", str(results), str(errors), "--input", str(src), *job, "-o", str(out)])
    assert result.exit_code == 0, result.output
    live = tmp_path / "live.parquet"
    assert run_openai(box, src, live, "--labels", ",".join(LABELS)).exit_code == 0
    imported, reference = pq.read_table(out).to_pylist(), pq.read_table(live).to_pylist()
    assert all(r["confidence"] is not None for r in imported)
    assert [r["confidence"] for r in imported] == [r["confidence"] for r in reference]


def run_cached(box, src: Path, out: Path, cache: Path, *extra: str):
    """A repeatable run (temperature 0) with a response cache in ``cache``."""
    args = ["run", str(src), "-o", str(out), "--template", TEMPLATE, "--provider", "openai", *MODEL]
    args += ["--rpm", "0", "--id-column", "id", "--temperature", "0", "--cache", str(cache), *extra]
    return run_cli(args, env=box.openai_env())


def _column(path: Path, name: str = "confidence") -> list[float | None]:
    return pq.read_table(path).column(name).to_pylist()


@pytest.mark.parametrize("pack", [[], ["--pack", "5", "--max-tokens", "8"]], ids=["alone", "packed"])
def test_a_reply_from_the_cache_keeps_the_confidence_it_was_paid_with(
    sandbox_factory, tmp_path: Path, pack: list[str]
) -> None:
    box = sandbox_factory(label_wrong=0.25)
    n = 120
    src, cache = reviews(tmp_path, n), tmp_path / "cache"
    paid, served = tmp_path / "paid.parquet", tmp_path / "served.parquet"
    assert run_cached(box, src, paid, cache, "--labels", ",".join(LABELS), *pack).exit_code == 0
    sent = box.count()
    assert run_cached(box, src, served, cache, "--labels", ",".join(LABELS), *pack).exit_code == 0
    assert box.count() == sent  # every row from the cache
    assert all(r["cached"] for r in pq.read_table(served).to_pylist())
    first = _column(paid)
    assert sum(c is not None for c in first) >= 0.95 * n
    assert _column(served) == first
    tasks_file = tmp_path / "tasks.json"
    result = run_cli(["review", "export", str(served), "--pick", "uncertain:20", "-o", str(tasks_file)])
    assert result.exit_code == 0, result.output
    tasks = json.loads(tasks_file.read_text())
    rows = pq.read_table(served).to_pylist()
    least = sorted((r for r in rows if r["confidence"] is not None), key=lambda r: r["confidence"])[:20]
    assert {t["data"]["row_id"] for t in tasks} == {r["row_id"] for r in least}
    assert all(t["data"]["pick"].startswith("uncertain: confidence 0.") for t in tasks)


def test_a_schemas_field_confidences_survive_the_cache(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(label_wrong=0.25)
    src, cache = reviews(tmp_path, 60), tmp_path / "cache"
    paid, served = tmp_path / "paid.parquet", tmp_path / "served.parquet"
    assert run_cached(box, src, paid, cache, "--json-schema", str(SCHEMA)).exit_code == 0
    sent = box.count()
    assert run_cached(box, src, served, cache, "--json-schema", str(SCHEMA)).exit_code == 0
    assert box.count() == sent
    for name in ("confidence_sentiment", "confidence_mentions_price"):
        assert sum(c is not None for c in _column(paid, name)) >= 55
        assert _column(served, name) == _column(paid, name)


def test_reparse_recomputes_the_confidence_from_the_kept_figures(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(label_wrong=0.25)
    src, out = reviews(tmp_path, 80), tmp_path / "out.parquet"
    labels = ["--labels", ",".join(LABELS), "--structured", "off", "--reask", "0"]
    assert run_openai(box, src, out, *labels).exit_code == 0
    before = pq.read_table(out).to_pylist()
    sent = box.count()
    assert run_openai(box, src, out, *labels, "--reparse").exit_code == 0
    assert _column(out) == [r["confidence"] for r in before]
    # Under a label set without "neutral": those rows are invalid, with no confidence; the others
    # keep theirs (their label, so the characters it measured, are the same).
    fewer = ["--labels", "positive,negative", "--structured", "off", "--reask", "0"]
    assert run_openai(box, src, out, *fewer, "--reparse").exit_code == 1
    after = pq.read_table(out).to_pylist()
    assert box.count() == sent
    assert any(r["label"] == "neutral" for r in before)
    for old, new in zip(before, after, strict=True):
        if old["label"] == "neutral":
            assert new["status"] == "invalid" and new["confidence"] is None
        else:
            assert new["label"] == old["label"] and new["confidence"] == old["confidence"]


@pytest.mark.parametrize("pack", [[], ["--pack", "5", "--max-tokens", "8"]], ids=["alone", "packed"])
def test_sigkill_and_resume_keep_every_answers_confidence(
    sandbox_factory, tmp_path: Path, pack: list[str]
) -> None:
    """Rows booked, rows with journaled answers that went on to vote, rows from the cache: after a
    kill and a resume each has the confidence the run without a kill gave it."""
    n = 300
    src = reviews(tmp_path, n)
    labels = ["--labels", ",".join(LABELS), "--samples", "3", "--vote-below", "0.8", "--concurrency", "8"]
    labels += pack
    reference = sandbox_factory(label_wrong=0.25)
    ref = tmp_path / "ref.parquet"
    assert run_cached(reference, src, ref, tmp_path / "ref-cache", *labels).exit_code in (0, 1)
    expected_requests = reference.count()
    box = sandbox_factory(label_wrong=0.25, latency=0.05)
    out = tmp_path / "o.parquet"
    args = ["run", str(src), "-o", str(out), "--template", TEMPLATE, "--provider", "openai", *MODEL]
    args += ["--rpm", "0", "--id-column", "id", "--temperature", "0", "--cache", str(tmp_path / "cache")]
    kill_and_resume(box, [*args, *labels], expected_requests // 2, expected_requests)
    done, want = pq.read_table(out).to_pylist(), pq.read_table(ref).to_pylist()
    if not pack:  # (a pack's answers change with its company, so with the packs a resume sends)
        assert [(r["id"], r["label"], r["confidence"]) for r in done] == [
            (r["id"], r["label"], r["confidence"]) for r in want
        ]
    assert all(r["confidence"] is not None for r in done if r["status"] == "ok")
    # A voted row's is its answers' mean probability, not its vote share (what an answer read back
    # with no confidence of its own left it).
    voted = [r for r in done if sum(dict(r["label_votes"] or []).values()) > 1 and r["status"] == "ok"]
    assert len(voted) > 30 and all(r["confidence"] != r["agreement"] for r in voted)


def test_eval_of_an_output_without_a_label_to_score_says_so(sandbox_factory, tmp_path: Path) -> None:
    """Every answer out of the set (no re-ask): eval reports no accuracy of 0%, it says why."""
    box = sandbox_factory(label_out_of_set=1.0)
    src = reviews(tmp_path, 20)
    out = tmp_path / "out.parquet"
    result = run_openai(box, src, out, "--labels", ",".join(LABELS), "--reask", "0", "--structured", "off")
    assert result.exit_code == 1, result.output
    report = run_cli(["eval", str(out), "--gold", "gold"])
    assert report.exit_code == 2
    assert f"{out}: none of the 20 rows with a gold label has a label to score (20 invalid;" in report.stderr


def test_eval_leaves_out_the_rows_a_stopped_run_has_not_sent(sandbox_factory, tmp_path: Path) -> None:
    """A run stopped halfway: eval scores the rows answered and says how many were left out; the
    rows never sent are not counted as wrong."""
    box = sandbox_factory()
    src = reviews(tmp_path, 40)
    out = tmp_path / "out.parquet"
    result = run_openai(
        box, src, out, "--labels", ",".join(LABELS), "--max-cost", "0.0002", "--concurrency", "1"
    )
    assert result.exit_code == 3, result.output
    pending = sum(1 for r in pq.read_table(out).to_pylist() if r["status"] == "pending")
    assert 0 < pending < 40
    e = json.loads(run_cli(["eval", str(out), "--gold", "gold", "--format", "json"]).stdout)
    assert e["rows_pending"] == pending and e["n"] == 40 - pending and e["accuracy"] == 1.0
    text = run_cli(["eval", str(out), "--gold", "gold"]).stdout
    assert f"{40 - pending:,} answered; {pending:,} not sent yet (a stopped run), left out" in text
