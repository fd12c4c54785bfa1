"""Fleets: one job, several endpoints serving the same open model, each with its own limit and
price (``--fleet FILE``, a TOML file of ``[[endpoint]]`` tables).

    [[endpoint]]
    name = "dataoorts"                        # how rows, reports and warnings name it
    provider = "dataoorts"                    # or openai: any OpenAI-compatible server
    endpoint = "https://api.dataoorts.com/api/v1/chat/completions"
    key_env = "DATAOORTS_API_KEY"             # the variable holding its key: never the key
    model = "meta/llama-3.1-70b-instruct"     # the model's name at this endpoint
    rpm = 300                                 # its rate limit; tpm likewise (optional)
    concurrency = 128
    input_price = "0.31"                      # USD per million tokens; else the model table's
    output_price = "0.34"
    cached_input_price = "0.155"              # a prompt-cache hit; else the table's, else input
    latency = 20                              # seconds a reply takes (optional: for planning)

This module reads and checks the file (every problem one line naming the file, the endpoint and
the key); reports/fleet_plan.py plans which endpoint takes how many rows.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from . import values as v
from .errors import JobError
from .pricing import Model, Prices, load_models, parse_price
from .providers import PROVIDERS, get_provider
from .values import duration_seconds

KEYS = ("name", "provider", "endpoint", "key_env", "model", "rpm", "tpm", "concurrency", "input_price",
        "output_price", "cached_input_price", "latency")  # fmt: skip
DEFAULT_CONCURRENCY = 128


@dataclass(frozen=True, slots=True)
class FleetEndpoint:
    name: str
    provider: str
    endpoint: str
    key_env: str | None
    model: Model  # prices and window: the file's prices win over the model table's
    rpm: int | None
    tpm: int | None
    concurrency: int
    latency: float | None  # seconds per reply, when the file says (else only the rate limits bind)

    @property
    def requests_per_s(self) -> float:
        """What its limits allow at most: rpm, and concurrency over latency when both are known."""
        rates = [self.rpm / 60.0] if self.rpm else []
        if self.latency:
            rates.append(self.concurrency / self.latency)
        return min(rates) if rates else float("inf")


def load_fleet(path: Path) -> list[FleetEndpoint]:
    """Read a fleet file; the first problem is a ``JobError`` naming the file, endpoint and key."""
    raw = v.read_toml(path, "fleet file")
    return fleet_from(raw.get("endpoint"), str(path))


def fleet_from(tables: Any, where: str) -> list[FleetEndpoint]:
    """``[[endpoint]]`` tables (a fleet file's, or a job file's ``[[fleet]]``) into endpoints."""
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise JobError(f"{where}: no [[endpoint]] tables: a fleet lists one or more endpoints")
    fleet = [_endpoint(t, f"{where}: endpoint {i + 1}") for i, t in enumerate(tables)]
    names = [e.name for e in fleet]
    for name in names:
        if names.count(name) > 1:
            raise JobError(f"{where}: two endpoints are named {name!r}; names tell them apart in the output")
    return fleet


def _get(
    table: dict[str, Any], key: str, where: str, parse: Callable[[Any], Any], default: Any = None
) -> Any:
    if key not in table:
        if default is ...:
            raise JobError(f"{where}: missing key {key!r}")
        return default
    try:
        return parse(table[key])
    except (ValueError, JobError) as exc:
        raise JobError(f"{where}: key {key!r} {exc}".replace(f"{key!r} {key}:", f"{key!r}:")) from None


def _endpoint(t: dict[str, Any], where: str) -> FleetEndpoint:
    unknown = sorted(set(t) - set(KEYS))
    if unknown:
        raise JobError(f"{where}: unknown key {unknown[0]!r} (keys: {', '.join(KEYS)})")
    if "api_key" in t or "key" in t:
        raise JobError(f"{where}: a fleet file must not hold a key; name its variable with key_env")
    name = _get(t, "name", where, v.text, ...)
    where = f"{where.rsplit(':', 1)[0]}: endpoint {name!r}"
    provider = get_provider(_get(t, "provider", where, v.choice(*PROVIDERS), ...))
    url = _get(t, "endpoint", where, v.text, ...)
    from .job_keys import check_endpoint

    try:
        check_endpoint(url)
    except JobError:
        raise JobError(f"{where}: key 'endpoint' {url!r} is not an http(s) URL") from None
    model_name = _get(t, "model", where, v.text, ...)
    prices = None
    if "input_price" in t or "output_price" in t:
        if "input_price" not in t or "output_price" not in t:
            raise JobError(f"{where}: give input_price and output_price together")
        prices = Prices(
            parse_price(t["input_price"], f"{where}: key 'input_price'"),
            parse_price(t["output_price"], f"{where}: key 'output_price'"),
        )
    listed = load_models(provider.name).get(model_name)
    if "cached_input_price" in t:
        base = prices or (listed.prices if listed is not None else None)
        if base is None:
            raise JobError(f"{where}: give input_price and output_price with cached_input_price")
        prices = base.with_cached(parse_price(t["cached_input_price"], f"{where}: key 'cached_input_price'"))
    if listed is None and not provider.unlisted_models:
        raise JobError(
            f"{where}: the {provider.name} provider has no model {model_name!r} (see `batchllm models`)"
        )
    if listed is None and prices is None:
        raise JobError(
            f"{where}: {model_name!r} has no price in the model table: give input_price and output_price"
        )
    model = Model(model_name, provider.name, prices or listed.prices, listed.context_window if listed else None,  # type: ignore[union-attr]
                  listed.batch_prices if listed else None, listed.rpm if listed else None,
                  listed.tpm if listed else None)  # fmt: skip
    rpm = _get(t, "rpm", where, v.integer(1, None), model.rpm)
    return FleetEndpoint(
        name=name,
        provider=provider.name,
        endpoint=url,
        key_env=_get(t, "key_env", where, v.text, None),
        model=model,
        rpm=rpm,
        tpm=_get(t, "tpm", where, v.integer(1, None), model.tpm),
        concurrency=_get(t, "concurrency", where, v.integer(1, 10_000), DEFAULT_CONCURRENCY),
        latency=_get(t, "latency", where, v.number(0, 3600, lo_open=True), None),
    )


def fleet_problems(fleet: list[FleetEndpoint], job: Any, where: str) -> list[str]:
    """Why endpoints cannot take this job, one line each (an empty list: every one can)."""
    out = []
    for e in fleet:
        provider = get_provider(e.provider)
        for key, value in job.sampling.items():
            parse = provider.params.get(key)
            if parse is None:
                out.append(f"{where}: endpoint {e.name!r} ({provider.name}) takes no {key}")
                continue
            try:
                parse(value)
            except ValueError as exc:
                out.append(f"{where}: endpoint {e.name!r}: {key} {exc}")
        window = e.model.context_window
        if window is not None and job.max_tokens >= window:
            out.append(
                f"{where}: endpoint {e.name!r}: max_tokens {job.max_tokens:,} leaves no room in "
                f"{e.model.name}'s {window:,}-token window"
            )
    return out


def parse_deadline(text: str, now: float | None = None) -> float:
    """Seconds from now: a duration (``90m``, ``6h``), a clock time (``06:00``: the next one, local
    time) or an ISO date and time."""
    now = time.time() if now is None else now
    seconds = duration_seconds(text)
    if seconds is not None:
        return seconds
    local = datetime.fromtimestamp(now)
    try:
        clock = datetime.strptime(text.strip(), "%H:%M")
    except ValueError:
        try:
            when = datetime.fromisoformat(text.strip())
        except ValueError:
            raise JobError(
                f"--deadline {text!r} is not a duration (6h), a clock time (06:00) or a date and time"
            ) from None
        at = when.timestamp()
    else:
        target = local.replace(hour=clock.hour, minute=clock.minute, second=0, microsecond=0)
        if target <= local:
            target += timedelta(days=1)
        at = target.timestamp()
    if at <= now:
        raise JobError(f"--deadline {text!r} is in the past")
    return at - now


def fleet_value(raw: Any) -> tuple[FleetEndpoint, ...]:
    """A fleet file's path, or a job file's ``[[fleet]]`` tables."""
    if isinstance(raw, list):
        return tuple(fleet_from(raw, "[[fleet]]"))
    try:
        return tuple(load_fleet(Path(v.text(raw))))
    except JobError as exc:
        raise ValueError(str(exc)) from None


def dearest(fleet: tuple[FleetEndpoint, ...]) -> Prices | None:
    """Prices to reserve worst cases at: the dearest endpoint's (any may answer)."""
    priced = [e.model.prices for e in fleet if e.model.prices is not None]
    if len(priced) < len(fleet):
        return None
    # No cached price: a worst case assumes no prompt-cache hit.
    return Prices(max(p.input_per_million for p in priced), max(p.output_per_million for p in priced))


