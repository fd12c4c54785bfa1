"""The spend ledger across runs and jobs, `batchllm spend`, monthly caps and --notify (issue 22)."""

from __future__ import annotations

import calendar
import csv
import io
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from batchllm.ledger import month_bounds
from batchllm.pricing import parse_usd, usd_text
from batchllm.reports.spend import build_spend

from .conftest import TEST_KEY, prompts_csv, run_cli, spawn, summary_of, write_csv
from .test_prompt_cache import BILL, MINI, job_args, pico
from .test_resume import _wait_for_rows


def _job_file(path: Path, src: Path, *, extra: str = "") -> Path:
    path.write_text(
        f'input = "{src}"\noutput = "{path.parent / "unused.parquet"}"\ntemplate = "Answer briefly: {{prompt}}"\n'
        f"max_tokens = 24\nconcurrency = 20\nrpm = 0\n{extra}"
    )
    return path


def _spend(ledger: Path, *args: str) -> dict[str, Any]:
    result = run_cli(["spend", "--ledger", str(ledger), "--format", "json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _cost(out: Path) -> Decimal:
    return Decimal(summary_of(out)["cost_usd"]["total"])


def test_eight_runs_of_two_jobs_at_once(sandbox_factory, tmp_path: Path) -> None:
    """Runs started together (two killed, one over its monthly cap, one with a wrong key): one
    record each; the killed ones `killed` (not recorded yet) until their output runs again; spend
    per job equals the sum of its outputs' cost_usd exactly."""
    box = sandbox_factory(latency=0.2)
    ledger = tmp_path / "ledger.db"
    src = prompts_csv(tmp_path / "in.csv", 600)
    jobs = {"alpha": _job_file(tmp_path / "alpha.toml", src), "beta": _job_file(tmp_path / "beta.toml", src)}
    plans = [  # job, output, extra flags, environment, kill?
        ("alpha", "a1", [], {}, False),
        ("alpha", "a2", [], {}, True),
        ("alpha", "a3", [], {"DATAOORTS_API_KEY": "sk-wrong-key-for-this-test"}, False),
        ("alpha", "a4", ["--max-cost-per-month", "0.00002"], {}, False),
        ("beta", "b1", [], {}, False),
        ("beta", "b2", [], {}, True),
        ("beta", "b3", ["--pack", "1"], {}, False),
        ("beta", "b4", [], {}, False),
    ]
    procs = []
    for job, name, flags, env, _ in plans:
        out = tmp_path / f"{name}.parquet"
        args = ["run", "--job", str(jobs[job]), "-o", str(out), "--ledger", str(ledger), "--progress", "none"]
        procs.append(spawn(args + flags, env={**box.env(), **env}))
    for (_, name, _, _, kill), proc in zip(plans, procs, strict=True):
        if kill:
            _wait_for_rows(tmp_path / f"{name}.parquet.batchllm" / "journal.sqlite", 40)
            proc.send_signal(signal.SIGKILL)
    codes = {name: proc.wait(timeout=120) for (_, name, *_), proc in zip(plans, procs, strict=True)}
    for proc in procs:
        proc.communicate()
    assert codes["a2"] == codes["b2"] == -signal.SIGKILL
    assert codes["a3"] == 4 and codes["a4"] == 3
    assert all(codes[n] == 0 for n in ("a1", "b1", "b3", "b4")), codes

    runs = _spend(ledger, "--runs")["runs"]
    assert len(runs) == 8 and len({r["run_id"] for r in runs}) == 8
    by_output = {Path(r["output"]).stem: r for r in runs}
    assert {by_output[n]["status"] for n in ("a2", "b2")} == {"killed"}
    assert by_output["a3"]["exit_code"] == 4 and by_output["a4"]["exit_code"] == 3
    assert "monthly budget" in by_output["a4"]["message"]
    assert all(TEST_KEY not in json.dumps(r) and "sk-wrong" not in json.dumps(r) for r in runs)

    # The killed outputs run again: their records are closed from the journal.
    for job, name in (("alpha", "a2"), ("beta", "b2")):
        out = tmp_path / f"{name}.parquet"
        args = ["run", "--job", str(jobs[job]), "-o", str(out), "--ledger", str(ledger)]
        assert run_cli(args, env=box.env()).exit_code == 0
    report = _spend(ledger, "--runs", "--by", "job")
    runs = report["runs"]
    assert len(runs) == 10
    killed = [r for r in runs if r["killed"]]
    assert sorted(Path(r["output"]).stem for r in killed) == ["a2", "b2"]
    assert all(r["status"] == "finished" and Decimal(r["cost_usd"]) > 0 for r in killed)
    assert not [r for r in runs if r["status"] != "finished"]
    outputs = {job: [tmp_path / f"{n}.parquet" for j, n, *_ in plans if j == job] for job in jobs}
    groups = {g["job"]: g for g in report["groups"]}
    for job, outs in outputs.items():
        assert Decimal(groups[job]["cost_usd"]) == sum(_cost(o) for o in outs), job
        assert groups[job]["runs"] == 5
    assert Decimal(report["total"]["cost_usd"]) == sum(Decimal(g["cost_usd"]) for g in report["groups"])


def test_month_cap_holds_across_runs_at_once(sandbox_factory, tmp_path: Path) -> None:
    """Random caps, 10 runs of one job (two waves of five at once): the month's total never
    passes the cap; once it is spent, a run stops with exit 3 having sent nothing."""
    box = sandbox_factory(latency=0.05)
    rng = random.Random(22)
    src = prompts_csv(tmp_path / "in.csv", 120)
    for trial in range(2):
        ledger = tmp_path / f"ledger{trial}.db"
        job = _job_file(tmp_path / f"capped{trial}.toml", src)
        cap = Decimal(rng.randrange(300, 900)) / 100_000  # $0.003 to $0.009: 2 to 5 outputs' worth
        outs, codes = [], []
        for wave in range(2):
            procs = []
            for k in range(5):
                out = tmp_path / f"t{trial}-{wave}-{k}.parquet"
                outs.append(out)
                args = ["run", "--job", str(job), "-o", str(out), "--ledger", str(ledger),
                        "--max-cost-per-month", str(cap), "--progress", "none"]  # fmt: skip
                procs.append(spawn(args, env=box.env()))
            for proc in procs:
                proc.communicate(timeout=120)
                codes.append(proc.returncode)
        assert set(codes) <= {0, 3} and 3 in codes, codes
        spent = sum(_cost(o) for o in outs if o.exists())
        assert spent <= cap, (spent, cap)
        report = _spend(ledger, "--runs")
        assert Decimal(report["total"]["cost_usd"]) == spent
        # The month is spent: one more run stops at once and sends nothing.
        before = box.count()
        extra = tmp_path / f"t{trial}-extra.parquet"
        args = [
            "run",
            "--job",
            str(job),
            "-o",
            str(extra),
            "--ledger",
            str(ledger),
            "--max-cost-per-month",
            str(cap),
        ]
        result = run_cli(args, env=box.env())
        # What is left is less than the worst case of the row that stopped a run: a row or two
        # with a shorter prompt may still fit, no more.
        assert result.exit_code == 3 and box.count() - before <= 2
        assert "resets 20" in result.stderr and "--max-cost-per-month" in result.stderr
        assert sum(_cost(o) for o in [*outs, extra] if o.exists()) <= cap


def test_month_forecast_and_breakdowns(tmp_path: Path) -> None:
    """A ledger of ten $1 days: the rate is $1 a day and the forecast the month's rest at it."""
    ledger = tmp_path / "ledger.db"
    from batchllm.ledger.store import connect

    conn = connect(ledger)
    start, end = month_bounds(calendar.timegm((2026, 11, 15, 0, 0, 0)))  # November 2026
    for day in range(10):
        t = start + day * 86400 + 12 * 3600
        conn.execute(
            "INSERT INTO runs (run_id, kind, job, output, checkpoint, started_at, ended_at, exit_code, "
            "rows_ok, requests, cost_pico, model, provider) VALUES (?, 'run', ?, 'o', 'c', ?, ?, 0, 1000, "
            "1000, ?, 'm', 'p')",
            (f"r{day}", "even" if day % 2 == 0 else "odd", t, t + 60, 10**12),
        )
    conn.close()
    now = start + 9 * 86400 + 13 * 3600  # the tenth day, 13:00 UTC
    report = build_spend(ledger, start, now + 1, ["job", "week"], False, now=now)
    m = report["month"]
    assert m["month"] == "2026-11" and Decimal(m["spent_usd"]) == 10
    assert Decimal(m["daily_rate_usd"]) == 1
    left = Decimal(end - now) / 86400
    assert abs(Decimal(m["forecast_usd"]) - (10 + left)) < Decimal("0.000001")
    assert sum(g["runs"] for g in report["groups"]) == 10
    assert {g["job"] for g in report["groups"]} == {"even", "odd"}
    per = {x["job"]: x for x in report["cost_per_1k_rows"]}
    assert per["even"]["cost_per_1k_rows_usd"] == "1.00"
    # Text, Markdown and CSV carry the same figures.
    for fmt in ("text", "markdown", "csv"):
        result = run_cli(["spend", "--ledger", str(ledger), "--since", "2026-11-01", "--until", "2026-11-30",
                          "--by", "day", "--format", fmt])  # fmt: skip
        assert result.exit_code == 0 and "2026-11-07" in result.stdout
    bad = run_cli(["spend", "--ledger", str(ledger), "--since", "last tuesday"])
    assert bad.exit_code == 2 and "last tuesday" in bad.stderr and "Traceback" not in bad.stderr
    missing = run_cli(["spend", "--ledger", str(tmp_path / "none.db")])
    assert missing.exit_code == 2 and "no ledger" in missing.stderr


class Receiver:
    """A local collector: records every POST (path, body); ``hang`` never answers."""

    def __init__(self, hang: bool = False) -> None:
        import socket
        import threading

        self.posts: list[tuple[str, dict[str, Any]]] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.hang = hang
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import http.client

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            data = b""
            conn.settimeout(5)
            try:
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(
                    http.client.parse_headers(__import__("io").BytesIO(head.split(b"\r\n", 1)[1]))[
                        "Content-Length"
                    ]
                )
                while len(body) < length:
                    body += conn.recv(65536)
                if self.hang:
                    time.sleep(30)
                    continue
                self.posts.append((head.split(b" ")[1].decode(), json.loads(body)))
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            except OSError:
                pass
            finally:
                conn.close()

    def close(self) -> None:
        self.sock.close()


def _notify_run(
    tmp_path: Path, box: Any, name: str, url: str, *extra: str, env: dict[str, str] | None = None
) -> tuple[int, float, dict[str, Any]]:
    src = tmp_path / f"{name}.csv"
    if not src.exists():
        prompts_csv(src, 30)
    out = tmp_path / f"{name}.parquet"
    summary = tmp_path / f"{name}.summary.json"
    args = ["run", str(src), "-o", str(out), "--rpm", "0", "--notify", url, "--summary-json", str(summary),
            "--progress", "none", *extra]  # fmt: skip
    proc = spawn(args, env={**box.env(), **(env or {})})
    proc.communicate(timeout=60)
    ended = time.time()
    doc = json.loads(summary.read_text())
    return proc.returncode, ended, doc


def test_notify_posts_once_per_run_whatever_its_exit_code(sandbox, tmp_path: Path) -> None:
    receiver = Receiver()
    try:
        url = receiver.url + "/ping/{exit_code}"
        codes = []
        code, _, doc = _notify_run(tmp_path, sandbox, "ok", url)
        codes.append(code)
        over = tmp_path / "over.csv"
        over.write_text("prompt\nshort one\n" + "word " * 25_000 + "\nshort two\n")
        codes.append(_notify_run(tmp_path, sandbox, "over", url)[0])
        codes.append(_notify_run(tmp_path, sandbox, "capped", url, "--max-cost", "0.00001")[0])
        codes.append(
            _notify_run(tmp_path, sandbox, "badkey", url, env={"DATAOORTS_API_KEY": "sk-not-the-key"})[0]
        )
        assert codes == [0, 1, 3, 4]
        assert [p for p, _ in receiver.posts] == ["/ping/0", "/ping/1", "/ping/3", "/ping/4"]
        for (_, body), code in zip(receiver.posts, codes, strict=True):
            assert body["exit_code"] == code and body["text"].startswith("batchllm job")
            assert "this_run" in body and "cost_usd" in body
            assert TEST_KEY not in json.dumps(body) and "sk-not-the-key" not in json.dumps(body)
        assert receiver.posts[0][1]["rows"] == doc["rows"]
    finally:
        receiver.close()


def test_notify_never_holds_the_exit(sandbox, tmp_path: Path) -> None:
    """The receiver refusing connections, or taking them and never answering: the run exits with
    its own code within 10 s of finishing."""
    hanging = Receiver(hang=True)
    import socket

    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    refused = f"http://127.0.0.1:{free.getsockname()[1]}/"
    free.close()
    try:
        for name, url, extra, want in (
            ("refused", refused, [], 0),
            ("hanging", hanging.url + "/", ["--max-cost", "0.00001"], 3),
        ):
            code, ended, doc = _notify_run(tmp_path, sandbox, name, url, *extra)
            assert code == want
            finished = calendar.timegm(time.strptime(doc["finished_at"], "%Y-%m-%dT%H:%M:%SZ"))
            assert ended - finished < 10 + 1.5, ended - finished  # the summary's time is to the second
    finally:
        hanging.close()


def test_notify_from_an_environment_variable_and_bad_values(sandbox, tmp_path: Path) -> None:
    receiver = Receiver()
    try:
        src = prompts_csv(tmp_path / "in.csv", 5)
        job = tmp_path / "job.toml"
        job.write_text(
            f'input = "{src}"\noutput = "{tmp_path / "o.parquet"}"\nnotify = "HOOK_URL"\nrpm = 0\n'
        )
        assert (
            run_cli(
                ["run", "--job", str(job)], env={**sandbox.env(), "HOOK_URL": receiver.url + "/h"}
            ).exit_code
            == 0
        )
        assert [p for p, _ in receiver.posts] == ["/h"]
        unset = run_cli(["run", "--job", str(job)], env=sandbox.env())
        assert unset.exit_code == 2 and "HOOK_URL" in unset.stderr and "not set" in unset.stderr
        bad = run_cli(
            ["run", str(src), "-o", str(tmp_path / "b.parquet"), "--notify", "ftp://x/secret-token"],
            env=sandbox.env(),
        )
        assert bad.exit_code == 2 and "secret-token" not in bad.stderr
    finally:
        receiver.close()


def test_pilot_and_import_are_recorded(sandbox, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.db"
    src = prompts_csv(tmp_path / "in.csv", 40)
    out = tmp_path / "out.parquet"
    base = [str(src), "-o", str(out), "--template", "Answer briefly: {prompt}", "--ledger", str(ledger)]
    assert run_cli(["estimate", *base, "--pilot", "10"], env=sandbox.env()).exit_code == 0
    assert run_cli(["run", *base, "--rpm", "0"], env=sandbox.env()).exit_code == 0
    runs = _spend(ledger, "--runs")["runs"]
    assert [r["kind"] for r in runs] == ["pilot", "run"]
    assert runs[0]["rows_ok"] == 10 and runs[1]["rows_ok"] == 30
    assert sum(Decimal(r["cost_usd"]) for r in runs) == _cost(out)
    assert runs[0]["endpoint_host"] == "127.0.0.1"
    off = run_cli(
        ["run", *base[:-2], "--ledger", "off", "-o", str(tmp_path / "x.parquet"), "--rpm", "0"],
        env=sandbox.env(),
    )
    assert off.exit_code == 0 and len(_spend(ledger, "--runs")["runs"]) == 2


def test_spend_page_draws_in_headless_chromium(sandbox, tmp_path: Path) -> None:
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("no Chromium on this machine")
    ledger = tmp_path / "ledger.db"
    src = prompts_csv(tmp_path / "in.csv", 30)
    for job in ("nightly", "weekly"):
        jf = _job_file(tmp_path / f"{job}.toml", src)
        args = ["run", "--job", str(jf), "-o", str(tmp_path / f"{job}.parquet"), "--ledger", str(ledger)]
        assert run_cli(args, env=sandbox.env()).exit_code == 0
    page = tmp_path / "spend.html"
    assert run_cli(["spend", "--ledger", str(ledger), "--by", "job", "--html", str(page)]).exit_code == 0
    text = page.read_text()
    assert "<script" not in text and "http" not in text.replace("http-equiv", "")
    png = tmp_path / "spend.png"
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,900",
         f"--screenshot={png}", page.as_uri()],
        capture_output=True, timeout=90, check=False,
    )  # fmt: skip
    width, height, pixels = _read_png(png.read_bytes())
    counts: dict[tuple[int, int, int], int] = {}
    for px in pixels:
        counts[px] = counts.get(px, 0) + 1
    blue, orange = (0x3B, 0x6E, 0xA5), (0xE0, 0x8A, 0x2E)  # the two jobs' colours (svg.PALETTE)
    assert counts.get(blue, 0) > 200 and counts.get(orange, 0) > 200, (counts.get(blue), counts.get(orange))


def _read_png(data: bytes) -> tuple[int, int, list[tuple[int, int, int]]]:
    """Decode an 8-bit RGB or RGBA PNG (what Chromium writes) into RGB pixels."""
    import struct
    import zlib

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    width = height = channels = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, chunk = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", chunk[:10])
            assert depth == 8 and colour in (2, 6)
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    prev = bytearray(stride)
    out: list[tuple[int, int, int]] = []
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b, c = prev[i], prev[i - channels] if i >= channels else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        out.extend(tuple(line[i : i + 3]) for i in range(0, stride, channels))  # type: ignore[misc]
        prev = line
    return width, height, out


def test_ledger_schema_is_safe_with_writers_at_once(tmp_path: Path) -> None:
    """Forty processes' worth of records written from threads at once: none lost, none doubled."""
    import threading

    from batchllm.ledger import RunRecord, Snapshot

    ledger = tmp_path / "ledger.db"
    errors: list[str] = []

    def one(i: int) -> None:
        rec = RunRecord.begin(ledger, kind="run", job=f"j{i % 3}", output=tmp_path / f"o{i}.parquet",
                              checkpoint=tmp_path / f"o{i}.batchllm", provider="p", endpoint="http://127.0.0.1:1/v1",
                              model="m", engine="local", rows_total=1, start=Snapshot(), lost=(0, 0),
                              warn=errors.append)  # fmt: skip
        rec.finish(
            {"exit_code": 0, "this_run": {"requests": 1}}, Snapshot(), Snapshot(10**9 + i, 1, 1, 1, 0, 0)
        )

    threads = [threading.Thread(target=one, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    with sqlite3.connect(ledger) as conn:
        assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT run_id), SUM(cost_pico) FROM runs").fetchone() == (
            40, 40, sum(10**9 + i for i in range(40)))  # fmt: skip


def test_sandbox_runs_are_play_money(sandbox, tmp_path: Path) -> None:
    """A --sandbox run is marked in the ledger: never in `spend`'s totals or month unless asked
    (--sandbox shows them alone), never counted by a monthly cap (a sandbox run's cap counts the
    real month and itself); a ledger from before the mark gets it on its next write."""
    ledger = tmp_path / "ledger.db"
    job = _job_file(tmp_path / "same.toml", prompts_csv(tmp_path / "in.csv", 40))
    common = ["--job", str(job), "--ledger", str(ledger), "--cache", "off"]
    play = tmp_path / "play.parquet"
    assert run_cli(["run", *common, "--sandbox", "-o", str(play)]).exit_code == 0
    played = _cost(play)
    # A real run of the same job (a quarter of its rows), capped below what the sandbox spent.
    cap = str(played * 6 / 10)
    real = tmp_path / "real.parquet"
    few = prompts_csv(tmp_path / "few.csv", 10)
    result = run_cli(
        ["run", str(few), *common, "-o", str(real), "--max-cost-per-month", cap], env=sandbox.env()
    )
    assert result.exit_code == 0 and 0 < _cost(real) < played * 6 / 10, result.output
    # A sandbox run under a cap the earlier play money already passed starts (none of it counts)
    # and stops where the real month and its own spend meet the cap, said as such.
    again = tmp_path / "again.parquet"
    capped = run_cli(["run", *common, "--sandbox", "-o", str(again), "--max-cost-per-month", cap])
    assert capped.exit_code == 3 and "play money counts in no cap" in capped.stderr, capped.output
    # Said as what it is: the real runs' money, this sandbox run's apart, and why it stopped.
    said = re.search(
        r"real runs have spent or hold \$([\d.]+) of its \$([\d.]+) cap this month and this sandbox "
        r"run \$([\d.]+) .*the next request may cost up to \$([\d.]+), more than the \$([\d.]+) left",
        capped.stderr,
    )
    assert said is not None, capped.stderr
    real_usd, cap_usd, run_usd, next_usd, left_usd = (Decimal(x) for x in said.groups())
    assert real_usd == _cost(real) and cap_usd == Decimal(cap)
    assert left_usd == cap_usd - real_usd - run_usd < next_usd, capped.stderr
    assert 0 < _cost(again) <= played * 6 / 10 - _cost(real), capped.output
    spent_in_play = played + (_cost(again) if again.exists() else 0)

    report = _spend(ledger, "--runs", "--by", "job")
    assert Decimal(report["total"]["cost_usd"]) == _cost(real) == Decimal(report["month"]["spent_usd"])
    assert [Path(r["output"]).name for r in report["runs"]] == ["real.parquet"]
    assert report["left_out"] == {"runs": 2, "cost_usd": str(spent_in_play), "unpriced_runs": 0}
    alone = _spend(ledger, "--sandbox", "--runs")
    assert Decimal(alone["total"]["cost_usd"]) == spent_in_play == Decimal(alone["month"]["spent_usd"])
    assert {Path(r["output"]).name for r in alone["runs"]} == {"play.parquet", "again.parquet"}
    text = run_cli(["spend", "--ledger", str(ledger)]).output
    assert "left out: 2 sandbox runs" in text and "spend --sandbox" in text

    # A ledger from before the mark: `spend` reads it the same, the next run gives it the column.
    old = tmp_path / "old.db"
    with sqlite3.connect(ledger) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    old.write_bytes(ledger.read_bytes())
    with sqlite3.connect(old) as conn:
        conn.execute("ALTER TABLE runs DROP COLUMN sandbox")
    assert _spend(old, "--by", "job")["total"] == _spend(ledger, "--by", "job")["total"]
    assert _spend(old, "--sandbox")["total"] == _spend(ledger, "--sandbox")["total"]
    more = run_cli(["run", str(few), *common[:2], "--ledger", str(old), "-o", str(real)], env=sandbox.env())
    assert more.exit_code == 0, more.output
    with sqlite3.connect(old) as conn:
        marks = conn.execute("SELECT output, sandbox FROM runs ORDER BY started_at").fetchall()
    assert [(Path(o).name, s) for o, s in marks] == [
        ("play.parquet", 1), ("real.parquet", 0), ("again.parquet", 1), ("real.parquet", 0)]  # fmt: skip


def test_a_served_sandbox_is_play_money_too(tmp_path: Path) -> None:
    """`batchllm sandbox` served and used through --endpoint, as a user tests a pipeline: its
    answers say they are the sandbox's, so the run is play money as a --sandbox run is."""
    port_file, ledger = tmp_path / "port", tmp_path / "ledger.db"
    server = spawn(["sandbox", "--port", "0", "--port-file", str(port_file), "--api-key", "k"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (port_file.exists() and port_file.read_text()):
        time.sleep(0.05)
    try:
        url = f"http://127.0.0.1:{port_file.read_text()}/v1"
        out = tmp_path / "served.parquet"
        args = ["run", str(prompts_csv(tmp_path / "in.csv", 10)), "-o", str(out), "--provider", "openai",
                "--endpoint", url, "--ledger", str(ledger), "--rpm", "0", "--progress", "none",
                "--input-price", "0.31", "--output-price", "0.34"]  # fmt: skip
        result = run_cli(args, env={"OPENAI_API_KEY": "k"})
        assert result.exit_code == 0, result.output
        assert _cost(out) > 0
        report = _spend(ledger, "--runs")
        assert Decimal(report["total"]["cost_usd"]) == 0 and report["runs"] == []
        assert report["left_out"] == {"runs": 1, "cost_usd": str(_cost(out)), "unpriced_runs": 0}
        alone = _spend(ledger, "--sandbox", "--runs")
        assert [Path(r["output"]).name for r in alone["runs"]] == ["served.parquet"]
    finally:
        server.terminate()
        server.communicate(timeout=10)


LOCAL_MODEL = "meta-llama/Llama-3.1-8B-Instruct"  # served by the sandbox, in no openai price table


def _openai_run(box, src: Path, out: Path, ledger: Path, *extra: str) -> None:
    args = ["run", str(src), "-o", str(out), "--provider", "openai", "--model", LOCAL_MODEL, "--rpm", "0",
            "--template", "Answer briefly: {prompt}", "--ledger", str(ledger), "--progress", "none", *extra]  # fmt: skip
    result = run_cli(args, env=box.openai_env())
    assert result.exit_code == 0, result.output


def test_a_run_without_prices_costs_unknown_never_zero(sandbox, tmp_path: Path) -> None:
    """A self-hosted model with no price: `spend` shows its run's cost as unknown and leaves it
    out of every sum of money (saying so), so the total is the priced run's cost exactly."""
    ledger, src = tmp_path / "ledger.db", prompts_csv(tmp_path / "in.csv", 30)
    local, paid = tmp_path / "local.parquet", tmp_path / "paid.parquet"
    _openai_run(sandbox, src, local, ledger)
    assert summary_of(local)["cost_usd"]["total"] is None
    _openai_run(sandbox, src, paid, ledger, "--input-price", "0.31", "--output-price", "0.34")
    assert _cost(paid) > 0

    report = _spend(ledger, "--by", "job", "--runs")
    total = report["total"]
    assert Decimal(total["cost_usd"]) == _cost(paid) == Decimal(report["month"]["spent_usd"])
    assert total["runs"] == 1 and total["rows_ok"] == 30
    unknown = summary_of(local)["tokens"]
    assert total["unpriced"] == {"runs": 1, "rows_ok": 30, "requests": 30, "prompt_tokens": unknown["prompt"],
                                 "completion_tokens": unknown["completion"]}  # fmt: skip
    assert report["month"]["unpriced"] == {"runs": 1, "rows_ok": 30}
    assert Decimal(report["month"]["forecast_usd"]) >= _cost(paid)
    runs = {Path(r["output"]).stem: r for r in report["runs"]}
    assert runs["local"]["cost_usd"] is None and runs["local"]["priced"] is False
    assert Decimal(runs["paid"]["cost_usd"]) == _cost(paid) and runs["paid"]["priced"] is True
    groups = {g["job"]: g for g in report["groups"]}
    assert groups["local"]["cost_usd"] is None and groups["local"]["priced"] is False
    assert groups["local"]["rows_ok"] == 30 and Decimal(groups["paid"]["cost_usd"]) == _cost(paid)
    per = {x["job"]: x for x in report["cost_per_1k_rows"]}
    assert per["local"]["cost_per_1k_rows_usd"] is None and per["local"]["unpriced"]["runs"] == 1
    assert per["paid"]["cost_per_1k_rows_usd"] == usd_text(
        parse_usd(str(_cost(paid))) * 1000 // 30
    )  # priced rows

    text = run_cli(["spend", "--ledger", str(ledger), "--by", "job", "--runs"]).output
    lines = text.splitlines()
    assert [ln for ln in lines if ln.lstrip().startswith("local") and "unknown (no price)" in ln]
    assert [ln for ln in lines if ln.lstrip().startswith("total") and "+ 1 unpriced run (30 rows)" in ln]
    assert "so far + 1 unpriced run (30 rows), cost unknown" in text and "priced runs" in text
    assert not [ln for ln in lines if "local" in ln and ("$0 " in ln or ln.rstrip().endswith("$0"))]
    csv_text = run_cli(["spend", "--ledger", str(ledger), "--by", "job", "--format", "csv"]).output
    assert "local,1,30,30," in csv_text and csv_text.splitlines()[-1].endswith(",,false")
    page = tmp_path / "spend.html"
    assert run_cli(["spend", "--ledger", str(ledger), "--html", str(page)]).exit_code == 0
    assert "unknown (no price)" in page.read_text() and "1 unpriced run (30 rows)" in page.read_text()


def test_a_ledger_from_before_prices_were_marked(sandbox, tmp_path: Path) -> None:
    """A ledger without the ``priced`` column reads as it did, every run priced; the next run to
    write to it adds the column, its earlier runs priced."""
    ledger, src = tmp_path / "ledger.db", prompts_csv(tmp_path / "in.csv", 20)
    paid = tmp_path / "paid.parquet"
    _openai_run(sandbox, src, paid, ledger, "--input-price", "0.31", "--output-price", "0.34")
    old = tmp_path / "old.db"
    with sqlite3.connect(ledger) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    old.write_bytes(ledger.read_bytes())
    with sqlite3.connect(old) as conn:
        conn.execute("ALTER TABLE runs DROP COLUMN priced")
    before = _spend(old, "--runs", "--by", "model")
    now = _spend(ledger, "--runs", "--by", "model")
    for key in ("total", "groups", "runs", "cost_per_1k_rows", "left_out"):
        assert before[key] == now[key], key
    assert before["month"]["spent_usd"] == now["month"]["spent_usd"] and before["month"]["unpriced"] is None
    assert Decimal(before["total"]["cost_usd"]) == _cost(paid) and before["total"]["unpriced"] is None
    assert [r["priced"] for r in before["runs"]] == [True] and before["groups"][0]["priced"] is True

    _openai_run(sandbox, src, tmp_path / "local.parquet", old)  # no prices: unpriced
    with sqlite3.connect(old) as conn:
        marks = conn.execute("SELECT output, priced FROM runs ORDER BY started_at").fetchall()
    assert [(Path(o).name, p) for o, p in marks] == [("paid.parquet", 1), ("local.parquet", 0)]
    after = _spend(old)
    assert Decimal(after["total"]["cost_usd"]) == _cost(paid) and after["total"]["unpriced"]["runs"] == 1


def test_a_killed_run_without_prices_is_priced_by_the_run_that_prices_its_rows(
    sandbox_factory, tmp_path: Path
) -> None:
    """An unpriced run killed halfway; the next run of its output, with prices, prices the rows
    it left (engine/reopen.py) and closes its record from the journal: that record has a cost
    now, so the output's runs add up to its cost_usd."""
    box = sandbox_factory(latency=0.2)
    ledger, src = tmp_path / "ledger.db", prompts_csv(tmp_path / "in.csv", 300)
    out = tmp_path / "out.parquet"
    args = ["run", str(src), "-o", str(out), "--provider", "openai", "--model", LOCAL_MODEL, "--rpm", "0",
            "--template", "Answer briefly: {prompt}", "--ledger", str(ledger), "--progress", "none"]  # fmt: skip
    proc = spawn(args, env=box.openai_env())
    _wait_for_rows(tmp_path / "out.parquet.batchllm" / "journal.sqlite", 20)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    _openai_run(box, src, out, ledger, "--input-price", "0.31", "--output-price", "0.34")
    report = _spend(ledger, "--runs")
    assert [r["priced"] for r in report["runs"]] == [True, True] and report["runs"][0]["killed"]
    assert Decimal(report["runs"][0]["cost_usd"]) > 0
    assert Decimal(report["total"]["cost_usd"]) == _cost(out) and report["total"]["unpriced"] is None


def test_a_finished_run_without_prices_is_priced_by_the_run_that_prices_its_rows(
    sandbox, tmp_path: Path
) -> None:
    """An unpriced run that finished; the next run of its output, with prices and more rows,
    prices the rows it left: its record has their cost, so the runs add up to the output's."""
    ledger, src = tmp_path / "ledger.db", prompts_csv(tmp_path / "in.csv", 30)
    out = tmp_path / "out.parquet"
    _openai_run(sandbox, src, out, ledger)
    prompts_csv(src, 40)
    _openai_run(sandbox, src, out, ledger, "--input-price", "0.31", "--output-price", "0.34")
    report = _spend(ledger, "--runs")
    assert [r["priced"] for r in report["runs"]] == [True, True]
    first, second = (Decimal(r["cost_usd"]) for r in report["runs"])
    assert first > 0 and second > 0 and first + second == _cost(out)
    assert Decimal(report["total"]["cost_usd"]) == _cost(out) and report["total"]["unpriced"] is None


def _kill_after(args: list[str], env: dict[str, str], journal: Path, rows: int) -> None:
    """Start a run as a real process and SIGKILL it once its journal holds ``rows`` replies."""
    proc = spawn(args, env=env)
    _wait_for_rows(journal, rows)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)


def test_a_served_sandbox_run_with_no_answer_is_play_money(sandbox_factory, tmp_path: Path) -> None:
    """Every request to a served sandbox times out: no answer says "sandbox", so the run asks the
    server (one HEAD of its root, a local host only) and is play money all the same: out of
    `spend`'s real money, and no real run's --max-cost-per-month counts what it may have cost."""
    served, real = sandbox_factory(marked=True, latency=2.0), sandbox_factory()
    ledger, src = tmp_path / "ledger.db", prompts_csv(tmp_path / "in.csv", 12)
    job = _job_file(tmp_path / "same.toml", src)
    common = ["--job", str(job), "--ledger", str(ledger), "--cache", "off", "--progress", "none"]
    slow = ["run", "-o", str(tmp_path / "slow.parquet"), *common, "--timeout", "0.3", "--max-attempts", "1"]
    result = run_cli(slow, env=served.env())
    assert result.exit_code != 0 and "timeout" in result.output
    with sqlite3.connect(ledger) as conn:
        assert conn.execute("SELECT sandbox, maybe_billed_pico > 150000000 FROM runs").fetchall() == [(1, 1)]
    report = _spend(ledger, "--runs")
    assert report["runs"] == [] and report["left_out"]["runs"] == 1
    few = prompts_csv(tmp_path / "few.csv", 5)
    capped = [
        "run",
        str(few),
        "-o",
        str(tmp_path / "real.parquet"),
        *common,
        "--max-cost-per-month",
        "0.0002",
    ]
    result = run_cli(capped, env=real.env())
    assert result.exit_code == 0, result.output


def test_a_killed_served_sandbox_run_is_play_money_and_holds_no_real_cap(
    sandbox_factory, tmp_path: Path
) -> None:
    """A run against `batchllm sandbox` served (its answers marked) is play money from its first
    answer, not from its end: killed, it stays out of `spend`'s real money, and neither its claim
    on the month (open) nor its cost (closed by the next run of its output) holds a real run of
    the same job back under --max-cost-per-month."""
    served, real = sandbox_factory(marked=True, latency=0.2), sandbox_factory()
    ledger, src = tmp_path / "ledger.db", prompts_csv(tmp_path / "in.csv", 600)
    job = _job_file(tmp_path / "pm.toml", src)
    common = ["--job", str(job), "--provider", "openai", "--input-price", "0.31", "--output-price", "0.34",
              "--ledger", str(ledger), "--cache", "off", "--progress", "none"]  # fmt: skip
    play = tmp_path / "play.parquet"
    # Capped at $1 it claims a chunk of the month ($0.005) more than the real runs' cap below.
    played = ["run", "-o", str(play), *common, "--max-cost-per-month", "1"]
    _kill_after(played, served.openai_env(), tmp_path / "play.parquet.batchllm" / "journal.sqlite", 20)
    with sqlite3.connect(ledger) as conn:
        assert conn.execute("SELECT sandbox, ended_at, claim_pico > 4000000000 FROM runs").fetchall() == [
            (1, None, 1)
        ]
    report = _spend(ledger, "--runs")
    assert report["runs"] == [] and Decimal(report["total"]["cost_usd"]) == 0
    assert report["left_out"]["runs"] == 1

    cap = ["--max-cost-per-month", "0.004"]
    first = tmp_path / "real.parquet"
    few = str(prompts_csv(tmp_path / "few.csv", 10))
    result = run_cli(["run", few, "-o", str(first), *common, *cap], env=real.openai_env())
    assert result.exit_code == 0, result.output
    # The next run of the killed one's output closes its record from the journal: play money still.
    again = run_cli(["run", "-o", str(play), *common], env=served.openai_env())
    assert again.exit_code == 0, again.output
    second = tmp_path / "real2.parquet"
    more = str(prompts_csv(tmp_path / "more.csv", 12))
    result = run_cli(["run", more, "-o", str(second), *common, *cap], env=real.openai_env())
    assert result.exit_code == 0, result.output

    report = _spend(ledger, "--runs")
    assert [Path(r["output"]).name for r in report["runs"]] == ["real.parquet", "real2.parquet"]
    assert Decimal(report["total"]["cost_usd"]) == _cost(first) + _cost(second)
    assert Decimal(report["month"]["spent_usd"]) == _cost(first) + _cost(second)
    assert report["left_out"]["runs"] == 2
    alone = _spend(ledger, "--sandbox", "--runs")
    assert [r["killed"] for r in alone["runs"]] == [True, False]
    assert Decimal(alone["total"]["cost_usd"]) == _cost(play)

    # Marked once answered, a served sandbox run's own cap counts the real month and itself.
    room = str(_cost(first) + _cost(second) + Decimal("0.0005"))
    capped = run_cli(["run", "-o", str(tmp_path / "capped.parquet"), *common, "--max-cost-per-month", room],
                     env=served.openai_env())  # fmt: skip
    assert capped.exit_code == 3 and "play money counts in no cap but its own" in capped.stderr, capped.output
    real_usd = re.search(r"real runs have spent or hold \$([\d.]+) of its", capped.stderr)
    assert real_usd is not None and Decimal(real_usd.group(1)) == _cost(first) + _cost(second)


@pytest.mark.parametrize("fleet", [False, True], ids=["one endpoint", "fleet"])
def test_a_killed_runs_requests_are_what_its_journal_shows_it_sent(
    sandbox_factory, tmp_path: Path, fleet: bool
) -> None:
    """Killed before its first progress write, a run's record still counts every request it
    sent: the replies its journal saved and the requests its in-flight log left open (exactly:
    the two runs of the output sent every row once, and those in flight at the kill again)."""
    boxes = [sandbox_factory(latency=0.2) for _ in range(2 if fleet else 1)]
    ledger, src, out = (
        tmp_path / "ledger.db",
        prompts_csv(tmp_path / "in.csv", 1500),
        tmp_path / "out.parquet",
    )
    args = ["run", str(src), "-o", str(out), "--ledger", str(ledger), "--cache", "off", "--progress", "none"]
    if fleet:
        members = "".join(
            f'[[endpoint]]\nname = "e{i}"\nprovider = "openai"\nendpoint = "{box.openai_url}"\n'
            f'key_env = "E{i}_KEY"\nmodel = "meta/llama-3.1-70b-instruct"\nconcurrency = 16\nrpm = 60000\n'
            f'input_price = "0.{i + 1}"\noutput_price = "0.{i + 1}"\n\n'
            for i, box in enumerate(boxes)
        )
        (tmp_path / "fleet.toml").write_text(members)
        args += ["--fleet", str(tmp_path / "fleet.toml")]
        env = {f"E{i}_KEY": box.key for i, box in enumerate(boxes)}
    else:
        args += ["--provider", "openai", "--input-price", "0.31", "--output-price", "0.34", "--rpm", "0"]
        env = boxes[0].openai_env()
    journal = tmp_path / "out.parquet.batchllm" / "journal.sqlite"
    _kill_after(args, env, journal, 20)
    with sqlite3.connect(journal) as conn:
        saved, attempts = conn.execute("SELECT COUNT(*), SUM(attempts) FROM rows").fetchone()
    assert 20 <= saved < 1500
    result = run_cli(args, env=env)
    assert result.exit_code == 0, result.output

    runs = _spend(ledger, "--runs")["runs"]
    assert [r["killed"] for r in runs] == [True, False]
    assert runs[0]["requests"] >= attempts >= saved
    with sqlite3.connect(ledger) as conn:
        (lost,) = conn.execute("SELECT maybe_billed_requests FROM runs ORDER BY started_at").fetchone()
    assert runs[0]["requests"] == attempts + lost
    # The server saw them all but those the kill cut before they reached it or it answered.
    assert (
        runs[0]["requests"] + runs[1]["requests"] == 1500 + lost >= sum(box.count() for box in boxes) >= 1500
    )
    assert runs[0]["prompt_tokens"] > 0 and runs[0]["rows_ok"] == saved


def test_a_refresh_of_changed_rows_counts_the_rows_it_answered(sandbox, tmp_path: Path) -> None:
    """--refresh-changed answers edited rows in place of their entries: the ledger's run counts
    them (it said 0 rows, so its cost per 1,000 rows was unknown), and the runs' costs add up."""
    ledger = tmp_path / "ledger.db"
    rows = [{"id": f"r{i}", "prompt": f"Question {i}?"} for i in range(20)]
    src = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out.parquet"
    base = [str(src), "-o", str(out), "--id-column", "id", "--ledger", str(ledger), "--rpm", "0"]
    assert run_cli(["run", *base], env=sandbox.env()).exit_code == 0
    for r in rows[:5]:
        r["prompt"] += " Answer in French."
    write_csv(src, rows)
    refreshed = run_cli(["run", *base, "--refresh-changed"], env=sandbox.env())
    assert refreshed.exit_code == 0, refreshed.output
    runs = _spend(ledger, "--runs")["runs"]
    assert [r["rows_ok"] for r in runs] == [20, 5]
    assert sum(Decimal(r["cost_usd"]) for r in runs) == _cost(out)


def test_bad_input_found_mid_run_is_recorded_with_its_exit_code(sandbox, tmp_path: Path) -> None:
    """An empty id past the first batch of rows stops the run with exit 2 after it paid for that
    batch: the ledger records exit 2, the reason, the requests and their cost (it said "exit
    None, the run failed" and 0 requests)."""
    ledger = tmp_path / "ledger.db"
    rows = [{"id": str(i), "prompt": f"Question {i}?"} for i in range(8300)] + [{"id": "", "prompt": "no id"}]
    src = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out.parquet"
    args = ["run", str(src), "-o", str(out), "--id-column", "id", "--rpm", "0", "--ledger", str(ledger)]
    result = run_cli(args, env=sandbox.env())
    assert result.exit_code == 2 and "row 8301 has no value in the --id-column 'id'" in result.stderr
    (run,) = _spend(ledger, "--runs")["runs"]
    assert run["exit_code"] == 2 and "row 8301 has no value" in run["message"]
    assert run["requests"] == sandbox.count() == run["rows_ok"] > 0
    assert Decimal(run["cost_usd"]) > 0


def test_a_killed_runs_cached_tokens_are_recorded_from_the_journal(sandbox_factory, tmp_path: Path) -> None:
    """A run killed halfway through a job whose prompts share a cached prefix: the next run of its
    output closes its record from the journal with its cached prompt tokens and what they saved,
    as with its tokens and cost, so the output's runs add up to the output's cached tokens and
    saving, and spend's total adds it (the saving was $0 for the killed run)."""
    box = sandbox_factory(latency=0.2, prices=BILL)
    ledger, out = tmp_path / "ledger.db", tmp_path / "out.parquet"
    args = [*job_args(tmp_path, 400, "out.parquet", "--concurrency", "8"), "--ledger", str(ledger),
            "--cache", "off", "--progress", "none"]  # fmt: skip
    _kill_after(args, box.openai_env(), tmp_path / "out.parquet.batchllm" / "journal.sqlite", 40)
    result = run_cli(args, env=box.openai_env())
    assert result.exit_code == 0, result.output
    spend = _spend(ledger, "--runs")
    runs = spend["runs"]
    assert [r["killed"] for r in runs] == [True, False]
    assert runs[0]["cached_tokens"] >= 1024
    summary = summary_of(out)
    assert sum(r["cached_tokens"] for r in runs) == summary["tokens"]["cached"] > 0
    discount = MINI.input_pico - MINI.cached_input_pico
    assert pico(runs[0]["cached_saved_usd"]) == runs[0]["cached_tokens"] * discount
    saved = pico(summary["tokens"]["cached_saved_usd"])  # the requests lost in the kill: not in it
    assert sum(pico(r["cached_saved_usd"]) for r in runs) == saved == summary["tokens"]["cached"] * discount
    assert pico(spend["prompt_cache"]["saved_usd"]) == saved


def _spend_text(ledger: Path, *args: str) -> str:
    result = run_cli(["spend", "--ledger", str(ledger), *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_a_killed_run_not_recorded_yet_is_killed_in_every_list_and_format(
    sandbox_factory, tmp_path: Path
) -> None:
    """SIGKILLed, its process gone (not yet reaped by its parent, then reaped), a run whose record
    its output's next run has not closed yet is `killed` in the runs and in the runs that failed
    or were killed, in text, JSON and CSV, with a note: its figures are its last progress, and
    running its output again records it. On another host it is taken to be running."""
    sandbox = sandbox_factory(latency=0.2)
    ledger, src = tmp_path / "ledger.db", prompts_csv(tmp_path / "in.csv", 600)
    out = tmp_path / "out.parquet"
    args = ["run", str(src), "-o", str(out), "--ledger", str(ledger), "--cache", "off", "--progress", "none"]
    proc = spawn(args, env=sandbox.env())
    _wait_for_rows(tmp_path / "out.parquet.batchllm" / "journal.sqlite", 20)
    proc.send_signal(signal.SIGKILL)
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # dead, and a zombie until reaped

    def check() -> None:
        report = _spend(ledger, "--runs")
        (run,) = report["runs"]
        (problem,) = report["problems"]["runs"]
        assert run["status"] == problem["status"] == "killed" and run["killed"] and problem["killed"]
        assert run["note"] == problem["note"] and str(out) in run["note"] and "batchllm run" in run["note"]
        assert "last progress" in run["note"] and report["problems"]["count"] == 1
        text = _spend_text(ledger, "--runs")
        assert text.count("killed (not recorded yet)") == 2 and not re.search(r"  running  ", text)
        assert f"-o {out}) resumes it" in text
        rows = list(csv.DictReader(io.StringIO(_spend_text(ledger, "--runs", "--format", "csv"))))
        assert [(r["status"], r["note"]) for r in rows] == [("killed", run["note"])]

    check()
    proc.communicate(timeout=60)  # reaped: gone for good
    check()
    elsewhere = tmp_path / "elsewhere.db"
    with sqlite3.connect(ledger) as conn, sqlite3.connect(elsewhere) as copy:
        conn.backup(copy)
        copy.execute("UPDATE runs SET host = 'another-host'")
    far = _spend(elsewhere, "--runs")
    assert far["runs"][0]["status"] == "running" and far["runs"][0]["note"] is None
    assert far["problems"]["count"] == 0

    result = run_cli(args, env=sandbox.env())  # resumes it: the killed run is recorded
    assert result.exit_code == 0, result.output
    runs = _spend(ledger, "--runs")["runs"]
    assert [(r["status"], r["killed"], r["note"]) for r in runs] == [("finished", True, None),
                                                                      ("finished", False, None)]  # fmt: skip
    assert "killed (closed from the journal)" in _spend_text(ledger, "--runs")


def test_a_killed_runs_claim_on_the_month_is_named_where_it_stops_a_run(
    sandbox_factory, tmp_path: Path
) -> None:
    """A run of a capped job killed while it holds a claim on the month: a run of the same job on
    another output that the claim leaves no room stops (exit 3) saying which output's killed run
    holds it and that running that output again settles it; it does, and the run then fits."""
    sandbox = sandbox_factory(latency=0.2)
    ledger, src = tmp_path / "ledger.db", prompts_csv(tmp_path / "in.csv", 400)
    job = _job_file(tmp_path / "capped.toml", src)
    common = ["--job", str(job), "--ledger", str(ledger), "--cache", "off", "--progress", "none"]
    held = tmp_path / "held.parquet"
    # Capped at $2, it claims a chunk of the month ($0.01) beyond its need: more than the cap below.
    first = ["run", "-o", str(held), *common, "--max-cost-per-month", "2"]
    _kill_after(first, sandbox.env(), tmp_path / "held.parquet.batchllm" / "journal.sqlite", 20)
    few = str(prompts_csv(tmp_path / "few.csv", 10))
    other = ["run", few, "-o", str(tmp_path / "other.parquet"), *common, "--max-cost-per-month", "0.01"]
    stopped = run_cli(other, env=sandbox.env())
    assert stopped.exit_code == 3, stopped.output
    message = " ".join(stopped.stderr.split())
    assert re.search(
        rf"is held by a run of {re.escape(str(held))} that was killed before it recorded what it spent: "
        rf"running that output again \(batchllm run \.\.\. -o {re.escape(str(held))}\) records it and "
        "settles its claim",
        message,
    ), message
    again = run_cli(["run", "-o", str(held), *common], env=sandbox.env())
    assert again.exit_code == 0, again.output
    result = run_cli(other, env=sandbox.env())
    assert result.exit_code == 0, result.output


def test_a_killed_runs_spend_survives_a_restart_of_its_output(sandbox_factory, tmp_path: Path) -> None:
    """SIGKILL, then --restart: the discarded journal is what the killed run's record is closed
    from (the fresh one would give it $0), so `spend` and the month hold everything billed."""
    box = sandbox_factory(latency=0.2)
    ledger, src, out = tmp_path / "ledger.db", prompts_csv(tmp_path / "in.csv", 300), tmp_path / "o.parquet"
    args = ["run", str(src), "-o", str(out), "--rpm", "0", "--concurrency", "8", "--ledger", str(ledger)]
    _kill_after(args, box.env(), tmp_path / "o.parquet.batchllm" / "journal.sqlite", 40)
    with sqlite3.connect(tmp_path / "o.parquet.batchllm" / "journal.sqlite") as conn:
        killed_pico = conn.execute("SELECT SUM(input_cost_pico + output_cost_pico) FROM rows").fetchone()[0]
    result = run_cli([*args, "--restart"], env=box.env())
    assert result.exit_code == 0, result.output
    runs = _spend(ledger, "--runs")["runs"]
    assert [r["killed"] for r in runs] == [True, False]
    assert Decimal(runs[0]["cost_usd"]) * 10**12 == killed_pico > 0
    billed = box.sandbox.stats["prompt_tokens"] * 310_000 + box.sandbox.stats["completion_tokens"] * 340_000
    maybe = Decimal(runs[0].get("maybe_billed_usd") or 0) * 10**12
    assert killed_pico + _cost(out) * 10**12 <= billed <= killed_pico + _cost(out) * 10**12 + maybe


def test_a_killed_runs_spend_survives_its_journal_deleted(sandbox_factory, tmp_path: Path) -> None:
    """SIGKILL, then the user starts over: ``rm -rf OUTPUT*`` and the same run again. The journal
    the killed run wrote in is gone, so its record keeps its last progress, marked as a lower
    bound: a cost > 0 and at most what the sandbox billed for it, with its rows ok (never the
    $0.00 the new, empty journal would give it). Before that, its open record shows its rows ok
    beside its cost, so its job has a cost per 1,000 rows."""
    box = sandbox_factory(latency=0.2, prices=(310_000, 340_000))
    ledger, src, out = tmp_path / "ledger.db", prompts_csv(tmp_path / "in.csv", 200), tmp_path / "r9.parquet"
    args = ["run", str(src), "-o", str(out), "--template", "R9:{prompt}", "--max-tokens", "8", "--rpm", "0",
            "--concurrency", "8", "--ledger", str(ledger), "--cache", "off", "--progress", "none"]  # fmt: skip
    proc = spawn(args, env=box.env())
    _wait_for_rows(tmp_path / "r9.parquet.batchllm" / "journal.sqlite", 30)
    time.sleep(1.5)  # a progress record or two after the first replies
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    time.sleep(0.5)  # what the sandbox answered after the kill is billed too: the bound is above it
    billed, sent = box.sandbox.stats["billed_pico"], box.count()

    report = _spend(ledger, "--runs")  # not closed yet: its last progress, rows ok included
    (open_run,) = report["runs"]
    assert open_run["status"] == "killed" and 0 < pico(open_run["cost_usd"]) <= billed
    assert 0 < open_run["rows_ok"] <= open_run["requests"] <= sent
    (rate,) = report["cost_per_1k_rows"]
    assert rate["rows_ok"] == open_run["rows_ok"] and rate["cost_per_1k_rows_usd"] is not None

    for gone in tmp_path.glob("r9.parquet*"):  # the user starting over
        shutil.rmtree(gone) if gone.is_dir() else gone.unlink()
    result = run_cli(args, env=box.env())
    assert result.exit_code == 0, result.output
    killed, again = _spend(ledger, "--runs")["runs"]
    assert killed["killed"] and not again["killed"] and killed["status"] == "finished"
    cost = pico(killed["cost_usd"])
    assert cost == pico(open_run["cost_usd"]) and 0 < cost <= billed  # a lower bound of its bill
    assert (killed["rows_ok"], killed["requests"]) == (open_run["rows_ok"], open_run["requests"])
    assert killed["message"] == (
        f"killed: its journal was gone when the next run of its output started; at least "
        f"${killed['cost_usd']}, as last recorded"
    )
    assert pico(again["cost_usd"]) == pico(str(_cost(out))) > 0
    assert cost + pico(again["cost_usd"]) <= box.sandbox.stats["billed_pico"]
    text = _spend_text(ledger, "--runs")
    assert "killed (journal gone: its last progress)" in text and f"at least ${killed['cost_usd']}" in text
