"""One endpoint of a fleet as the router's pool uses it (router.py): its own limiter, client and
concurrency, its bench and probe state, what it did in the run (``Counts``), and the job's body
re-encoded for its provider and model (``rebody``), without the optional fields its provider has
none of or it refused (refusable.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import orjson

from ..errors import FatalAPIError
from ..fleet import FleetEndpoint
from ..pricing import Model, usd_text
from ..providers import Provider, get_provider
from ..records import Completion
from .client import Client
from .ratelimit import RateLimiter
from .refusable import Refusable, dropped, taken_by

MARGIN = 0.99  # of an endpoint's stated rpm
BENCH_S = 5.0  # an endpoint's first bench (router.py doubles it while it keeps failing)


def rebody(body: bytes, source: Provider, target: Provider, model: str, drop: tuple[str, ...] = ()) -> bytes:
    """A body encoded by ``source`` as ``target`` would encode it, for ``model``, without ``drop``."""
    payload = orjson.loads(body)
    if source.name == "dataoorts":
        fields = payload["data"]
    else:
        fields = {k: v for k, v in payload.items() if k != "model"}
    for name in drop:
        fields.pop(name, None)
    if target.name == "dataoorts":
        return orjson.dumps({"model": model, "data": fields})
    return orjson.dumps({"model": model, **fields})


@dataclasses.dataclass
class Counts:
    """What one endpoint did in this run (the summary's and report's per-endpoint lines)."""

    requests: int = 0
    ok: int = 0
    errors: int = 0
    throttled: int = 0
    latency_ms: float = 0.0
    cost_pico: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def describe(self, out: str | None = None) -> dict[str, Any]:
        """The summary's line for the endpoint (``out``: why it left the run, if it did)."""
        return {
            "requests": self.requests,
            "ok": self.ok,
            "errors": self.errors,
            "throttled": self.throttled,
            "mean_latency_ms": round(self.latency_ms / self.ok, 1) if self.ok else None,
            "cost_usd": usd_text(self.cost_pico),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "out": out,
        }


class Member:
    """One endpoint of the fleet, as the pool uses it."""

    def __init__(
        self,
        spec: FleetEndpoint,
        key: str | None,
        timeout: float,
        primary: Provider,
        primary_model: str,
        fields: tuple[str, ...] = (),
        warn: Callable[[str], None] = lambda m: None,
        required: tuple[str, ...] = (),
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.provider = get_provider(spec.provider)
        # The job's optional fields (response_format, logprobs): those its provider takes, each
        # on until it refuses it; the others never sent to it.
        taken = taken_by(self.provider, fields)
        self.refusable = Refusable(taken, warn, spec.name, required) if taken else None
        self._never = tuple(f for f in fields if f not in taken)
        self.model: Model = spec.model
        # Paced a hair under its stated limit: arrivals jitter on the way, and a server that counts
        # them exactly would answer the early ones 429 at 100%.
        rpm = spec.rpm * MARGIN if spec.rpm else None
        self.limiter = RateLimiter(
            rpm, spec.tpm, auto=spec.rpm is None, start_rpm=self.provider.documented_rpm
        )
        self.client = Client(
            self.provider, spec.endpoint, key, concurrency=spec.concurrency, timeout=timeout,
            on_hints=self.limiter.on_hints if self.limiter.rate is not None else None,
        )  # fmt: skip
        self.concurrency = spec.concurrency
        self.in_flight = 0
        self.failures = 0
        self.benched_until = 0.0
        self.bench_s = BENCH_S
        self.probing = False
        self.gone: str | None = None  # why it is out for the rest of the run ("auth", "quota", "model")
        self.cause: str | None = None  # why it is out, or the last failure with no answer, in words
        # When its first request since its last answer left: it has answered nothing since,
        # requests in flight included (a hung server fails none before its --timeout).
        self.quiet_since: float | None = None
        self.quiet_failed = False  # a request failed with no answer since then (router.failed)
        self.timeout = timeout
        self.paced: RateLimiter | None = None  # --deadline: the share of the rows the plan gives it
        self.idle = False  # --deadline: the plan needs none of it now
        # What orders the fleet: a request with as many prompt as reply tokens.
        prices = self.model.prices
        self.price = prices.input_pico + prices.output_pico if prices is not None else 2**62
        self._same = self.provider.name == primary.name and self.model.name == primary_model
        self._primary = primary
        self.counts = Counts()

    def free(self, now: float) -> bool:
        """A slot free, not benched, not out (a probe: nothing else in flight)."""
        if self.gone is not None or self.idle or now < self.benched_until:
            return False
        limit = 1 if self.probing else self.concurrency
        return self.in_flight < limit

    def free_at(self, tokens: int) -> float:
        """When its own limiter, and the deadline's plan, let a request leave."""
        at = self.limiter.free_at(tokens)
        return at if self.paced is None else max(at, self.paced.free_at(0))

    def take(self, tokens: int) -> None:
        self.limiter.take(tokens)
        if self.paced is not None:
            self.paced.take(0)

    def capacity(self) -> float:
        """Requests a second it can carry: its rate limit, and its slots over the latency it shows."""
        rates = [self.limiter.rate / 60.0] if self.limiter.rate else []
        if self.counts.ok >= 5:
            rates.append(self.concurrency / max(self.counts.latency_ms / self.counts.ok / 1000.0, 1e-3))
        elif self.spec.latency:
            rates.append(self.concurrency / self.spec.latency)
        return min(rates) if rates else 1e9

    def silent_after(self, give_up_s: float) -> float | None:
        """When it counts as answering nothing: ``give_up_s`` after its quiet began once a request
        has failed with no answer (a refused port, a timeout), else not before its requests in
        flight have had their ``--timeout`` (a slow server is not a dead one); None: not quiet."""
        if self.quiet_since is None:
            return None
        return self.quiet_since + (give_up_s if self.quiet_failed else max(give_up_s, self.timeout))

    def refused(self, error: FatalAPIError, body: bytes) -> bool:
        """Was ``error`` this endpoint refusing an optional field? It then goes without it."""
        return self.refusable is not None and self.refusable.refused(error, body) is not None

    def insisted(self, error: FatalAPIError) -> FatalAPIError:
        """``error``, or its endpoint out when it refuses a field the job insists on (refusable.py)."""
        return error if self.refusable is None else self.refusable.insisted(error)

    async def complete(self, body: bytes) -> Completion:
        drop = self._never if self.refusable is None else self._never + self.refusable.refused_fields
        if not self._same or drop:
            body = rebody(body, self._primary, self.provider, self.model.name, dropped(drop))
        completion = await self.client.complete(body)
        return dataclasses.replace(completion, endpoint=self.name)
