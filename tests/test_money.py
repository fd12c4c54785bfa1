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

A second set of sequences runs over a fleet of three sandboxes, each billing at its endpoint's
prices (``billed_pico``): the fleet changed between runs, runs killed, an endpoint dying mid-run,
review verdicts imported, pilots whose rows the cache partly answers. There the ledger's runs of
the output add up to the same figure too, and their maybe-billed figures to what ``status`` says.
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
from .test_review import _studio_export

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


def _figures(out: Path) -> tuple[int, int, int, int, int]:
    """The output's cost as its rows, `report`, the summary and `status` give it (picodollars),
    and the worst case `status` says a kill may have left billed."""
    rows = pq.read_table(out).to_pylist()
    rows_pico = sum(
        round(Decimal(repr(r["cost_usd"])) * PICO_PER_USD) for r in rows if r["cost_usd"] is not None
    )
    report = run_cli(["report", str(out), "--format", "json"])
    assert report.exit_code == 0, report.output
    report_pico = _pico(orjson.loads(report.output)["overall"]["cost_usd"])
    summary_pico = _pico(summary_of(out)["cost_usd"]["total"])
    status_pico, lost_worst = _status_cost(out)
    return rows_pico, report_pico, summary_pico, status_pico, lost_worst


def _check(box, out: Path, cap: Decimal | None, seq: int) -> None:
    rows_pico, report_pico, summary_pico, status_pico, lost_worst = _figures(out)
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


# -- fleets, review imports and pilots answered from the cache ------------------------------------

ENDPOINTS = {"cheap": ("0.20", "0.20"), "mid": ("0.31", "0.34"), "dear": ("0.60", "0.80")}
FLEET_ENTRY = """
[[endpoint]]
name = "{name}"
provider = "openai"
endpoint = "{url}"
key_env = "KEY_{name}"
model = "meta-llama/Llama-3.1-70B-Instruct"
rpm = 6000
concurrency = {concurrency}
input_price = "{input}"
output_price = "{output}"
"""
# Texts shared by the sequences: a later sequence's pilot or run finds some in the cache.
POOL = [
    f"Shared item {i}: " + " ".join(random.Random(i).choices(["fine", "late", "loud", "soft"], k=5))
    for i in range(40)
]


def _per_token(usd: str) -> int:
    return int(Decimal(usd) * PICO_PER_USD) // 1_000_000


def _fleet_file(path: Path, boxes: dict, names: list[str]) -> Path:
    path.write_text(
        "".join(
            FLEET_ENTRY.format(name=n, url=boxes[n].openai_url, concurrency=3, input=ENDPOINTS[n][0],
                               output=ENDPOINTS[n][1])
            for n in names
        )
    )  # fmt: skip
    return path


def _ledger_pico(out: Path) -> tuple[int, int, list[dict]]:
    """(cost, maybe billed) the ledger's runs of this output add up to, and the runs."""
    result = run_cli(["spend", "--runs", "--since", "7d", "--format", "json"])
    assert result.exit_code == 0, result.output
    runs = [r for r in orjson.loads(result.output)["runs"] if r["output"] == str(out)]
    return (
        sum(_pico(r["cost_usd"] or "0") for r in runs),
        sum(_pico(r.get("maybe_billed_usd") or "0") for r in runs),
        runs,
    )


def _check_fleet(boxes: dict, out: Path, seq: int, steps: list[str]) -> None:
    rows_pico, report_pico, summary_pico, status_pico, lost_worst = _figures(out)
    ledger_pico, ledger_lost, runs = _ledger_pico(out)
    billed = sum(b.sandbox.stats["billed_pico"] for b in boxes.values())
    where = (
        f"sequence {seq} {steps}: rows {rows_pico}, report {report_pico}, status {status_pico}, "
        f"summary {summary_pico}, ledger {ledger_pico}"
    )
    assert rows_pico == report_pico == status_pico == summary_pico == ledger_pico, f"{where}; runs {runs}"
    assert 0 <= billed - rows_pico <= lost_worst, f"{where}, billed {billed}, maybe billed {lost_worst}"
    assert ledger_lost == lost_worst, f"{where}: the ledger's maybe billed {ledger_lost}, status {lost_worst}"


