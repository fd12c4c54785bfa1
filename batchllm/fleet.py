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

This module reads and checks the file (every problem at once, one line each naming the file, the
endpoint and the key, in file order); reports/fleet_plan.py plans which endpoint takes how many rows.
"""

from __future__ import annotations

import difflib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from . import values as v
from .errors import JobError
from .pricing import Model, Prices, cached_price_problem, load_models, price_value
from .providers import PROVIDERS, get_provider
from .values import duration_seconds

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
    """Read a fleet file; its problems are one ``JobError``, a line each (see ``fleet_from``)."""
    raw = v.read_toml(path, "fleet file")
    where = str(path)
    # Keys other than [[endpoint]] (a mistyped table would drop its endpoints unsaid): each said
    # where the file has it, before or after the endpoints' problems.
    before: list[str] = []
    after: list[str] = []
    endpoints_at = list(raw).index("endpoint") if "endpoint" in raw else len(raw)
    for at, (key, value) in enumerate(raw.items()):
        if key == "endpoint":
            continue
        kind = f"key {key!r}"
        if isinstance(value, list | dict):
            kind = f"table [[{key}]]" if isinstance(value, list) else f"table [{key}]"
        near = difflib.get_close_matches(key, ["endpoint"], n=1, cutoff=0.6)
        hint = "; did you mean [[endpoint]]?" if near else ""
        (before if at < endpoints_at else after).append(
            f"{where}: unknown {kind}{hint} (a fleet file holds [[endpoint]] tables)"
        )
    try:
        fleet = fleet_from(raw.get("endpoint"), where)
    except JobError as exc:
        raise JobError("\n".join([*before, str(exc), *after])) from None
    if before or after:
        raise JobError("\n".join([*before, *after]))
    return fleet


def fleet_from(tables: Any, where: str) -> list[FleetEndpoint]:
    """``[[endpoint]]`` tables (a fleet file's, or a job file's ``[[fleet]]``) into endpoints. Every
    problem is found before any is said: one ``JobError``, a line each naming the file, the
    endpoint and the key, in the order of the file (a key's problems where the key is, a missing
    key's at the end of its table), so one edit fixes them all."""
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise JobError(f"{where}: no [[endpoint]] tables: a fleet lists one or more endpoints")
    problems: list[str] = []
    names: set[str] = set()
    fleet = [_endpoint(t, where, i + 1, names, problems) for i, t in enumerate(tables)]
    if problems:
        raise JobError("\n".join(problems))
    return [e for e in fleet if e is not None]


PARSE: dict[str, Callable[[Any], Any]] = {
    "name": v.text,
    "provider": v.choice(*PROVIDERS),
    "endpoint": v.http_url,
    "key_env": v.text,
    "model": v.text,
    "rpm": v.integer(1, None),
    "tpm": v.integer(1, None),
    "concurrency": v.integer(1, 10_000),
    "input_price": price_value,
    "output_price": price_value,
    "cached_input_price": price_value,
    "latency": v.number(0, 3600, lo_open=True),
}
KEYS = tuple(PARSE)
REQUIRED = ("name", "provider", "endpoint", "model")


def _endpoint(
    t: dict[str, Any], file: str, number: int, names: set[str], problems: list[str]
) -> FleetEndpoint | None:
    """One ``[[endpoint]]`` table, or None with its problems added to ``problems``."""
    name = t.get("name")
    where = f"{file}: endpoint {number}"
    if isinstance(name, str):  # named as the file names it; by number too when the name is taken
        where = f"{where} ({name!r})" if name in names else f"{file}: endpoint {name!r}"
    place = {key: i for i, key in enumerate(t)}  # TOML tables keep the file's order
    found: list[tuple[int, str]] = []  # (where in the table, the problem)
    got: dict[str, Any] = {}
    for key, raw in t.items():
        if key in ("api_key", "key"):
            found.append((place[key], "a fleet file must not hold a key; name its variable with key_env"))
        elif key not in PARSE:
            found.append((place[key], f"unknown key {key!r} (keys: {', '.join(KEYS)})"))
        else:
            try:
                got[key] = PARSE[key](raw)
            except ValueError as exc:
                shown = "" if repr(raw) in str(exc) or str(raw) in str(exc) else f" (got {raw!r})"
                found.append((place[key], f"key {key!r} {exc}{shown}"))
    found += [(len(t), f"missing key {key!r}") for key in REQUIRED if key not in t]
    if "name" in got:
        if got["name"] in names:
            found.append(
                (place["name"], f"two endpoints are named {name!r}; names tell them apart in the output")
            )
        names.add(got["name"])
    priced = [key for key in ("input_price", "output_price") if key in t]
    if len(priced) == 1:
        found.append((place[priced[0]], "give input_price and output_price together"))
    listed = None
    if "provider" in got and "model" in got:
        provider, model_name = get_provider(got["provider"]), got["model"]
        listed = load_models(provider.name).get(model_name)
        if listed is None and not provider.unlisted_models:
            found.append(
                (
                    place["model"],
                    f"the {provider.name} provider has no model {model_name!r} (see `batchllm models`)",
                )
            )
        elif listed is None and not priced:
            found.append(
                (
                    place["model"],
                    f"{model_name!r} has no price in the model table: give input_price and output_price",
                )
            )
    # A price refused above is not in ``got``: the endpoint is unpriced while its error is said.
    both = len(priced) == 2 and {"input_price", "output_price"} <= got.keys()
    prices = Prices(got["input_price"], got["output_price"]) if both else None
    if "cached_input_price" in got:
        base = prices or (listed.prices if listed is not None else None)
        if base is None:
            found.append(
                (place["cached_input_price"], "give input_price and output_price with cached_input_price")
            )
        elif problem := cached_price_problem(got["cached_input_price"], base, "", got.get("model", "")):
            found.append((place["cached_input_price"], f"cached_input_price {problem}"))
        else:
            prices = base.with_cached(got["cached_input_price"])
    if found:
        problems += [f"{where}: {problem}" for _, problem in sorted(found, key=lambda f: f[0])]
        return None
    model = Model(got["model"], got["provider"], prices or listed.prices, listed.context_window if listed else None,  # type: ignore[union-attr]
                  listed.batch_prices if listed else None, listed.rpm if listed else None,
                  listed.tpm if listed else None)  # fmt: skip
    return FleetEndpoint(
        name=got["name"],
        provider=got["provider"],
        endpoint=got["endpoint"],
        key_env=got.get("key_env"),
        model=model,
        rpm=got.get("rpm", model.rpm),
        tpm=got.get("tpm", model.tpm),
        concurrency=got.get("concurrency", DEFAULT_CONCURRENCY),
        latency=got.get("latency"),
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


def deadline_note(text: str, seconds: float) -> str | None:
    """What to say of a clock-time deadline that passed today: it is taken as tomorrow's, which a
    run started late (or sent again in the morning) may not mean."""
    try:
        datetime.strptime(text.strip(), "%H:%M")
    except ValueError:
        return None
    if seconds <= 12 * 3600:
        return None
    hours, minutes = divmod(round(seconds / 60), 60)
    return (
        f"--deadline {text.strip()} has passed today: it is taken as tomorrow's, {hours} h {minutes} min "
        "from now (a duration, such as 2h, sets one from now)"
    )


def fleet_value(raw: Any) -> tuple[FleetEndpoint, ...]:
    """A fleet file's path, or a job file's ``[[fleet]]`` tables."""
    if isinstance(raw, list):
        return tuple(fleet_from(raw, "[[fleet]]"))
    try:
        return tuple(load_fleet(Path(v.text(raw))))
    except JobError as exc:
        raise ValueError(str(exc)) from None


def fleet_text(fleet: tuple[FleetEndpoint, ...] | None) -> str | None:
    """A fleet's endpoints in a line (the run's header, ``validate``): the job's provider and
    model are not theirs. None without a fleet."""
    if not fleet:
        return None
    return ", ".join(f"{e.name} ({e.provider} model {e.model.name})" for e in fleet)


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
