"""Human review: the rows picked for a look, as Label Studio tasks and the config that shows them."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pyarrow.parquet as pq

from .conftest import ROOT, run_cli, summary_of, write_csv
from .test_labeling import LABELS, labeling_input, run_labels


def test_export_picks_random_then_uncertain_without_overlap(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(label_out_of_set=0.2, label_wrong=0.1)
    src, out = labeling_input(tmp_path, 300), tmp_path / "o.parquet"
    assert run_labels(box, src, out, "--reask", "0", "--samples", "3").exit_code in (0, 1)
    rows = {r["row_id"]: r for r in pq.read_table(out).to_pylist()}
    tasks_file = tmp_path / "tasks.json"
    args = [
        "review",
        "export",
        str(out),
        "--pick",
        "uncertain:20",
        "--pick",
        "random:40",
        "-o",
        str(tasks_file),
    ]
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    assert "wrote 60 tasks (40 random, 20 uncertain)" in result.output
    tasks = json.loads(tasks_file.read_text())
    ids = [t["data"]["row_id"] for t in tasks]
    assert len(ids) == len(set(ids)) == 60  # picks never overlap
    for t in tasks:
        row = rows[t["data"]["row_id"]]
        assert t["data"]["text"] == row["text"] and set(t["data"]) == {"text", "row_id", "pick"}
        prediction = t["predictions"][0]
        assert prediction["model_version"].startswith("meta/llama-3.1-70b-instruct ")
        if row["status"] == "ok":
            assert prediction["result"][0]["value"]["choices"] == [row["label"]]
        else:
            assert prediction["result"] == []  # nothing to pre-fill for an invalid row
        if row["agreement"] is not None:
            assert prediction["score"] == row["agreement"]
    uncertain = [rows[t["data"]["row_id"]] for t in tasks if t["data"]["pick"].startswith("uncertain")]
    invalid = sum(r["status"] == "invalid" for r in rows.values())
    # invalid rows first, then the lowest agreement
    assert all(r["status"] == "invalid" for r in uncertain[: min(invalid, 20)]) or invalid == 0
    again = tmp_path / "again.json"
    assert run_cli([*args[:-1], str(again)]).exit_code == 0
    assert again.read_text() == tasks_file.read_text()  # seeded: the same rows again
    config = ET.fromstring((tmp_path / "tasks.label_config.xml").read_text())
    choices = config.find("Choices")
    assert choices is not None and choices.get("toName") == "text"
    assert [c.get("value") for c in choices.findall("Choice")] == LABELS


def test_a_schema_job_gets_one_control_per_field(sandbox, tmp_path: Path) -> None:
    out = tmp_path / "fields.parquet"
    schema = ROOT / "sample_data" / "review_fields.json"
    args = ["run", str(ROOT / "sample_data" / "reviews.csv"), "-o", str(out), "--template", "Read: {review}"]
    result = run_cli(
        [*args, "--json-schema", str(schema), "--rpm", "0", "--max-tokens", "64"], env=sandbox.env()
    )
    assert result.exit_code in (0, 1), result.output
    tasks_file = tmp_path / "t.json"
    assert run_cli(["review", "export", str(out), "--pick", "random:5", "-o", str(tasks_file)]).exit_code == 0
    config = ET.fromstring((tmp_path / "t.label_config.xml").read_text())
    controls = {el.get("name"): el for el in config if el.tag in ("Choices", "Number", "TextArea")}
    assert controls["sentiment"].tag == "Choices" and controls["sentiment"].get("choice") == "single"
    assert [c.get("value") for c in controls["mentions_price"]] == ["true", "false"]
    assert controls["stars_guess"].tag == "Number" and controls["topics"].tag == "TextArea"
    task = json.loads(tasks_file.read_text())[0]
    kinds = {r["from_name"]: r["type"] for r in task["predictions"][0]["result"]}
    assert kinds["sentiment"] == "choices" and kinds["stars_guess"] == "number"
    by_label = run_cli(["review", "export", str(out), "--pick", "label:positive:3", "-o", str(tasks_file)])
    assert by_label.exit_code == 2 and "a --json-schema output has no label column" in by_label.output


def test_bad_review_exports(sandbox, tmp_path: Path) -> None:
    plain = tmp_path / "plain.parquet"
    src = write_csv(tmp_path / "p.csv", [{"prompt": "hello"}])
    assert run_cli(["run", str(src), "-o", str(plain), "--rpm", "0"], env=sandbox.env()).exit_code == 0
    for args, message in [
        (
            ["review", "export", str(plain), "--pick", "random:5", "-o", str(tmp_path / "t.json")],
            "not a labeling output",
        ),
        (
            ["review", "export", str(plain), "--pick", "some:5", "-o", str(tmp_path / "t.json")],
            "--pick 'some:5'",
        ),
        (
            ["review", "export", str(tmp_path / "nope.parquet"), "--pick", "random:5", "-o", "t.json"],
            "nope.parquet",
        ),
    ]:
        result = run_cli(args)
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1


def test_picks_that_match_nothing_or_too_little_say_so(sandbox_factory, tmp_path: Path) -> None:
    """A label outside the set is a usage error naming the set; a pick that finds fewer rows
    than it asks for says how many on stderr (the tasks found are still written)."""
    box = sandbox_factory(label_out_of_set=0.05)
    out = tmp_path / "o.parquet"
    job = ["--job", str(ROOT / "jobs" / "sentiment.toml"), "-o", str(out), "--rpm", "0"]
    assert run_cli(["run", *job], env=box.env()).exit_code in (0, 1)
    rows = pq.read_table(out).to_pylist()
    target = tmp_path / "t.json"
    bad = run_cli(["review", "export", str(out), "--pick", "label:great:5", "-o", str(target)])
    assert bad.exit_code == 2 and not target.exists(), bad.output
    assert bad.output.strip() == (
        "batchllm: error: --pick label:great:5: 'great' is not in the label set (positive, negative, neutral)"
    )
    doubtful = sum(r["status"] == "invalid" or bool(r["reasks"]) for r in rows)
    assert doubtful < 20
    few = run_cli(["review", "export", str(out), "--pick", "uncertain:20", "-o", str(target)])
    assert few.exit_code == 0 and len(json.loads(target.read_text())) == doubtful
    assert few.stderr.strip() == (
        f"warning: --pick uncertain:20: {doubtful} picked, not 20: no more uncertain rows (invalid, samples "
        "that disagreed, re-asked) in the output"
    )
    labeled = [r for r in rows if r["status"] in ("ok", "invalid")]
    neutral = sum(r["label"] == "neutral" for r in labeled)
    args = ["--pick", "random:190", "--pick", "label:neutral:20", "--pick", "random:5"]
    both = run_cli(["review", "export", str(out), *args, "-o", str(target)])
    tasks = json.loads(target.read_text())
    left = sum(t["data"]["pick"] == "label: neutral" for t in tasks)
    assert both.exit_code == 0 and left < 20 and len(tasks) == 195 + left, both.output
    assert both.stderr.splitlines() == [
        f"warning: --pick label:neutral:20: {left} picked, not 20: no more rows labeled 'neutral' left after "
        "the other picks"
    ]
    assert left <= neutral and f"wrote {195 + left} tasks (195 random, {left} label)" in both.stdout


def _studio_export(tasks: list[dict], verdicts: dict[str, str | None], cancelled: set[str]) -> list[dict]:
    """What Label Studio's JSON export holds after reviewers worked: per task its annotations
    (a verdict accepted or changed; a skipped task is a cancelled annotation with no result)."""
    out = []
    for k, t in enumerate(tasks, 1):
        row_id = t["data"]["row_id"]
        annotations = []
        if row_id in cancelled:
            annotations.append({"result": [], "was_cancelled": True, "completed_by": 1,
                                "created_at": "2026-12-01T10:00:00Z", "updated_at": "2026-12-01T10:00:00Z"})  # fmt: skip
        elif row_id in verdicts:
            result = [{"from_name": "label", "to_name": "review", "type": "choices",
                       "value": {"choices": [verdicts[row_id]]}}]  # fmt: skip
            annotations.append({"result": result, "was_cancelled": False, "completed_by": {"id": 1, "email": "ann@example.com"},
                                "created_at": f"2026-12-01T10:{k % 60:02d}:00Z", "updated_at": f"2026-12-01T10:{k % 60:02d}:00Z"})  # fmt: skip
        out.append({"id": k, "data": t["data"], "annotations": annotations, "predictions": t["predictions"]})
    return out


def test_verdicts_come_home_and_the_estimate_holds(sandbox, tmp_path: Path) -> None:
    out = tmp_path / "o.parquet"
    job = ["--job", str(ROOT / "jobs" / "sentiment.toml"), "-o", str(out)]
    assert run_cli(["run", *job, "--rpm", "0"], env=sandbox.env()).exit_code == 0
    tasks_file = tmp_path / "tasks.json"
    pick = ["--pick", "random:40", "--pick", "label:neutral:20"]
    assert run_cli(["review", "export", str(out), *pick, "-o", str(tasks_file)]).exit_code == 0
    tasks = json.loads(tasks_file.read_text())
    gold = {r["row_id"]: r["human_label"] for r in pq.read_table(out).to_pylist()}
    # Reviewers: every random pick judged (their verdict is the annotators' label), 10 neutral
    # picks changed to "mixed" (a label outside the set), one task skipped.
    random_ids = [t["data"]["row_id"] for t in tasks if t["data"]["pick"] == "random"]
    others = [t["data"]["row_id"] for t in tasks if t["data"]["pick"] != "random"]
    verdicts: dict[str, str | None] = {r: gold[r] for r in random_ids}
    verdicts.update({r: "mixed" for r in others[:10]})
    export = tmp_path / "export.json"
    export.write_text(json.dumps(_studio_export(tasks, verdicts, cancelled={others[10]})))
    summary, report_before = summary_of(out), run_cli(["report", str(out)]).output
    result = run_cli(["review", "import", str(out), "--from", str(export)])
    assert result.exit_code == 0, result.output
    # The rewrite keeps the file's summary: `report` reads the same run, plus the reviews.
    assert summary_of(out) == summary
    report_after = run_cli(["report", str(out)]).output
    assert report_after.startswith(report_before) and "(None)" not in report_after
    assert "(meta/llama-3.1-70b-instruct)" in report_after.splitlines()[0]
    assert (
        "imported 50 verdicts (50 new or changed)" in result.output
        and "outside the set, kept: mixed" in result.output
    )
    rows = {r["row_id"]: r for r in pq.read_table(out).to_pylist()}
    assert {r for r, x in rows.items() if x["review_label"] is not None} == set(
        verdicts
    )  # not the skipped one
    for row_id, x in rows.items():
        assert x["label_final"] == verdicts.get(row_id, x["label"])
        assert (x["reviewer"] == "ann@example.com") == (row_id in verdicts)
    assert (
        run_cli(["review", "import", str(out), "--from", str(export)]).output.count("0 new or changed") == 1
    )
    # A later run (here --reparse) keeps the reviews.
    assert run_cli(["run", *job, "--rpm", "0", "--reparse"], env=sandbox.env()).exit_code == 0
    assert [r["review_label"] for r in pq.read_table(out).to_pylist()] == [
        x["review_label"] for x in rows.values()
    ]
    whole = json.loads(run_cli(["eval", str(out), "--gold", "human_label", "--format", "json"]).output)
    est = json.loads(run_cli(["eval", str(out), "--gold", "review", "--format", "json"]).output)
    low, high = est["accuracy_interval"]
    assert est["reviewed_random"] == 40 and low <= whole["accuracy"] <= high, (est, whole["accuracy"])
    wrong = est["projected_wrong"]
    assert wrong[1] <= wrong[0] <= wrong[2] and est["reviewed_other"]["n"] == 10
    # A correct label costs the output's cost over the correct labels the accuracy projects to
    # (here all 200 rows are labeled), not over the few reviewed ones; the gold column counts.
    cost = Decimal(est["cost_usd"])
    per_correct = Decimal(est["cost_per_correct_usd"])
    assert per_correct == (cost * 40 / (est["correct"] * 200)).quantize(Decimal("1e-12"), ROUND_HALF_UP)
    assert cost / Decimal(high * 200) <= Decimal(whole["cost_per_correct_usd"]) <= cost / Decimal(low * 200)
    assert est["cost_per_correct_basis"].startswith("estimated: the output's cost over the ")
    assert (
        whole["cost_per_correct_basis"]
        == f"counted: all 200 rows' cost over their {whole['correct']} correct labels"
    )
    # A gold column on some rows only (here the verdicts themselves) is estimated the same way.
    some = json.loads(run_cli(["eval", str(out), "--gold", "review_label", "--format", "json"]).output)
    assert some["n"] == 50 and some["cost_per_correct_basis"].endswith("projects to in its 200 rows")
    exact = (cost * 50 / (some["correct"] * 200)).quantize(Decimal("1e-12"), ROUND_HALF_UP)
    assert Decimal(some["cost_per_correct_usd"]) == exact
    text = run_cli(["eval", str(out), "--gold", "review"]).output
    assert "random picks reviewed" in text and "wrong labels in all 200 rows" in text
    assert f"${per_correct} (estimated: the output's cost" in text
    report = json.loads(run_cli(["report", str(out), "--format", "json"]).output)
    changed = sum(1 for r, v in verdicts.items() if v != rows[r]["label"])
    assert report["reviewed"] == {"rows": 50, "changed": changed}


def test_bad_verdict_imports_change_nothing(sandbox, tmp_path: Path) -> None:
    out = tmp_path / "o.parquet"
    assert (
        run_cli(
            ["run", "--job", str(ROOT / "jobs" / "sentiment.toml"), "-o", str(out), "--rpm", "0"],
            env=sandbox.env(),
        ).exit_code
        == 0
    )
    before = out.read_bytes()
    stranger = tmp_path / "stranger.json"
    stranger.write_text(json.dumps([{"id": 1, "data": {"row_id": "nope"}, "annotations": [
        {"result": [{"from_name": "label", "value": {"choices": ["positive"]}}], "was_cancelled": False}]}]))  # fmt: skip
    notours = tmp_path / "notours.json"
    notours.write_text(json.dumps([{"id": 1, "data": {"text": "x"}}]))
    other = tmp_path / "other.json"  # annotated in another project's controls: read as nothing, exit 0
    other.write_text(json.dumps([{"id": 1, "data": {"row_id": "r1"}, "annotations": [
        {"result": [{"from_name": "sentiment", "value": {"choices": ["positive"]}}], "was_cancelled": False}]}]))  # fmt: skip
    for source, message in [(stranger, "row_id 'nope'"), (notours, "task 1 is not a batchllm review task"),
                            (other, "1 annotated task, none answering this review's label (task 1 answers sentiment)"),
                            (tmp_path / "missing.json", "missing.json")]:  # fmt: skip
        result = run_cli(["review", "import", str(out), "--from", str(source)])
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    assert out.read_bytes() == before
    # An output directory (--engine ray's shape) is refused before anything is read or written.
    out.rename(tmp_path / "part.parquet")
    out.mkdir()
    (tmp_path / "part.parquet").rename(out / "part.parquet")
    for args in (
        ["export", str(out), "--pick", "random:5", "-o", str(tmp_path / "t.json")],
        ["import", str(out), "--from", str(stranger)],
    ):
        result = run_cli(["review", *args])
        assert result.exit_code == 2 and "an output directory (--engine ray)" in result.output, result.output
    assert (out / "part.parquet").read_bytes() == before
