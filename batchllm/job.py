"""The job: every setting of a run, its default and its allowed range, validated once.

A job comes from flags, from a TOML job file (``jobs/*.toml``), or both (flags win). Either way it
passes through ``build_job``, the one place that knows types, ranges and defaults, so the CLI, job
files and library users get the same checks and the same messages. Each message names where the
value came from (``--temperature`` or ``jobs/x.toml: temperature``) and what is allowed.

The parameter ranges are the API's (CONTRACT.md); a request is never sent with a value the API
would reject as a whole batch of 400s.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import JobError
from .pricing import DEFAULT_MODEL, parse_usd

DEFAULT_ENDPOINT = "https://cloud.dataoorts.com/api/v1"
DEFAULT_KEY_ENV = "DATAOORTS_API_KEY"
ENDPOINT_ENV = "DATAOORTS_ENDPOINT"
# The API's default when max_tokens is left out (CONTRACT.md); we always send it explicitly.
DEFAULT_MAX_TOKENS = 256
# 300 requests/min x 15-25 s per reply (CONTRACT.md) needs ~100 in flight; a little headroom.
DEFAULT_CONCURRENCY = 128
# Replies of 512 tokens take 15-25 s, more under load; 120 s is CONTRACT.md's upper figure.
DEFAULT_TIMEOUT = 120.0
DEFAULT_MAX_ATTEMPTS = 6
# The provider's documented limit (CONTRACT.md): where `--rpm auto` starts probing.
PROVIDER_RPM = 300
MAX_CONTENT_CHARS = 131_072


@dataclass(frozen=True, slots=True)
class Job:
    """Everything a run needs. Construct it with ``build_job`` so it is validated."""

    input: Path
    output: Path
    input_format: str | None = None
    prompt_column: str = "prompt"
    template: str | None = None
    system: str | None = None
    id_column: str | None = None
    model: str = DEFAULT_MODEL
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    endpoint: str = DEFAULT_ENDPOINT
    api_key_env: str = DEFAULT_KEY_ENV
    api_key_file: Path | None = None
    sandbox: bool = False
    concurrency: int = DEFAULT_CONCURRENCY
    rpm: int | None = None  # None: auto (adaptive, no ceiling); 0: off
    tpm: int | None = None  # None or 0: off
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    timeout: float = DEFAULT_TIMEOUT
    max_error_rate: float = 0.5
    error_window: int = 100
    max_cost_pico: int | None = None
    max_runtime: float | None = None
    grace: float = 10.0
    checkpoint: Path | None = None
    retry_errors: bool = False
    restart: bool = False
    refresh_changed: bool = False
    log_format: str = "text"
    summary_json: Path | None = None
    progress: str = "auto"
    job_file: Path | None = field(default=None, compare=False)

    @property
    def journal_dir(self) -> Path:
        if self.checkpoint is not None:
            return self.checkpoint
        return self.output.with_name(self.output.name + ".batchllm")

    def params(self) -> dict[str, Any]:
        """The sampling parameters sent in ``data``, in the page's order, unset ones left out."""
        out: dict[str, Any] = {}
        for name in _PARAM_ORDER:
            value = self.max_tokens if name == "max_tokens" else getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    def request_settings(self) -> dict[str, Any]:
        """What shapes a request: a journal written with other values cannot be resumed."""
        prompt = {"template": self.template} if self.template else {"prompt_column": self.prompt_column}
        settings: dict[str, Any] = {
            "model": self.model,
            "system": self.system,
            **prompt,
            "params": self.params(),
        }
        if self.sandbox:
            # Emulated replies must never pass for real ones: a real run refuses such a journal.
            settings["sandbox"] = True
        return settings


_PARAM_ORDER = (
    "temperature",
    "top_p",
    "top_k",
    "max_tokens",
    "seed",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
)


# --- value parsers: each takes the raw value and returns the typed one or raises ValueError ---


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("must be a string")
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("must be true or false")
    return v


