"""`batchllm init` (batchllm/starter.py): a commented job file from the user's own data, that
`validate` passes and `run` runs on the sandbox."""

from __future__ import annotations

import csv
import json
import shutil
import tomllib
from decimal import Decimal
from pathlib import Path

import pyarrow.parquet as pq

from batchllm.pricing import load_models
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent
REVIEWS = ROOT / "sample_data" / "reviews.csv"


def _keys_and_comments(text: str) -> list[tuple[str, str]]:
    """(key, the comment line just above it) for each key of a flat TOML file."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        if line and not line.startswith(("#", " ")) and " = " in line:
            out.append((line.split(" = ")[0], lines[i - 1]))
    return out


def test_init_on_the_sample_reviews_validates_and_runs_on_the_sandbox(tmp_path: Path) -> None:
    job = tmp_path / "reviews.toml"
    made = run_cli(["init", str(REVIEWS), "--labels", "positive,negative,neutral", "-o", str(job)])
    assert made.exit_code == 0, made.output
    text = job.read_text()
    values = tomllib.loads(text)
    keys = _keys_and_comments(text)
    assert [k for k, _ in keys] == list(values)
    for key, comment in keys:
        assert comment.startswith("# ") and len(comment) > 12, key
    # The comment is the option's own help: the same words as `run --help`.
    assert dict(keys)["max_cost"] == "# Dollar cap on what this output may cost in all (exit 3 when reached)."
    assert "{review}" in values["template"] and "{review_id}" not in values["template"]
    assert values["id_column"] == "review_id"
    assert values["labels"] == "positive,negative,neutral"
    model = load_models("dataoorts")[values["model"]]
    assert model.prices is not None and values["input_price"] == str(model.prices.input_per_million)
    assert values["rpm"] == model.rpm and float(values["max_cost"]) > 0

    checked = run_cli(["validate", str(job)])
    assert checked.exit_code == 0 and checked.output.startswith(f"ok: {job} (200 rows"), checked.output

    # The job as written; only its rate (the model's documented 300 a minute) lifted, as `make demo`
    # does, since the sandbox has none.
    ran = run_cli(["run", "--job", str(job), "--sandbox", "--progress", "none", "--rpm", "6000"])
    assert ran.exit_code == 0, ran.output
    output = pq.read_table(tmp_path / "out" / "reviews.parquet")
    assert output.num_rows == 200
    assert set(output.column("label").to_pylist()) <= {"positive", "negative", "neutral"}


def test_paths_are_relative_to_the_job_file_and_nothing_is_overwritten(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(REVIEWS, data / "reviews.csv")
    job = tmp_path / "jobs" / "r.toml"
    assert run_cli(["init", str(data / "reviews.csv"), "-o", str(job)]).exit_code == 0
    values = tomllib.loads(job.read_text())
    assert values["input"] == "../data/reviews.csv" and values["output"] == "out/r.parquet"
    assert "labels" not in values and values["max_tokens"] == 256
    before = job.read_text()
    again = run_cli(["init", str(data / "reviews.csv"), "-o", str(job), "--labels", "a,b"])
    assert again.exit_code == 2
    assert again.stderr.strip().splitlines() == [
        f"batchllm: error: {job} exists already: init never overwrites a file (-o names another)"
    ]
    assert job.read_text() == before


def test_a_parquet_input_with_a_schema_for_an_openai_server(tmp_path: Path) -> None:
    job = tmp_path / "fields.toml"
    schema = ROOT / "sample_data" / "review_fields.json"
    args = ["init", str(ROOT / "sample_data" / "reviews.parquet"), "--json-schema", str(schema)]
    assert run_cli([*args, "--provider", "openai", "-o", str(job)]).exit_code == 0
    values = tomllib.loads(job.read_text())
    assert values["provider"] == "openai" and values["model"] in load_models("openai")
    assert Path(values["json_schema"]).name == "review_fields.json" and "labels" not in values
    # Prices given replace the table's whole: its cached-input price is written with them.
    listed = load_models("openai")[values["model"]].prices
    assert listed is not None and listed.cached_input_per_million is not None
    assert Decimal(str(values["cached_input_price"])) == listed.cached_input_per_million
    assert run_cli(["validate", str(job)]).exit_code == 0


def test_a_model_without_a_price_gets_a_job_that_validates(tmp_path: Path) -> None:
    """An unlisted model (a self-hosted server's): no price and no cap to validate against, so
    both are written for the user to fill in; the job validates as it is, and with them."""
    job = tmp_path / "own.toml"
    args = ["init", str(ROOT / "sample_data" / "reviews.csv"), "--provider", "openai", "--model", "smollm2"]
    assert run_cli([*args, "-o", str(job)]).exit_code == 0
    values = tomllib.loads(job.read_text())
    assert "max_cost" not in values and "input_price" not in values
    assert run_cli(["validate", str(job)]).exit_code == 0
    text = job.read_text().replace('# input_price = "0.00"', 'input_price = "0.10"')
    job.write_text(
        text.replace('# output_price = "0.00"', 'output_price = "0.20"').replace("# max_cost", "max_cost")
    )
    assert tomllib.loads(job.read_text())["max_cost"] == "1.00"
    result = run_cli(["validate", str(job)])
    assert result.exit_code == 0, result.output


def test_an_input_without_text_is_refused_in_one_line(tmp_path: Path) -> None:
    numbers = tmp_path / "numbers.csv"
    numbers.write_text("a,b\n1,2\n3,4\n")
    result = run_cli(["init", str(numbers), "-o", str(tmp_path / "n.toml")])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "numbers.csv" in result.stderr and "columns: a, b" in result.stderr
    assert not (tmp_path / "n.toml").exists()


def test_a_gold_column_named_as_batchllms_labels_is_refused_before_a_job_validate_refuses(
    tmp_path: Path,
) -> None:
    """A labeler's gold answers in a column named ``label`` (or a schema field's name): init wrote
    a job that `validate` refused. It says what to rename now; renamed, the job validates."""
    data = tmp_path / "gold.csv"
    data.write_text("id,text,label\n1,this is great stuff,positive\n2,really bad thing here,negative\n")
    job = tmp_path / "gold.toml"
    refused = run_cli(["init", str(data), "--labels", "positive,negative", "-o", str(job)])
    assert refused.exit_code == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "gold.csv: column 'label'" in refused.stderr and "--gold gold_label" in refused.stderr
    assert not job.exists()
    data.write_text(data.read_text().replace(",label\n", ",gold_label\n"))
    assert run_cli(["init", str(data), "--labels", "positive,negative", "-o", str(job)]).exit_code == 0
    assert run_cli(["validate", str(job)]).exit_code == 0


def test_names_batchllm_writes_are_refused_in_a_schema_and_by_init(tmp_path: Path) -> None:
    """A schema field named as a column batchllm writes (cost_usd, reasks) wrote two columns of
    one name: a model's cost_usd summed as the cost, `report` a traceback, or a run that paid for
    every row and could write no output. Refused before anything is sent, by run, validate and
    init; init also refuses an input column named as an output column, and a schema field named
    as an input column says to rename the field."""
    fields = json.loads((ROOT / "sample_data" / "review_fields.json").read_text())
    data = tmp_path / "rows.csv"
    data.write_text("id,text\n1,this is great stuff\n2,really bad thing here\n")
    for name in ("cost_usd", "reasks", "status"):
        schema = tmp_path / f"{name}.json"
        schema.write_text(
            json.dumps({**fields, "properties": {**fields["properties"], name: {"type": "number"}}})
        )
        out = tmp_path / f"{name}.parquet"
        ran = run_cli(["run", str(data), "-o", str(out), "--template", "{text}", "--json-schema", str(schema),
                       "--sandbox"])  # fmt: skip
        assert (
            ran.exit_code == 2 and f"--json-schema: the field {name!r} has the name of a column" in ran.stderr
        )
        assert not out.exists() and not out.with_name(out.name + ".batchllm").exists()
        job = tmp_path / f"{name}.toml"
        refused = run_cli(["init", str(data), "--json-schema", str(schema), "-o", str(job)])
        assert refused.exit_code == 2 and f"the field {name!r}" in refused.stderr and not job.exists()
    (tmp_path / "answered.csv").write_text("id,text,response\n1,this is great stuff,x\n")
    said = run_cli(["init", str(tmp_path / "answered.csv"), "-o", str(tmp_path / "a.toml")])
    assert said.exit_code == 2 and "input column 'response' has the name of an output column" in said.stderr
    (tmp_path / "sentiment.csv").write_text("id,text,sentiment\n1,this is great stuff,positive\n")
    schema = ROOT / "sample_data" / "review_fields.json"
    said = run_cli(
        [
            "init",
            str(tmp_path / "sentiment.csv"),
            "--json-schema",
            str(schema),
            "-o",
            str(tmp_path / "s.toml"),
        ]
    )
    assert said.exit_code == 2 and "'sentiment' has the name of a field of" in said.stderr
    assert "rename the field, or the column" in said.stderr


def test_a_column_of_ready_prompts_is_sent_as_it_is(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("id,prompt\nq1,What is two and two?\nq2,Name a colour of the sky.\n")
    job = tmp_path / "p.toml"
    assert run_cli(["init", str(prompts), "-o", str(job)]).exit_code == 0
    values = tomllib.loads(job.read_text())
    assert values["prompt_column"] == "prompt" and "template" not in values and values["id_column"] == "id"
    assert run_cli(["validate", str(job)]).exit_code == 0


def test_init_on_json_lines_rows(tmp_path: Path) -> None:
    """The sample reviews as JSON Lines rows (a dataset's usual export): the same job as from the
    CSV, and it runs."""
    with open(REVIEWS, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))[:30]
    src = tmp_path / "reviews.jsonl"
    src.write_text("".join(json.dumps({**r, "rating": int(r["rating"])}) + "\n" for r in rows))
    job = tmp_path / "reviews.toml"
    made = run_cli(["init", str(src), "--labels", "positive,negative,neutral", "-o", str(job)])
    assert made.exit_code == 0, made.output
    values = tomllib.loads(job.read_text())
    assert "{review}" in values["template"] and values["id_column"] == "review_id"
    ran = run_cli(["run", "--job", str(job), "--sandbox", "--progress", "none", "--rpm", "6000"])
    assert ran.exit_code == 0, ran.output
    output = pq.read_table(tmp_path / "out" / "reviews.parquet")
    assert output.column("review_id").to_pylist() == [r["review_id"] for r in rows]
    assert output.column("rating").to_pylist() == [r["rating"] for r in rows]  # text, as written
    assert set(output.column("label").to_pylist()) <= {"positive", "negative", "neutral"}
