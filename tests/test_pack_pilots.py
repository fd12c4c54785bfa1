"""`estimate --pilot M --pack 1,5,10`: where each size's rows and spend are kept (its own journal,
its own ledger record), what `spend` and `status` say of them, and a pilot the cache answers
projecting the same figures as the pilot that paid (issue 29, item 6)."""

from __future__ import annotations

import json
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from batchllm.engine.journal import Journal
from batchllm.pricing import resolve_model

from .conftest import run_cli

SAMPLE = Path(__file__).parent.parent / "sample_data" / "reviews.csv"
JOB = Path(__file__).parent.parent / "jobs" / "sentiment.toml"
PICO = Decimal(10) ** 12
PRICES = resolve_model("dataoorts", "meta/llama-3.1-70b-instruct").prices  # the job's model


def _pilot(box, out: Path, *extra: str) -> dict[str, Any]:
    args = ["estimate", "--job", str(JOB), "-o", str(out), "--pilot", "40", "--gold", "human_label"]
    result = run_cli([*args, "--pack", "1,5", "--rpm", "0", "--format", "json", *extra], env=box.env())
    assert result.exit_code == 0, result.output
    # One start line per size, naming it; the rows it leaves out are not "already done".
    starts = [line for line in result.stderr.splitlines() if line.startswith("batchllm: pilot at pack")]
    assert [line.split(":")[1] for line in starts] == [" pilot at pack 1", " pilot at pack 5"], starts
    assert all("200 rows in" in line and "40 to send;" in line for line in starts), starts
    return json.loads(result.stdout[result.stdout.index("{") :])


def _spend(ledger: Path, *args: str) -> dict[str, Any]:
    result = run_cli(["spend", "--ledger", str(ledger), "--format", "json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _pico(usd: Any) -> int:
    return int(Decimal(repr(usd) if isinstance(usd, float) else str(usd)) * PICO)


def test_pack_pilots_are_their_own_outputs_in_the_ledger(sandbox_factory, tmp_path: Path) -> None:
    """After a pilot at two sizes and the run: each output path in the ledger has runs that add up
    to what it holds (the output file's cost_usd, a size's journal), `spend` equals what the
    server billed, and counts each of the output's rows once (a pilot's are not the job's)."""
    assert PRICES is not None
    box = sandbox_factory(pack_missing=0.1, prices=(PRICES.input_pico, PRICES.output_pico, PRICES.input_pico))
    ledger = tmp_path / "ledger.db"
    out = tmp_path / "ps.parquet"
    _pilot(box, out, "--ledger", str(ledger))
    run = ["run", "--job", str(JOB), "-o", str(out), "--pack", "5", "--rpm", "0", "--ledger", str(ledger)]
    result = run_cli(run, env=box.env())
    assert result.exit_code in (0, 1), result.output

    report = _spend(ledger, "--runs", "--by", "job")
    by_output: dict[str, int] = defaultdict(int)
    for r in report["runs"]:
        by_output[r["output"]] += _pico(r["cost_usd"])
    folder = tmp_path / "ps.parquet.batchllm" / "pilots"
    sizes = {str((folder / f"pack-{n}").resolve()) for n in (1, 5)}
    assert set(by_output) == {str(out.resolve()), *sizes}
    rows = pq.read_table(out).column("cost_usd").to_pylist()
    assert by_output[str(out.resolve())] == sum(_pico(c) for c in rows)
    for d in sizes:
        journal = Journal.open_readonly(Path(d))
        try:
            assert by_output[d] == journal.spent_pico() > 0
        finally:
            journal.conn.close()
    assert _pico(report["total"]["cost_usd"]) == box.sandbox.stats["billed_pico"] == sum(by_output.values())
    assert [r["kind"] for r in report["runs"]] == ["pack-pilot", "pack-pilot", "run"]
    (job,) = report["cost_per_1k_rows"]
    assert job["rows_ok"] == report["total"]["rows_ok"] == len(rows) == 200
    assert _pico(job["cost_per_1k_rows_usd"]) == sum(by_output.values()) * 1000 // 200

    status = run_cli(["status", str(out)])
    assert status.exit_code == 0 and "pilots at pack sizes 1, 5" in status.output, status.output
    # An output not run yet, whose folder holds only the pilot: the status of each size.
    only = tmp_path / "only.parquet"
    _pilot(box, only, "--ledger", str(ledger))
    status = run_cli(["status", str(only)])
    assert status.exit_code == 0, status.output
    assert "not run yet" in status.output and "pack 1:" in status.output and "pack 5:" in status.output
    assert status.output.count("rows: 40 done") == 2 and "a pilot of the input's 200 rows" in status.output
    (tmp_path / "empty.parquet.batchllm").mkdir()  # a folder with no journal: said as such
    status = run_cli(["status", str(tmp_path / "empty.parquet")])
    assert status.exit_code == 2 and "is there but holds no batchllm journal" in status.output


def test_a_pilot_the_cache_answers_projects_what_the_paid_one_did(sandbox_factory, tmp_path: Path) -> None:
    """The same pilot into another output, its replies all in the cache: every size's line is the
    same as the paid pilot's, rows a pack's reply left out (and re-asked) included."""
    box = sandbox_factory(pack_missing=0.1)
    first = _pilot(box, tmp_path / "a.parquet")
    again = _pilot(box, tmp_path / "b.parquet")
    assert any(x["replies_from_cache"] for x in again["sizes"])
    figures = ("requests", "prompt_tokens_per_row", "accuracy", "invalid_rate", "usd_per_correct_label")
    for paid, cached in zip(first["sizes"], again["sizes"], strict=True):
        assert {k: paid[k] for k in figures} == {k: cached[k] for k in figures}, (paid, cached)
        assert paid["projected_cost_usd"] == cached["projected_cost_usd"]
