"""Shared fixtures: the sandbox over real loopback HTTP, and helpers to run the CLI.

The sandbox runs in a thread with its own event loop, so the CLI under test (which calls
``asyncio.run`` itself) talks to it over a real socket exactly as it would to the API.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result

from batchllm.cli import cli
from batchllm.sandbox import Sandbox, SandboxConfig, start_sandbox

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent / "batchllm"
TEST_KEY = "test-key-0f9e8d7c6b5a"
# The request on the provider's page for the model (docs/api.md), as JSON.
# The test files that take longest (seconds of a full run on two cores: ray 380, fleet 270,
# readme 210, inflight 175, faults 155, ledger 145, resume 110, money 105; the rest under 55),
# run first: `make test` hands files to its workers in collection order, and one of these
# started last ran alone for minutes at the end.
SLOW_FIRST = [
    "test_ray.py",
    "test_fleet.py",
    "test_readme.py",
    "test_inflight.py",
    "test_faults.py",
    "test_ledger.py",
    "test_resume.py",
    "test_money.py",
    "test_studio.py",
    "test_llamacpp.py",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files keep their order


PAGE_EXAMPLE = {
    "model": "meta/llama-3.1-70b-instruct",
    "data": {
        "messages": [
            {"role": "system", "content": "You are an expert deep learning engineer"},
            {"role": "user", "content": "What is Deep Learning"},
        ],
        "temperature": 0.1,
        "top_p": 0.9,
        "top_k": 40,
        "max_tokens": 512,
    },
}


# No test inherits a key or an endpoint from the machine it runs on.
_CLEAN_ENV = {"DATAOORTS_API_KEY": "", "DATAOORTS_ENDPOINT": "", "OPENAI_API_KEY": "", "OPENAI_BASE_URL": ""}


class SandboxThread:
    """A sandbox served from a background thread; ``url`` and ``key`` for clients."""

    def __init__(self, config: SandboxConfig, port: int = 0) -> None:
        self.config = config
        self.port = port  # 0: a free one
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.base = ""
        self.url = ""  # the Dataoorts face
        self.openai_url = ""  # the OpenAI provider's endpoint (base URL)
        self.box: Sandbox | None = None
        self._stop: asyncio.Event | None = None

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        finally:
            # Handlers still running (a hang fault sleeps for an hour) end with the loop, as
            # asyncio.run would end them, instead of being destroyed pending.
            left = asyncio.all_tasks(self.loop)
            for task in left:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    async def _main(self) -> None:
        runner, self.box, self.base = await start_sandbox(self.config, port=self.port)
        self.url = self.base + "/api/v1"
        self.openai_url = self.base + "/v1"
        self._stop = asyncio.Event()
        self.ready.set()
        await self._stop.wait()
        await runner.shutdown()
        await runner.cleanup()

    def start(self) -> SandboxThread:
        self.thread.start()
        assert self.ready.wait(10), "sandbox did not start"
        return self

    def stop(self) -> None:
        if self.loop.is_closed():  # stopped already (a test took an endpoint down)
            return
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(10)

    @property
    def key(self) -> str:
        return self.config.api_key

    @property
    def sandbox(self) -> Sandbox:
        assert self.box is not None
        return self.box

    def log(self) -> list[tuple[float, int, str]]:
        return list(self.sandbox.log)

    def count(self, status: int | None = None) -> int:
        stats = self.sandbox.stats
        return stats["requests"] if status is None else stats[str(status)]

    def env(self) -> dict[str, str]:
        return {"DATAOORTS_ENDPOINT": self.url, "DATAOORTS_API_KEY": self.key}

    def openai_env(self) -> dict[str, str]:
        return {"OPENAI_BASE_URL": self.openai_url, "OPENAI_API_KEY": self.key}


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own response cache and spend ledger (never the user's, never another
    test's)."""
    folder = tmp_path_factory.mktemp("xdg-cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(folder))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg-data")))
    monkeypatch.delenv("BATCHLLM_LEDGER", raising=False)
    return folder / "batchllm"


@pytest.fixture
def sandbox_factory() -> Iterator[Callable[..., SandboxThread]]:
    started: list[SandboxThread] = []

    def make(port: int = 0, **options: Any) -> SandboxThread:
        options.setdefault("api_key", TEST_KEY)
        box = SandboxThread(SandboxConfig(**options), port).start()
        started.append(box)
        return box

    yield make
    for box in started:
        box.stop()


@pytest.fixture
def sandbox(sandbox_factory: Callable[..., SandboxThread]) -> SandboxThread:
    return sandbox_factory()


def run_cli(args: list[str], env: dict[str, str] | None = None) -> Result:
    """Run the CLI in-process, as ``main()`` would, returning its exit code and output."""
    runner = CliRunner()
    full_env = {**_CLEAN_ENV, **(env or {})}
    result = runner.invoke(cli, args, env=full_env, catch_exceptions=False, standalone_mode=False)
    # standalone_mode=False returns the command's value as the exit code, as main() does.
    if isinstance(result.return_value, int):
        result.exit_code = result.return_value
    return result


def spawn(args: list[str], env: dict[str, str] | None = None, **kwargs: Any) -> subprocess.Popen[str]:
    """Start the real ``batchllm`` executable as a subprocess."""
    full_env = {**os.environ, **_CLEAN_ENV, **(env or {})}
    process = subprocess.Popen(
        [str(BIN), *args], env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )
    _SPAWNED.append(process)
    return process


_SPAWNED: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def reap_spawned() -> Iterator[None]:
    """A test that fails halfway leaves no ``spawn``ed process running into the next test."""
    yield
    while _SPAWNED:
        process = _SPAWNED.pop()
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def prompts_csv(path: Path, n: int, start: int = 0) -> Path:
    return write_csv(
        path,
        [
            {"id": f"id{i}", "prompt": f"Question number {i}: what is {i} + {i}?"}
            for i in range(start, start + n)
        ],
    )


def read_output(path: Path) -> pa.Table:
    return pq.read_table(path)


def summary_of(path: Path) -> dict[str, Any]:
    meta = pq.read_metadata(path).metadata
    return orjson.loads(meta[b"batchllm"])
