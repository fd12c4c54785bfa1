"""Against a real OpenAI-compatible server no one here wrote: the LiteLLM proxy, on loopback.

The proxy (a dev dependency) serves a model whose ``mock_response`` is set, so it answers real
OpenAI-shaped replies and errors with no network and no weights. It differs from the sandbox:
its usage is a fixed mock count (not the Llama 3 tokenizer's), it always says ``finish_reason:
stop``, it states no rate limits, and it checks keys against its own master key.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from .conftest import ROOT, run_cli

MASTER_KEY = "sk-litellm-test-7d1c"
CONFIG = f"""
model_list:
  - model_name: meta/llama-3.1-70b-instruct
    litellm_params:
      model: openai/meta/llama-3.1-70b-instruct
      api_key: unused
      mock_response: "positive"
general_settings:
  master_key: {MASTER_KEY}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def litellm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("litellm")
    (folder / "config.yaml").write_text(CONFIG)
    port = _free_port()
    env = {
        "PATH": str(Path(sys.executable).parent),
        "HOME": str(folder),
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    }
    log = open(folder / "proxy.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "litellm"),
            "--config",
            "config.yaml",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=folder,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(base + "/health/liveliness", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "the LiteLLM proxy did not start: " + (folder / "proxy.log").read_text()[-2000:]
                    ) from None
                time.sleep(0.25)
        yield base + "/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_the_sample_job_against_litellm(litellm: str, sandbox, tmp_path: Path) -> None:
    out, reference = tmp_path / "o.parquet", tmp_path / "d.parquet"
    job = ["run", "--job", str(ROOT / "jobs" / "one_word_sentiment.toml"), "--rpm", "0"]
    assert run_cli([*job, "-o", str(reference)], env=sandbox.env()).exit_code == 0
    env = {"OPENAI_API_KEY": MASTER_KEY}
    result = run_cli(
        [
            *job,
            "-o",
            str(out),
            "--provider",
            "openai",
            "--endpoint",
            litellm,
            "--input-price",
            "0.31",
            "--output-price",
            "0.34",
        ],
        env=env,
    )
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table.schema.remove_metadata() == pq.read_table(reference).schema.remove_metadata()
    rows = table.to_pylist()
    assert len(rows) == 200 and all(r["status"] == "ok" and r["response"] == "positive" for r in rows)
    assert not any(r["truncated"] for r in rows)  # finish_reason "stop", whatever the counts
    for r in rows:
        assert r["cost_usd"] == pytest.approx(
            (r["prompt_tokens"] * 0.31 + r["completion_tokens"] * 0.34) / 1e6
        )


def test_a_missing_key_stops_with_exit_4(litellm: str, tmp_path: Path) -> None:
    """No key is sent (none is set, and openai servers may need none): LiteLLM answers 401."""
    out = tmp_path / "o.parquet"
    result = run_cli(
        [
            "run",
            "--job",
            str(ROOT / "jobs" / "one_word_sentiment.toml"),
            "-o",
            str(out),
            "--provider",
            "openai",
        ]
        + ["--endpoint", litellm, "--input-price", "0.31", "--output-price", "0.34"],
    )
    assert result.exit_code == 4, result.output
    assert "rejected the key" in result.output and "OPENAI_API_KEY" in result.output
    assert all(r["status"] == "pending" for r in pq.read_table(out).to_pylist())
