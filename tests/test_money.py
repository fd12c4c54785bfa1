"""Money across features: random sequences of labeling runs, and every figure checked against the bill.

Each sequence runs one labeling job against the sandbox (wrong answers, answers out of the label
set, prose, server errors; packs with items left out and replies broken off) through a random
mix of what users do to one output: plain runs, ``--reask 0/1``, ``--samples``, ``--pack 1/4/10``
(drawn per run), ``--retry-errors``, ``--reparse`` under a changed label set, runs killed with
SIGKILL mid-flight, and a ``--max-cost`` cap. After each sequence:

- the rows' ``cost_usd`` sum, ``report``, ``status`` and the output's summary agree to the
  picodollar;
- what the sandbox billed (its token counters at the model's prices) is that figure plus at most
  what ``status`` says was in flight at a kill (requests that may have been billed without a
  saved reply);
- the bill never passes ``--max-cost``.
"""

from __future__ import annotations

import random
import re
import signal
import time
from decimal import Decimal
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest

from batchllm.pricing import PICO_PER_USD, resolve_model

from .conftest import run_cli, spawn, summary_of, write_csv

SEQUENCES = 30
LABELS = ["positive", "negative", "neutral"]
PRICES = resolve_model("dataoorts", "meta/llama-3.1-70b-instruct").prices
assert PRICES is not None


def _pico(text: str) -> int:
    return int(Decimal(text) * PICO_PER_USD)


def _billed(box) -> int:
    stats = box.sandbox.stats
    return stats["prompt_tokens"] * PRICES.input_pico + stats["completion_tokens"] * PRICES.output_pico


def _texts(rng: random.Random, seq: int, n: int) -> list[dict[str, str]]:
    words = ["fine", "broken", "great", "late", "cheap", "loud", "soft", "bright", "slow", "sturdy"]
    rows = [
        {"id": f"s{seq}r{i}", "text": f"Sequence {seq} item {i}: " + " ".join(rng.choices(words, k=6))}
        for i in range(n)
    ]
    for k in rng.sample(range(1, n), 3):  # identical rows: one request, the others copies
        rows[k]["text"] = rows[k - 1]["text"]
    return rows


def _status_cost(out: Path) -> tuple[int, int]:
    """(cost so far, worst case of requests that may have been billed without a saved reply)."""
    result = run_cli(["status", str(out)])
    assert result.exit_code == 0, result.output
    text = result.output
    cost = re.search(r"cost so far: \$([0-9.]+)", text)
    assert cost is not None, text
    lost = re.search(r"at most \$([0-9.]+), may have been billed", text)
    return _pico(cost.group(1)), _pico(lost.group(1)) if lost else 0


def _check(box, out: Path, cap: Decimal | None, seq: int) -> None:
    rows = pq.read_table(out).to_pylist()
    rows_pico = sum(
        round(Decimal(repr(r["cost_usd"])) * PICO_PER_USD) for r in rows if r["cost_usd"] is not None
    )
    report = run_cli(["report", str(out), "--format", "json"])
    assert report.exit_code == 0, report.output
    report_pico = _pico(orjson.loads(report.output)["overall"]["cost_usd"])
    summary_pico = _pico(summary_of(out)["cost_usd"]["total"])
    status_pico, lost_worst = _status_cost(out)
    billed = _billed(box)
    where = f"sequence {seq}: rows {rows_pico}, report {report_pico}, status {status_pico}, summary {summary_pico}"
    assert rows_pico == report_pico == status_pico == summary_pico, where
    assert 0 <= billed - rows_pico <= lost_worst, f"{where}, billed {billed}, maybe billed {lost_worst}"
    if cap is not None:
        assert billed <= int(cap * PICO_PER_USD), f"{where}: billed {billed} over the cap {cap}"


class Sequence:
    """One output and the job's settings, as a user keeps them from run to run."""

    def __init__(self, tmp_path: Path, seq: int) -> None:
        self.rng = random.Random(1000 + seq)
        self.src = write_csv(tmp_path / f"in{seq}.csv", _texts(self.rng, seq, self.rng.randint(24, 48)))
        self.out = tmp_path / f"out{seq}.parquet"
        self.labels = list(LABELS)
        self.samples = self.rng.choice([1, 1, 3])
        self.cap = self.rng.choice([None, Decimal("0.0006"), Decimal("0.0015"), Decimal("0.004")])

    def args(self, *extra: str) -> list[str]:
        rng = self.rng
        base = [
            "run",
            str(self.src),
            "-o",
            str(self.out),
            "--template",
            "Classify: {text}",
            "--id-column",
            "id",
        ]
        base += ["--labels", ",".join(self.labels), "--max-tokens", "16", "--rpm", "0", "--concurrency", "8"]
        base += ["--reask", str(rng.choice([0, 1])), "--samples", str(self.samples), "--cache", "off"]
        base += ["--progress", "none", "--pack", str(rng.choice([1, 1, 4, 10]))]
        if self.samples > 1 and rng.random() < 0.5:
            base.append("--adaptive")
        if self.cap is not None:
            base += ["--max-cost", str(self.cap)]
        return [*base, *extra]


@pytest.mark.timeout(900)
def test_money_adds_up_across_features(sandbox_factory, tmp_path: Path) -> None:
    box = sandbox_factory(
        latency=0.03, label_wrong=0.15, label_out_of_set=0.25, label_prose=0.1, fail_5xx=0.03, seed=7,
        pack_missing=0.1, pack_broken=0.1, pack_prose=0.1, pack_fenced=0.1,
    )  # fmt: skip
    kills = 0
    for seq in range(SEQUENCES):
        s = Sequence(tmp_path, seq)
        box.sandbox.stats.clear()
        for _ in range(s.rng.randint(2, 5)):
            step = s.rng.choice(["run", "retry", "reparse", "kill", "kill"])
            if step == "kill":
                proc = spawn(s.args(), env=box.env())
                time.sleep(s.rng.uniform(0.9, 1.8))
                proc.send_signal(signal.SIGKILL)
                proc.communicate(timeout=30)
                kills += 1
            elif step == "reparse":
                if s.out.with_name(s.out.name + ".batchllm").exists() and "mixed" not in s.labels:
                    s.labels.append("mixed")
                    assert run_cli(s.args("--reparse"), env=box.env()).exit_code in (0, 1, 3)
            else:
                extra = ("--retry-errors",) if step == "retry" else ()
                result = run_cli(s.args(*extra), env=box.env())
                assert result.exit_code in (0, 1, 3), result.output
        # The last run writes the output (a run killed last would leave none to compare).
        result = run_cli(s.args("--retry-errors"), env=box.env())
        assert result.exit_code in (0, 1, 3), result.output
        _check(box, s.out, s.cap, seq)
    assert kills >= 10  # the mix did kill runs mid-flight