def fleet_toml(fleet: tuple[FleetEndpoint, ...] | list[FleetEndpoint]) -> str:
    """A fleet as a fleet file (``batchllm sandbox --fleet F --write-fleet OUT`` writes the one
    it serves); reading it back gives the same endpoints."""
    parts = []
    for e in fleet:
        lines = ["[[endpoint]]", f"name = {_toml(e.name)}", f"provider = {_toml(e.provider)}",
                 f"endpoint = {_toml(e.endpoint)}", f"model = {_toml(e.model.name)}"]  # fmt: skip
        if e.key_env:
            lines.append(f"key_env = {_toml(e.key_env)}")
        lines += [f"{k} = {getattr(e, k)}" for k in ("rpm", "tpm", "latency") if getattr(e, k) is not None]
        lines.append(f"concurrency = {e.concurrency}")
        if e.model.prices is not None:
            lines.append(f'input_price = "{e.model.prices.input_per_million}"')
            lines.append(f'output_price = "{e.model.prices.output_per_million}"')
            if e.model.prices.cached_input_per_million is not None:
                lines.append(f'cached_input_price = "{e.model.prices.cached_input_per_million}"')
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def _toml(text: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's)."""
    return json.dumps(text, ensure_ascii=False)


def batch_endpoint(fleet: tuple[FleetEndpoint, ...], name: str | None, where: str) -> FleetEndpoint:
    """The endpoint a fleet's batch file goes to: ``name``, else the cheapest that takes OpenAI
    batch files (the ``openai`` provider: OpenAI's Batch API, vLLM's run-batch) at its batch prices
    (its live ones when it has none)."""
    if name is not None:
        for e in fleet:
            if e.name == name:
                if e.provider != "openai":
                    raise JobError(
                        f"{where}: endpoint {name!r} is {e.provider}'s, which takes no batch files"
                    )
                return e
        raise JobError(
            f"{where}: no endpoint named {name!r} (the fleet has {', '.join(e.name for e in fleet)})"
        )
    able = [e for e in fleet if e.provider == "openai"]
    if not able:
        raise JobError(f"{where}: no endpoint takes batch files (only the openai provider's do)")

    def price(e: FleetEndpoint) -> int:
        p = e.model.batch_prices or e.model.prices
        return p.input_pico + p.output_pico if p is not None else 2**62

    return min(able, key=price)
