"""The sandbox: a local emulator of the Dataoorts API and of OpenAI-compatible servers."""

from collections.abc import Callable

from .config import SandboxConfig
from .core import Sandbox
from .serving import PATHS, endpoint_for, start_sandbox, until_stopped
from .words import WORDS

__all__ = ["PATHS", "WORDS", "Sandbox", "SandboxConfig", "endpoint_for", "serve", "start_sandbox"]


async def serve(config: SandboxConfig, host: str, port: int, ready: Callable[[str], None]) -> None:
    """Serve until SIGINT or SIGTERM; ``ready(base_url)`` is called once listening."""
    runner, _, base = await start_sandbox(config, host, port)
    try:
        ready(base)
        await until_stopped()
    finally:
        await runner.shutdown()
        await runner.cleanup()
