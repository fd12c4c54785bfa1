"""The sandbox: a local emulator of the Dataoorts API and of OpenAI-compatible servers."""

import asyncio
import signal
from collections.abc import Callable

from .core import WORDS, Sandbox, SandboxConfig, start_sandbox

PATHS = {"dataoorts": "/api/v1", "openai": "/v1"}


def endpoint_for(base_url: str, provider: str) -> str:
    """The endpoint a provider is given for a sandbox at ``base_url``."""
    return base_url + PATHS[provider]


__all__ = ["PATHS", "WORDS", "Sandbox", "SandboxConfig", "endpoint_for", "serve", "start_sandbox"]


async def serve(config: SandboxConfig, host: str, port: int, ready: Callable[[str], None]) -> None:
    """Serve until SIGINT or SIGTERM; ``ready(base_url)`` is called once listening."""
    runner, _, base = await start_sandbox(config, host, port)
    ready(base)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.shutdown()
        await runner.cleanup()
