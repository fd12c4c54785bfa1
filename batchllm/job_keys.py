"""The keys of a job: each name in flags and job files (with underscores), the ``Job`` attribute it
sets, and the parser that checks its value (job.py's ``build_job`` applies them)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import values as v
from .errors import JobError
from .fleet import fleet_value
from .ledger.store import LEDGER_ENV
from .pricing import parse_usd, price_value
from .providers import PROVIDERS
from .sniff import check_encoding

# Sampling parameters any provider may take; which ones, and their ranges, are the provider's.
SAMPLING_KEYS = (
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "stop",
)


def _usd(raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise ValueError("must be a dollar amount such as 5 or 0.25")
    try:
        return parse_usd(str(raw))
    except JobError as exc:
        raise ValueError(str(exc)) from None


def _encoding(raw: Any) -> str:
    return check_encoding(v.text(raw))


def _path(raw: Any) -> Path:
    return Path(v.text(raw))


def check_endpoint(url: str) -> str:
    """``--endpoint``: an http(s) URL with a host (values.py)."""
    try:
        return v.http_url(url)
    except ValueError:
        raise JobError(f"--endpoint {url!r} is not an http(s) URL") from None


def _sampling(raw: Any) -> Any:
    return raw  # parsed by the provider once it is known (``build_job``)


def _structured(raw: Any) -> str:
    """``--structured``: auto, on or off (a job file's true and false too)."""
    if isinstance(raw, bool):
        return "on" if raw else "off"
    return v.choice("auto", "on", "off")(raw)


parse_pack = v.integer(1, 100)  # --pack; estimate also takes several sizes (cli/run.py)

# name in flags/TOML -> (Job attribute, parser). Keys are named like their flags, with underscores.
PARSERS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "input": ("input", _path),
    "output": ("output", _path),
    "input_format": ("input_format", v.choice("csv", "parquet", "jsonl")),
    "delimiter": ("delimiter", v.delimiter),
    "encoding": ("encoding", _encoding),
    "prompt_column": ("prompt_column", v.text),
    "template": ("template", v.text),
    "template_file": ("template", _path),  # read below
    "system": ("system", v.text),
    "system_file": ("system", _path),  # read below
    "id_column": ("id_column", v.text),
    "provider": ("provider", v.choice(*PROVIDERS)),
    "model": ("model", v.text),
    "max_tokens": ("max_tokens", v.integer(1, None)),
    **{key: (key, _sampling) for key in SAMPLING_KEYS},
    "extra_body": ("extra_body", v.table),
    "input_price": ("input_price", price_value),
    "output_price": ("output_price", price_value),
    "cached_input_price": ("cached_input_price", price_value),
    "endpoint": ("endpoint", v.text),
    "api_key_env": ("api_key_env", v.text),
    "api_key_file": ("api_key_file", _path),
    "sandbox": ("sandbox", v.boolean),
    "concurrency": ("concurrency", v.integer(1, 10_000)),
    "rpm": ("rpm", v.rpm),
    "tpm": ("tpm", v.optional_off),
    "warmup": ("warmup", v.boolean),
    "max_attempts": ("max_attempts", v.integer(1, 100)),
    "timeout": ("timeout", v.number(0, 3600, lo_open=True)),
    "max_error_rate": ("max_error_rate", v.number(0, 1)),
    "error_window": ("error_window", v.integer(1, 1_000_000)),
    "max_cost": ("max_cost_pico", _usd),
    "max_cost_per_run": ("max_cost_per_run_pico", _usd),
    "max_cost_per_month": ("max_cost_per_month_pico", _usd),
    "max_runtime": ("max_runtime", v.duration),
    "grace": ("grace", v.number(0, 3600)),
    "checkpoint": ("checkpoint", _path),
    "retry_errors": ("retry_errors", v.boolean),
    "restart": ("restart", v.boolean),
    "refresh_changed": ("refresh_changed", v.boolean),
    "labels": ("labels", v.text),
    "labels_file": ("labels_file", _path),
    "json_schema": ("json_schema", _path),
    "reask": ("reask", v.integer(0, 10)),
    "samples": ("samples", v.integer(1, 25)),
    "adaptive": ("adaptive", v.boolean),
    "pack": ("pack", parse_pack),
    "pack_tokens": ("pack_tokens", v.integer(1, None)),
    "structured": ("structured", _structured),
    "confidence": ("confidence", v.choice("auto", "logprobs", "votes", "off")),
    "vote_below": ("vote_below", v.number(0, 1)),
    "examples": ("examples", _path),
    "reparse": ("reparse", v.boolean),
    "cache": ("cache", v.text),
    "log_format": ("log_format", v.choice("text", "json")),
    "summary_json": ("summary_json", _path),
    "notify": ("notify", v.text),
    "ledger": ("ledger", v.text),
    "progress": ("progress", v.choice("auto", "bar", "lines", "none")),
    "fleet": ("fleet", fleet_value),
    "deadline": ("deadline", v.text),
    "engine": ("engine", v.choice("local", "ray")),
    "ray_address": ("ray_address", v.text),
    "actors": ("actors", v.integer(1, 1024)),
}
JOB_KEYS = tuple(PARSERS)

# Job keys an environment variable also sets (read where the key is applied: job.py, ledger/store.py).
ENVIRONMENT = {
    "endpoint": " or ".join(p.endpoint_env for p in PROVIDERS.values()),
    "ledger": LEDGER_ENV,
}
parse_duration = v.duration
