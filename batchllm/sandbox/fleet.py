"""A fleet of sandboxes in one process (issue 23): ``run --fleet F --sandbox`` and
``batchllm sandbox --fleet F``.

Each endpoint of the fleet file gets a sandbox of its own on its own loopback port: the face of
its provider, its model (served under the file's name), its ``rpm`` as the server's rate limit,
its prices as what it bills (``billed_pico`` in its stats), and a fresh key when the file names a
key variable (none asked for otherwise, like a local vLLM). The fleet handed back points at
them, so a run takes exactly the path a real fleet takes: its own client, limiter and key for
each endpoint, over real HTTP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from ..fleet import FleetEndpoint
from .config import SandboxConfig
from .core import Sandbox
from .replies import served_models
from .serving import endpoint_for, start_sandbox, until_stopped

UNLISTED_WINDOW = 131_072  # tokens: a model the table does not list, served here anyway


@dataclasses.dataclass
class SandboxFleet:
    """The fleet as served here, the keys its variables would hold, and the sandboxes."""

    endpoints: tuple[FleetEndpoint, ...]
    keys: dict[str, str]  # key_env -> the sandbox's key
    boxes: dict[str, Sandbox]  # endpoint name -> its sandbox


def config_for(spec: FleetEndpoint, base: SandboxConfig | None) -> SandboxConfig:
    """``base`` (latency, faults...) with the endpoint's rate limit, prices and key."""
    prices = spec.model.prices
    return dataclasses.replace(
        base or SandboxConfig(),
        api_key="sandbox-" + secrets.token_hex(8),
        require_key=spec.key_env is not None,
        rate_limit=spec.rpm / 60.0 if spec.rpm else 0.0,
        prices=None if prices is None else (prices.input_pico, prices.output_pico, prices.cached_input_pico),
    )


@contextlib.asynccontextmanager
async def sandbox_fleet(
    fleet: tuple[FleetEndpoint, ...],
    base: SandboxConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
) -> AsyncIterator[SandboxFleet]:
    """Serve one sandbox per endpoint (on ``port``, ``port + 1``... or free ports for 0) until
    the block ends."""
    runners: list[web.AppRunner] = []
    served, keys, boxes = [], {}, {}
    try:
        for n, spec in enumerate(fleet):
            config = config_for(spec, base)
            models = served_models()
            if spec.model.name not in models:  # a model of the file's own: served with a wide window
                models[spec.model.name] = dataclasses.replace(
                    spec.model, context_window=spec.model.context_window or UNLISTED_WINDOW
                )
            runner, box, url = await start_sandbox(config, host, port + n if port else 0, models)
            runners.append(runner)
            served.append(dataclasses.replace(spec, endpoint=endpoint_for(url, spec.provider)))
            boxes[spec.name] = box
            if spec.key_env:
                keys[spec.key_env] = config.api_key
        yield SandboxFleet(tuple(served), keys, boxes)
    finally:
        for runner in runners:
            await runner.cleanup()


async def serve_fleet(
    fleet: tuple[FleetEndpoint, ...],
    config: SandboxConfig,
    host: str,
    port: int,
    ready: Callable[[SandboxFleet], None],
) -> None:
    """``batchllm sandbox --fleet``: serve until SIGINT or SIGTERM; ``ready`` once listening."""
    async with sandbox_fleet(fleet, config, host, port) as served:
        ready(served)
        await until_stopped()
