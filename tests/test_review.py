"""Human review: the rows picked for a look, as Label Studio tasks and the config that shows them."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pyarrow.parquet as pq

from .conftest import ROOT, run_cli, write_csv
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
