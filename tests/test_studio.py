"""`batchllm review` against a real Label Studio (tests/studio.py): tasks in, verdicts home."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from .conftest import ROOT, run_cli
from .studio import label_studio  # noqa: F401 - the fixture

pytestmark = pytest.mark.timeout(1800)


def _api(base: str, token: str, method: str, path: str, body: object = None) -> object:
    request = urllib.request.Request(
        base + path, method=method, data=None if body is None else json.dumps(body).encode()
    )
    request.add_header("Authorization", f"Token {token}")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=60) as r:
        raw = r.read()
    return json.loads(raw) if raw else None


def test_review_round_trip_through_label_studio(sandbox_factory, label_studio, tmp_path: Path) -> None:  # noqa: F811
    base, token = label_studio
    box = sandbox_factory(label_out_of_set=0.15)
    out = tmp_path / "o.parquet"
    job = ["--job", str(ROOT / "jobs" / "sentiment.toml"), "-o", str(out)]
    assert run_cli(["run", *job, "--rpm", "0", "--reask", "0"], env=box.env()).exit_code in (0, 1)
    env = {"LABEL_STUDIO_API_KEY": token}
    export = ["review", "export", str(out), "--pick", "random:40", "--pick", "uncertain:20", "--to", base,
              "--project", "sentiment review"]  # fmt: skip
    first = run_cli(export, env=env)
    assert first.exit_code == 0 and "sent 60 tasks" in first.output, first.output
    again = run_cli(export, env=env)
    assert again.exit_code == 0 and "sent 0 tasks" in again.output and "60 it held already" in again.output
    projects = _api(base, token, "GET", "/api/projects/")["results"]
    assert [p["title"] for p in projects].count("sentiment review") == 1
    project = next(p["id"] for p in projects if p["title"] == "sentiment review")
    tasks = _api(base, token, "GET", f"/api/tasks/?project={project}&page_size=100")["tasks"]
    assert len(tasks) == 60 and all(t["total_predictions"] == 1 for t in tasks)
    # Reviewers, through the API as their clicks would: accept 20, change 9, skip 1.
    rows = {r["row_id"]: r for r in pq.read_table(out).to_pylist()}
    changed, accepted, skipped = {}, set(), None
    for k, t in enumerate(tasks[:30]):
        row_id = t["data"]["row_id"]
        if k == 29:
            _api(
                base,
                token,
                "POST",
                f"/api/tasks/{t['id']}/annotations/",
                {"result": [], "was_cancelled": True},
            )
            skipped = row_id
            continue
        label = rows[row_id]["label"] or "neutral"  # an invalid row has nothing to accept: a verdict
        if k < 9:
            label = "negative" if label != "negative" else "positive"
        if label != rows[row_id]["label"]:
            changed[row_id] = label
        else:
            accepted.add(row_id)
        result = [
            {"from_name": "label", "to_name": "product", "type": "choices", "value": {"choices": [label]}}
        ]
        _api(
            base,
            token,
            "POST",
            f"/api/tasks/{t['id']}/annotations/",
            {"result": result, "was_cancelled": False},
        )
    imported = run_cli(
        ["review", "import", str(out), "--from", base, "--project", "sentiment review"], env=env
    )
    assert imported.exit_code == 0, imported.output
    after = {r["row_id"]: r for r in pq.read_table(out).to_pylist()}
    reviewed = {r for r, x in after.items() if x["review_label"] is not None}
    assert reviewed == set(changed) | accepted and skipped not in reviewed
    assert {r for r, x in after.items() if x["label_final"] != x["label"]} == set(changed)
    assert all(after[r]["reviewer"] == "reviewer@example.com" for r in reviewed)
    twice = run_cli(["review", "import", str(out), "--from", base, "--project", "sentiment review"], env=env)
    assert "(0 new or changed)" in twice.output
    assert run_cli(["run", *job, "--rpm", "0", "--reparse"], env=box.env()).exit_code in (0, 1)
    assert {
        r for r, x in ((r["row_id"], r) for r in pq.read_table(out).to_pylist()) if x["review_label"]
    } == reviewed


def test_a_schema_config_is_accepted_and_errors_say_what_to_do(sandbox, label_studio, tmp_path: Path) -> None:  # noqa: F811
    base, token = label_studio
    out = tmp_path / "fields.parquet"
    schema = ROOT / "sample_data" / "review_fields.json"
    args = ["run", str(ROOT / "sample_data" / "reviews.csv"), "-o", str(out), "--template", "Read: {review}"]
    assert run_cli(
        [*args, "--json-schema", str(schema), "--rpm", "0", "--max-tokens", "64"], env=sandbox.env()
    ).exit_code in (0, 1)
    env = {"LABEL_STUDIO_API_KEY": token}
    export = ["review", "export", str(out), "--pick", "random:5", "--to", base, "--project", "fields review"]
    result = run_cli(export, env=env)
    assert result.exit_code == 0 and "sent 5 tasks" in result.output, result.output  # the config was accepted
    # A personal access token (a JWT refresh token) is exchanged for an access token.
    pat = _api(base, token, "POST", "/api/token/", {})["token"]
    with_pat = run_cli(export, env={"LABEL_STUDIO_API_KEY": pat})
    assert with_pat.exit_code == 0 and "5 it held already" in with_pat.output, with_pat.output
    refused = run_cli(export, env={"LABEL_STUDIO_API_KEY": "not-a-token"})
    assert (
        refused.exit_code == 4
        and "LABEL_STUDIO_API_KEY" in refused.output
        and "not-a-token" not in refused.output
    )
    unreachable = run_cli([*export[:-4], "--to", "http://127.0.0.1:9", "--project", "x"], env=env)
    assert unreachable.exit_code == 75 and len(unreachable.output.strip().splitlines()) == 1, (
        unreachable.output
    )
