"""Starting a sandbox: on a loopback port in the running loop, the endpoint each provider is
given for it, and serving until a signal (``batchllm sandbox``)."""

from __future__ import annotations

import asyncio
import signal

from aiohttp import web

from ..pricing import Model
from .config import SandboxConfig
from .core import Sandbox

PATHS = {"dataoorts": "/api/v1", "openai": "/v1"}


def endpoint_for(base_url: str, provider: str) -> str:
    """The endpoint a provider is given for a sandbox at ``base_url``."""
    return base_url + PATHS[provider]


async def start_sandbox(
    config: SandboxConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    models: dict[str, Model] | None = None,
) -> tuple[web.AppRunner, Sandbox, str]:
    """Start the sandbox in the running loop; returns (runner, sandbox, base URL).

    The base URL (``http://127.0.0.1:PORT``) + ``/api/v1`` is the Dataoorts face, + ``/v1`` the
    OpenAI provider's endpoint.
    """
    sandbox = Sandbox(config, models)
    runner = web.AppRunner(sandbox.app(), access_log=None, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096)
    await site.start()
    # The bound port (port 0 picks a free one): aiohttp exposes it only through the server.
    sockets = getattr(site._server, "sockets", None)
    assert sockets, "the sandbox did not bind"
    bound = sockets[0].getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return runner, sandbox, f"http://{shown}:{bound}"


async def until_stopped() -> None:
    """Wait for SIGINT or SIGTERM (``batchllm sandbox`` serves until then)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