def _review(out: Path, tmp_path: Path, rng: random.Random) -> None:
    """Reviewers judge a few random picks (Label Studio's JSON export), imported into the output."""
    tasks_file = tmp_path / "tasks.json"
    result = run_cli(["review", "export", str(out), "--pick", "random:6", "--seed", str(rng.randint(0, 99)),
                      "-o", str(tasks_file)])  # fmt: skip
    assert result.exit_code == 0, result.output
    tasks = orjson.loads(tasks_file.read_bytes())
    verdicts: dict[str, str | None] = {t["data"]["row_id"]: rng.choice(LABELS) for t in tasks}
    export = tmp_path / "export.json"
    export.write_bytes(orjson.dumps(_studio_export(tasks, verdicts, cancelled=set())))
    result = run_cli(["review", "import", str(out), "--from", str(export)])
    assert result.exit_code == 0, result.output


@pytest.mark.timeout(1200)
def test_money_adds_up_over_fleets_reviews_and_pilots(sandbox_factory, tmp_path: Path) -> None:
    """Sequences over a fleet of three sandboxes, each billing at its endpoint's prices: runs over
    the whole fleet or a changed one, runs killed, an endpoint dying mid-run (dropping every
    connection), verdicts imported from a review, pilots (some rows answered from the cache
    earlier sequences filled); then every figure, the ledger's too, against the bill."""
    boxes = {
        name: sandbox_factory(
            latency=0.25, jitter=0.5, label_wrong=0.15, label_out_of_set=0.2, fail_5xx=0.03, seed=11 + k,
            prices=(_per_token(price[0]), _per_token(price[1]), _per_token(price[0])),
        )
        for k, (name, price) in enumerate(ENDPOINTS.items())
    }  # fmt: skip
    env = {f"KEY_{n}": b.key for n, b in boxes.items()}
    fleets = {
        "all": _fleet_file(tmp_path / "all.toml", boxes, ["cheap", "mid", "dear"]),
        "changed": _fleet_file(tmp_path / "changed.toml", boxes, ["dear", "mid"]),
    }
    seen: list[str] = []
    cached = 0
    for seq in range(12):
        rng = random.Random(5000 + seq)
        rows = [{"id": f"f{seq}r{i}", "text": rng.choice(POOL) if rng.random() < 0.5 else f"Seq {seq} row {i}"}
                for i in range(rng.randint(20, 36))]  # fmt: skip
        src = write_csv(tmp_path / f"fin{seq}.csv", rows)
        out = tmp_path / f"fout{seq}.parquet"
        pack = rng.choice(["1", "1", "4"])

        def args(fleet: str, *extra: str, src=src, out=out, pack=pack) -> list[str]:
            return ["run", str(src), "-o", str(out), "--template", "Classify: {text}", "--id-column", "id",
                    "--labels", ",".join(LABELS), "--max-tokens", "16", "--temperature", "0", "--pack", pack,
                    "--reask", "1", "--fleet", str(fleets[fleet]), "--progress", "none", *extra]  # fmt: skip

        for box in boxes.values():
            box.sandbox.stats.clear()
        steps: list[str] = []
        for _ in range(rng.randint(2, 5)):
            step = rng.choice(["run", "changed", "kill", "die", "review", "pilot"])
            steps.append(step)
            if step in ("kill", "die"):
                proc = spawn(args("all"), env=env)
                time.sleep(rng.uniform(1.0, 2.5))
                if step == "kill":
                    proc.send_signal(signal.SIGKILL)
                    proc.communicate(timeout=30)
                else:  # the cheapest endpoint dies: every connection dropped until the run ends
                    boxes["cheap"].config.fail_drop = 1.0
                    proc.communicate(timeout=300)
                    assert proc.returncode in (0, 1, 4), proc.stderr
                    boxes["cheap"].config.fail_drop = 0.0
            elif step == "review":
                if out.exists():
                    _review(out, tmp_path, rng)
                    _check_fleet(boxes, out, seq, steps)  # an import keeps the output's summary
            elif step == "pilot":
                pilot = ["estimate", *args("all")[1:-2], "--pilot", str(rng.randint(4, 12))]
                result = run_cli(pilot, env=env)
                assert result.exit_code == 0, result.output
            else:
                result = run_cli(args("all" if step == "run" else "changed"), env=env)
                assert result.exit_code in (0, 1), result.output
        result = run_cli(args("all", "--retry-errors"), env=env)
        assert result.exit_code in (0, 1), result.output
        _check_fleet(boxes, out, seq, steps)
        seen += steps
        cached += sum(bool(r["cached"]) for r in pq.read_table(out).to_pylist())
    assert {"changed", "kill", "die", "review", "pilot"} <= set(seen)
    assert cached > 0  # rows were answered from the cache the earlier sequences filled