def _int(lo: int | None, hi: int | None) -> Callable[[Any], int]:
    def parse(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, str) and re.fullmatch(r"-?\d+", v.strip()):
                v = int(v)
            else:
                raise ValueError(f"must be an integer{_range(lo, hi)}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ValueError(f"must be an integer{_range(lo, hi)}, got {v}")
        return v

    return parse


def _float(lo: float | None, hi: float | None, lo_open: bool = False) -> Callable[[Any], float]:
    def parse(v: Any) -> float:
        if isinstance(v, bool):
            raise ValueError(f"must be a number{_range(lo, hi)}")
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"must be a number{_range(lo, hi)}") from None
        bad_lo = lo is not None and (x <= lo if lo_open else x < lo)
        if not math.isfinite(x) or bad_lo or (hi is not None and x > hi):
            what = f" > {lo:g}" if lo_open else _range(lo, hi)
            raise ValueError(f"must be a number{what}, got {v}")
        return x

    return parse


def _range(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f" from {lo:g} to {hi:g}"
    if lo is not None:
        return f" >= {lo:g}"
    return ""


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(v: Any) -> str:
        if v not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {v!r}")
        return str(v)

    return parse


def _rpm(v: Any) -> int | None:
    if v == "auto" or v is None:
        return None
    return _int(0, None)(v)


def _optional_off(v: Any) -> int | None:
    n = _int(0, None)(v)
    return n or None


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(v: Any) -> float:
    """``90``, ``"90s"``, ``"50m"``, ``"1h30m"`` -> seconds."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        seconds = float(v)
    elif isinstance(v, str):
        text = v.strip().replace(" ", "")
        if re.fullmatch(r"\d+(\.\d+)?", text):
            seconds = float(text)
        elif text and _DURATION.sub("", text) == "":
            seconds = sum(float(n) * _UNIT[u] for n, u in _DURATION.findall(text))
        else:
            raise ValueError(f"must be a duration like 90s, 50m or 1h30m, got {v!r}")
    else:
        raise ValueError("must be a duration like 90s, 50m or 1h30m")
    if seconds <= 0:
        raise ValueError(f"must be a positive duration, got {v!r}")
    return seconds


def _usd(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ValueError("must be a dollar amount such as 5 or 0.25")
    try:
        return parse_usd(str(v))
    except JobError as exc:
        raise ValueError(str(exc)) from None


def _path(v: Any) -> Path:
    return Path(_str(v))


# name in flags/TOML -> (Job attribute, parser). Keys are named like their flags, with underscores.
_PARSERS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "input": ("input", _path),
    "output": ("output", _path),
    "input_format": ("input_format", _choice("csv", "parquet")),
    "prompt_column": ("prompt_column", _str),
    "template": ("template", _str),
    "template_file": ("template", _path),  # read below
    "system": ("system", _str),
    "id_column": ("id_column", _str),
    "model": ("model", _str),
    "max_tokens": ("max_tokens", _int(1, None)),
    "temperature": ("temperature", _float(0, 5)),
    "top_p": ("top_p", _float(0, 2)),
    "top_k": ("top_k", _int(1, 50)),
    "seed": ("seed", _int(1, 9_999_999_999)),
    "repetition_penalty": ("repetition_penalty", _float(0, 2)),
    "frequency_penalty": ("frequency_penalty", _float(0, 2)),
    "presence_penalty": ("presence_penalty", _float(0, 2)),
    "endpoint": ("endpoint", _str),
    "api_key_env": ("api_key_env", _str),
    "api_key_file": ("api_key_file", _path),
    "sandbox": ("sandbox", _bool),
    "concurrency": ("concurrency", _int(1, 10_000)),
    "rpm": ("rpm", _rpm),
    "tpm": ("tpm", _optional_off),
    "max_attempts": ("max_attempts", _int(1, 100)),
    "timeout": ("timeout", _float(0, 3600, lo_open=True)),
    "max_error_rate": ("max_error_rate", _float(0, 1)),
    "error_window": ("error_window", _int(1, 1_000_000)),
    "max_cost": ("max_cost_pico", _usd),
    "max_runtime": ("max_runtime", parse_duration),
    "grace": ("grace", _float(0, 3600)),
    "checkpoint": ("checkpoint", _path),
    "retry_errors": ("retry_errors", _bool),
    "restart": ("restart", _bool),
    "refresh_changed": ("refresh_changed", _bool),
    "log_format": ("log_format", _choice("text", "json")),
    "summary_json": ("summary_json", _path),
    "progress": ("progress", _choice("auto", "bar", "lines", "none")),
}
JOB_KEYS = tuple(_PARSERS)
_PATH_KEYS = {"input", "output", "template_file", "api_key_file", "checkpoint", "summary_json"}


def load_job_file(path: Path) -> dict[str, Any]:
    """Read a TOML job file into raw values, paths made relative to the file's folder."""
    try:
        raw = tomllib.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise JobError(f"{path}: job file not found") from None
    except OSError as exc:
        raise JobError(f"{path}: cannot read the job file: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise JobError(f"{path}: not valid TOML: {exc}") from None
    if "api_key" in raw:
        raise JobError(
            f"{path}: key 'api_key': a job file must not hold the key; name the environment "
            "variable that holds it with api_key_env"
        )
    unknown = sorted(set(raw) - set(_PARSERS))
    if unknown:
        raise JobError(f"{path}: unknown key {unknown[0]!r}; allowed keys: {', '.join(sorted(_PARSERS))}")
    for key in _PATH_KEYS & set(raw):
        if isinstance(raw[key], str):
            raw[key] = os.path.normpath(path.parent / Path(raw[key]).expanduser())
    return raw


def build_job(
    values: Mapping[str, Any],
    *,
    job_file: Path | None = None,
    flag_names: frozenset[str] = frozenset(),
    environ: Mapping[str, str] | None = None,
) -> Job:
    """Validate raw values (from a job file and/or flags) into a ``Job``.

    ``flag_names`` are the keys that came from the command line, so that a message names the flag
    (``--top-k``) rather than the job file's key.
    """
    environ = os.environ if environ is None else environ

    def where(key: str) -> str:
        if key in flag_names or job_file is None:
            return f"--{key.replace('_', '-')}"
        return f"{job_file}: key '{key}'"

    kwargs: dict[str, Any] = {}
    for key, raw in values.items():
        if raw is None:
            continue
        try:
            attr, parse = _PARSERS[key]
        except KeyError:
            raise JobError(f"unknown setting {key!r}") from None
        try:
            kwargs[attr] = parse(raw)
        except ValueError as exc:
            raise JobError(f"{where(key)} {exc}") from None

    if values.get("template") is not None and values.get("template_file") is not None:
        raise JobError("give --template or --template-file, not both")
    if values.get("template_file") is not None:
        template_path = Path(values["template_file"])
        try:
            kwargs["template"] = template_path.read_text("utf-8")
        except OSError as exc:
            raise JobError(f"{template_path}: cannot read the template file: {exc.strerror}") from None
        if not kwargs["template"].strip():
            raise JobError(f"{template_path}: the template file is empty")
    for key in ("input", "output"):
        if key not in kwargs:
            raise JobError(f"missing {where(key)}: say which file to {'read' if key == 'input' else 'write'}")
    if "endpoint" not in kwargs and environ.get(ENDPOINT_ENV):
        kwargs["endpoint"] = environ[ENDPOINT_ENV]
    kwargs["endpoint"] = check_endpoint(kwargs.get("endpoint", DEFAULT_ENDPOINT))
    if kwargs["output"].suffix.lower() != ".parquet":
        raise JobError(f"{where('output')}: {kwargs['output']} must end in .parquet")
    if kwargs.get("system") is not None and len(kwargs["system"]) > MAX_CONTENT_CHARS:
        raise JobError(f"{where('system')}: the system prompt is over {MAX_CONTENT_CHARS:,} characters")
    return Job(job_file=job_file, **kwargs)


def check_endpoint(url: str) -> str:
    """https anywhere; plain http only to this machine (a key must never cross a network in clear)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise JobError(f"--endpoint {url!r} is not an http(s) URL")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise JobError(
            f"--endpoint {url!r}: plain http is allowed only for loopback hosts (127.0.0.1, ::1, "
            "localhost); use https"
        )
    return url


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_api_key(job: Job, environ: Mapping[str, str] | None = None) -> str:
    """The key, from ``--api-key-file`` or the job's environment variable; never logged."""
    environ = os.environ if environ is None else environ
    if job.api_key_file is not None:
        try:
            key = job.api_key_file.read_text("utf-8").strip()
        except OSError as exc:
            raise JobError(f"--api-key-file {job.api_key_file}: {exc.strerror}") from None
        if not key:
            raise JobError(f"--api-key-file {job.api_key_file} is empty")
        return key
    key = environ.get(job.api_key_env, "").strip()
    if not key:
        raise JobError(
            f"no API key: set the environment variable {job.api_key_env} (or pass --api-key-file "
            "FILE), or use --sandbox to try batchllm against the built-in emulator"
        )
    return key
