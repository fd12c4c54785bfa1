"""What a new user met where fleets meet the rest (structured output per endpoint, the fleet file's
unknown tables) and where real files meet batchllm (encodings, output paths), through the CLI
against sandboxes on loopback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq

from .conftest import ROOT, run_cli, write_csv

LABELS = "positive,negative,neutral"
MODEL = "meta/llama-3.1-70b-instruct"  # the sandbox serves it on both faces


def _fleet(path: Path, *members: tuple[str, Any, str, int]) -> Path:
    """``(name, sandbox, provider, concurrency)`` each, at one price: a fleet over sandboxes."""
    text = ""
    for name, box, provider, concurrency in members:
        url = box.url if provider == "dataoorts" else box.openai_url
        text += (f'[[endpoint]]\nname = "{name}"\nprovider = "{provider}"\nendpoint = "{url}"\n'
                 f'key_env = "{name.upper()}_KEY"\nmodel = "{MODEL}"\nrpm = 6000\n'
                 f'concurrency = {concurrency}\ninput_price = "0.5"\noutput_price = "0.5"\n\n')  # fmt: skip
    path.write_text(text)
    return path


def _reviews(tmp_path: Path, n: int) -> Path:
    rows = [{"id": f"r{i}", "text": f"Review {i}: {'great' if i % 2 else 'broke'}"} for i in range(n)]
    return write_csv(tmp_path / "in.csv", rows)


def _formats(box: Any) -> list[bool]:
    """For each request a sandbox received: did it carry a response_format?"""
    out = []
    for body in box.sandbox.bodies:
        payload = orjson.loads(body)
        out.append("response_format" in payload.get("data", payload))
    return out


def test_structured_output_is_decided_for_each_endpoint(sandbox_factory, tmp_path: Path) -> None:
    """A job with the default provider (dataoorts) over a fleet of two openai endpoints, one
    refusing response_format: the other gets it on every request, the refusing one once (then
    never again; with `--structured on`, which insists on it, the refusing endpoint is out for the
    run and its rows go to the other); a dataoorts endpoint never gets it, and `on` is refused
    naming it."""
    src = _reviews(tmp_path, 40)
    takes = sandbox_factory(keep_bodies=True, latency=0.05)
    refuses = sandbox_factory(keep_bodies=True, latency=0.05, refuse_response_format=True)
    fleet = _fleet(tmp_path / "f.toml", ("takes", takes, "openai", 2), ("refuses", refuses, "openai", 2))
    env = {"TAKES_KEY": takes.key, "REFUSES_KEY": refuses.key}
    base = ["run", str(src), "--template", "Classify: {text}", "--labels", LABELS, "--id-column", "id"]
    base += ["--fleet", str(fleet), "--cache", "off", "--progress", "none"]
    for setting in ("auto", "on"):
        takes.sandbox.bodies.clear()
        refuses.sandbox.bodies.clear()
        before = refuses.count(400)
        out = tmp_path / f"{setting}.parquet"
        result = run_cli([*base, "-o", str(out), "--structured", setting], env=env)
        assert result.exit_code == 0, result.output
        assert result.stderr.count("refuses response_format") == 1, result.stderr
        assert "'refuses'" in result.stderr and "Error" not in result.stderr  # no class names
        sent = _formats(takes)
        assert sent and all(sent), "the endpoint that takes response_format got it every time"
        refused = _formats(refuses)
        if setting == "auto":  # then plain requests: the ones out when it refused went again
            assert 1 <= sum(refused) <= 2 and refused.count(False) >= 1
        else:  # never a request without it: the endpoint is out
            assert 1 <= sum(refused) <= 2 and refused.count(False) == 0
            out_line = (
                "endpoint 'refuses' is out for this run: it refuses response_format, which --structured on"
            )
            assert out_line + " requires (HTTP 400" in result.stderr, result.stderr
        assert refuses.count(400) - before == sum(refused)
        rows = pq.read_table(out).to_pylist()
        assert len(rows) == 40 and all(r["status"] == "ok" for r in rows)
    # A dataoorts endpoint beside an openai one: auto sends the schema only where it is taken.
    plain = sandbox_factory(keep_bodies=True, latency=0.05)
    mixed = _fleet(tmp_path / "m.toml", ("dao", plain, "dataoorts", 2), ("oai", takes, "openai", 2))
    env = {"DAO_KEY": plain.key, "OAI_KEY": takes.key}
    takes.sandbox.bodies.clear()
    args = [a if a != str(fleet) else str(mixed) for a in base]
    result = run_cli([*args, "-o", str(tmp_path / "m.parquet")], env=env)
    assert result.exit_code == 0, result.output
    assert plain.sandbox.bodies and not any(_formats(plain))
    assert takes.sandbox.bodies and all(_formats(takes))
    result = run_cli([*args, "-o", str(tmp_path / "m2.parquet"), "--structured", "on"], env=env)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert "'dao'" in result.stderr and "dataoorts" in result.stderr


def test_a_mistyped_table_in_a_fleet_or_job_file_is_an_error(tmp_path: Path) -> None:
    """`[[endpoints]]` or `[[endpointz]]` beside good endpoints, a stray top-level key: each named
    in file order with the endpoints' own problems, exit 2; a job file's unknown table likewise."""
    good = (ROOT / "jobs" / "fleets" / "three_endpoints.toml").read_text()
    typo = tmp_path / "typo.toml"
    typo.write_text(good.replace("[[endpoint]]", "[[endpoints]]"))
    result = run_cli(["validate", str(ROOT / "jobs" / "sentiment.toml"), "--fleet", str(typo)])
    assert result.exit_code == 2, result.output
    assert "unknown table [[endpoints]]; did you mean [[endpoint]]?" in result.output
    mixed = tmp_path / "mixed.toml"
    mixed.write_text(
        "rpm = 5\n" + good.replace("rpm = 120", 'rpm = "fast"', 1) + '\n[[endpointz]]\nname = "x"\n'
    )
    result = run_cli(["validate", str(ROOT / "jobs" / "sentiment.toml"), "--fleet", str(mixed)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if str(mixed) in line]
    assert "unknown key 'rpm'" in lines[0] and "'fast'" in lines[1] and "[[endpointz]]" in lines[2], lines
    job = tmp_path / "j.toml"
    job.write_text((ROOT / "jobs" / "sentiment.toml").read_text() + '\n[[fleets]]\nname = "x"\n')
    result = run_cli(["validate", str(job)])
    assert result.exit_code == 2 and "unknown key 'fleets'; did you mean 'fleet'?" in result.output


def test_every_file_read_honours_a_byte_order_mark_or_says_to_save_it_as_utf8(
    sandbox, tmp_path: Path
) -> None:
    """Labels, a template, a schema, examples, job and fleet files: BOM-marked UTF-8/16/32 are
    read; Latin-1 is a one-line error naming the file and not offering --encoding (the input's)."""
    src = _reviews(tmp_path, 4)
    labels = tmp_path / "labels16.txt"
    labels.write_bytes("positive\nnegative\nneutral\n".encode("utf-16"))  # with its BOM
    schema = tmp_path / "schema.json"
    schema.write_bytes(b'\xef\xbb\xbf{"type": "object", "properties": {"label": {"type": "string"}}}')
    template = tmp_path / "t32.txt"
    template.write_bytes("Classify: {text}".encode("utf-32"))
    base = ["run", str(src), "--id-column", "id", "--progress", "none", "--cache", "off"]
    for n, flags in enumerate(
        (
            ["--template-file", str(template), "--labels-file", str(labels)],
            ["--template", "{text}", "--json-schema", str(schema)],
        )  # fmt: skip
    ):
        result = run_cli([*base, "-o", str(tmp_path / f"ok{n}.parquet"), *flags], env=sandbox.env())
        assert result.exit_code == 0, result.output
    rows = pq.read_table(tmp_path / "ok0.parquet").to_pylist()
    assert all(r["label"] in ("positive", "negative", "neutral") for r in rows)
    assert rows[0]["prompt_tokens"] > 0
    latin = {
        "labels file": ("--labels-file", b"positive\nn\xe9gative\n", ["--template", "{text}"]),
        "template file": ("--template-file", b"Classify: {text} \xe9\n", ["--labels", LABELS]),
        "examples file": ("--examples", b"text,label\ngr\xe9at,positive\n", ["--template", "{text}", "--labels", LABELS]),
        "JSON schema": ("--json-schema", b'{"type": "object", "description": "\xe9"}', ["--template", "{text}"]),
    }  # fmt: skip
    for kind, (flag, data, more) in latin.items():
        bad = tmp_path / f"bad-{flag.strip('-')}.{'csv' if flag == '--examples' else 'txt'}"
        bad.write_bytes(data)
        result = run_cli(
            [*base, "-o", str(tmp_path / "bad.parquet"), flag, str(bad), *more], env=sandbox.env()
        )
        assert result.exit_code == 2, result.output
        assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
        assert str(bad) in result.stderr and f"save the {kind} as UTF-8" in result.stderr
        assert "--encoding" not in result.stderr
    # A job file saved with a UTF-8 BOM (Notepad's) reads; a Latin-1 fleet file is said so.
    job = tmp_path / "job.toml"
    job.write_bytes(
        b"\xef\xbb\xbf" + f'input = "{src}"\noutput = "j.parquet"\ntemplate = "{{text}}"\n'.encode()
    )
    result = run_cli(["run", "--job", str(job), "--progress", "none"], env=sandbox.env())
    assert result.exit_code == 0, result.output
    fleet = tmp_path / "fleet.toml"
    fleet.write_bytes(b'[[endpoint]]\nname = "caf\xe9"\n')
    result = run_cli(["validate", str(job), "--fleet", str(fleet)])
    assert result.exit_code == 2 and "save the fleet file as UTF-8" in result.output, result.output


def test_every_path_written_follows_one_rule(sandbox, tmp_path: Path) -> None:
    """-o in a folder that takes no files (/proc), --summary-json, report's and spend's --html,
    review export's -o under a missing top-level folder: one line naming the flag and path, exit
    2, nothing made at the top of the file system; under an existing folder they are made."""
    src = _reviews(tmp_path, 4)
    base = ["run", str(src), "--template", "{text}", "--labels", LABELS, "--progress", "none"]
    result = run_cli([*base, "-o", "/proc/x.parquet"], env=sandbox.env())
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "--output /proc/x.parquet: cannot write in the folder /proc" in result.stderr
    top = Path("/nonexistent-batchllm-test")
    assert not top.exists()
    out = tmp_path / "o.parquet"
    result = run_cli([*base, "-o", str(out), "--summary-json", str(top / "q" / "s.json")], env=sandbox.env())
    assert result.exit_code == 2 and "--summary-json" in result.stderr and not out.exists(), result.output
    assert run_cli([*base, "-o", str(out)], env=sandbox.env()).exit_code == 0
    for args in (
        ["report", str(out), "--html", str(top / "d" / "x.html")],
        ["spend", "--html", str(top / "s.html")],
        ["review", "export", str(out), "--pick", "random:2", "-o", str(top / "d" / "t.json")],
    ):
        result = run_cli(args)
        assert result.exit_code == 2, (args, result.output)
        assert "batchllm makes no folder at the top of the file system" in result.stderr, result.stderr
        assert str(top) in result.stderr and result.stderr.count("\n") == 1 and not result.stdout
        assert not top.exists()
    made = tmp_path / "new" / "deeper"
    assert run_cli(["report", str(out), "--html", str(made / "r.html")]).exit_code == 0
    assert (made / "r.html").is_file()


def test_a_deadline_with_packs_plans_in_requests(sandbox_factory, tmp_path: Path) -> None:
    """400 rows in packs of 10 are 40 requests: at 4 a second the cheap endpoint alone ends in
    10 s, well within a 25 s deadline, so the plan and the run leave the dear endpoint idle (in
    rows, 100 s, it would have bought most of them from the dear one)."""
    cheap = sandbox_factory(rate_limit=4.0, latency=0.05, rate_burst=4)
    dear = sandbox_factory(rate_limit=40.0, latency=0.05, rate_burst=4)
    fleet = tmp_path / "f.toml"
    text = ""
    for name, box, rpm, price in (("cheap", cheap, 240, "0.10"), ("dear", dear, 2400, "0.90")):
        text += (f'[[endpoint]]\nname = "{name}"\nprovider = "dataoorts"\nendpoint = "{box.url}"\n'
                 f'key_env = "{name.upper()}_KEY"\nmodel = "{MODEL}"\nrpm = {rpm}\nconcurrency = 16\n'
                 f'input_price = "{price}"\noutput_price = "{price}"\n\n')  # fmt: skip
    fleet.write_text(text)
    src = _reviews(tmp_path, 400)
    args = [
        str(src),
        "--template",
        "Classify: {text}",
        "--labels",
        LABELS,
        "--pack",
        "10",
        "--id-column",
        "id",
    ]
    args += ["--fleet", str(fleet), "--deadline", "25s"]
    result = run_cli(["estimate", *args, "--format", "json"])
    assert result.exit_code == 0, result.output
    planned = orjson.loads(result.stdout)
    assert planned["feasible"] and [e["rows"] for e in planned["endpoints"]] == [400, 0], planned
    assert planned["cheapest_alone"]["minutes"] <= 0.3, planned  # 40 requests at 4 a second
    out = tmp_path / "o.parquet"
    env = {"CHEAP_KEY": cheap.key, "DEAR_KEY": dear.key}
    result = run_cli(["run", *args, "-o", str(out), "--cache", "off", "--progress", "none"], env=env)
    assert result.exit_code == 0, result.output
    assert dear.count() == 0, result.output
    assert 40 <= cheap.count() <= 44 and cheap.count(429) == 0
    rows = pq.read_table(out, columns=["endpoint", "status"]).to_pylist()
    assert len(rows) == 400 and all(r["endpoint"] == "cheap" and r["status"] == "ok" for r in rows)


def test_small_wording(sandbox_factory, tmp_path: Path) -> None:
    """A journal-settings mismatch over the sandbox said in words; `spend` gives an exit-1 run a
    message; a fleet run's header names the fleet's providers and models, not the job's;
    `estimate --compare --fleet` is refused in one line."""
    box = sandbox_factory(label_out_of_set=1.0)
    src = _reviews(tmp_path, 6)
    out = tmp_path / "o.parquet"
    base = ["run", str(src), "-o", str(out), "--template", "{text}", "--labels", LABELS, "--reask", "0"]
    base += ["--progress", "none", "--cache", "off"]
    result = run_cli(base, env=box.env())
    assert result.exit_code == 1, result.output
    result = run_cli(["spend", "--runs", "--format", "json"])
    assert result.exit_code == 0, result.output
    runs = orjson.loads(result.stdout)["runs"]
    assert [r["message"] for r in runs] == ["6 rows invalid (see the error column)"], runs
    status = run_cli(["status", str(out)]).stdout  # every row done: a resume would send nothing
    assert "resume with" not in status and "send the failed rows again with:" in status, status
    assert status.rstrip().endswith("--retry-errors"), status
    result = run_cli([*base, "--sandbox"])
    assert result.exit_code == 2, result.output
    assert "this run uses the sandbox; the journal was written without it" in result.stderr
    assert "journal has none" not in result.stderr
    fleet = _fleet(tmp_path / "f.toml", ("one", box, "openai", 2), ("two", box, "openai", 2))
    env = {"ONE_KEY": box.key, "TWO_KEY": box.key}
    args = ["run", str(src), "-o", str(tmp_path / "f.parquet"), "--template", "{text}", "--fleet", str(fleet)]
    result = run_cli([*args, "--progress", "none"], env=env)
    assert result.exit_code == 0, result.output
    header = result.stderr.splitlines()[0]
    assert f"fleet: one (openai model {MODEL}), two (openai model {MODEL})" in header, header
    assert "dataoorts" not in header
    result = run_cli(["estimate", str(src), "--template", "{text}", "--fleet", str(fleet), "--compare"])
    assert result.exit_code == 2 and "--compare goes without --fleet" in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1