@pytest.mark.parametrize("labels", [False, True], ids=["rows", "labels"])
def test_a_server_that_counts_more_prompt_tokens_never_passes_the_cap(
    sandbox_factory, tmp_path: Path, labels: bool
) -> None:
    # A server that adds 1,000 prompt tokens of its own to each request (its own template or
    # system prompt) bills every reply about 20 times the worst case batchllm reserved for it.
    # The first reply shows it: from then on every request reserves that much more, so the
    # second goes and the third, which no longer fits, does not. (Each reserved its own worst
    # case alone, and the cap was passed by one request, and by up to --concurrency of them.)
    box = sandbox_factory(extra_prompt_tokens=1000)
    data = write_csv(tmp_path / "in.csv", [{"id": f"r{i}", "text": f"item {i}: fine"} for i in range(20)])
    out = tmp_path / "out.parquet"
    one = 1020 * PRICES.input_pico + 32 * PRICES.output_pico  # about what one request costs
    cap = Decimal(2 * one + one // 2) / PICO_PER_USD
    args = ["run", str(data), "-o", str(out), "--template", "Say: {text}", "--id-column", "id",
            "--max-tokens", "32", "--concurrency", "1", "--max-cost", str(cap)]  # fmt: skip
    if labels:
        args += ["--labels", ",".join(LABELS)]
    result = run_cli(args, env=box.env())
    assert result.exit_code == 3, result.output
    assert _billed(box) <= _pico(str(cap))
    assert box.sandbox.stats["requests"] == 2
    assert "more than their worst case" in result.output
    table = pq.read_table(out).to_pylist()
    assert sum(_pico(repr(r["cost_usd"])) for r in table if r["cost_usd"] is not None) == _billed(box)


@pytest.mark.parametrize("pack", [None, "5"], ids=["rows", "labels_in_packs"])
def test_many_in_flight_on_a_server_that_counts_more_stop_at_the_cap_not_before(
    sandbox_factory, tmp_path: Path, pack: str | None
) -> None:
    # The same server at --concurrency 64: the first request goes alone, its reply sets the
    # margin (one reply's excess, not one per reply of a first wave: that margin grew with each
    # and stopped runs at a quarter of their cap), then the rest go with it. The bill stays
    # under the cap and comes within two requests of it.
    box = sandbox_factory(extra_prompt_tokens=1000)
    data = write_csv(tmp_path / "in.csv", [{"id": f"r{i}", "text": f"item {i}: fine"} for i in range(200)])
    out = tmp_path / "out.parquet"
    args = ["run", str(data), "-o", str(out), "--template", "Say: {text}", "--id-column", "id",
            "--max-tokens", "32", "--concurrency", "64", "--rpm", "0"]  # fmt: skip
    if pack:
        args += ["--labels", ",".join(LABELS), "--pack", pack]
    first = run_cli([*args, "--max-cost", "1"], env=box.env())  # what one request costs, uncapped
    assert first.exit_code == 0, first.output
    requests, billed = box.sandbox.stats["requests"], _billed(box)
    one = billed // requests
    cap = Decimal(12 * one) / PICO_PER_USD
    result = run_cli([*args, "--max-cost", str(cap), "-o", str(tmp_path / "capped.parquet")], env=box.env())
    assert result.exit_code == 3, result.output
    spent = _billed(box) - billed
    assert spent <= _pico(str(cap))
    assert spent >= _pico(str(cap)) - 3 * one, (spent, one, result.output)
    said = re.search(r"replies cost up to \$([\d.]+) more than their worst case", result.output)
    assert said is not None, result.output
    assert _pico(said.group(1)) <= 1100 * PRICES.input_pico  # about one reply's 1,000 tokens
