"""Value parsers shared by the job (job.py) and the providers' parameter tables (providers/).

Each parser takes a raw value (from a flag, a job file or a library call) and returns the typed
value or raises ``ValueError`` with what is allowed; the caller adds where the value came from.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import JobError
from .sniff import read_text

Parser = Callable[[Any], Any]


def text(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("must be a string")
    return v


def boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("must be true or false")
    return v


def integer(lo: int | None, hi: int | None) -> Callable[[Any], int]:
    def parse(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, str) and re.fullmatch(r"-?\d+", v.strip()):
                v = int(v)
            else:
                raise ValueError(f"must be an integer{span(lo, hi)}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ValueError(f"must be an integer{span(lo, hi)}, got {v}")
        return v

    parse.__doc__ = f"integer{span(lo, hi)}"
    return parse


def number(lo: float | None, hi: float | None, lo_open: bool = False) -> Callable[[Any], float]:
    def parse(v: Any) -> float:
        if isinstance(v, bool):
            raise ValueError(f"must be a number{span(lo, hi)}")
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"must be a number{span(lo, hi)}") from None
        bad_lo = lo is not None and (x <= lo if lo_open else x < lo)
        if not math.isfinite(x) or bad_lo or (hi is not None and x > hi):
            what = f" > {lo:g}" if lo_open else span(lo, hi)
            raise ValueError(f"must be a number{what}, got {v}")
        return x

    parse.__doc__ = f"number{span(lo, hi)}"
    return parse


def span(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f" from {lo:g} to {hi:g}"
    if lo is not None:
        return f" >= {lo:g}"
    return ""


def choice(*choices: str) -> Callable[[Any], str]:
    def parse(v: Any) -> str:
        if v not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {v!r}")
        return str(v)

    return parse


def strings(max_items: int) -> Callable[[Any], list[str]]:
    """A string or a list of at most ``max_items`` strings (OpenAI's ``stop``)."""

    def parse(v: Any) -> list[str]:
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) and s for s in items):
            raise ValueError("must be a non-empty string or a list of them")
        if not 1 <= len(items) <= max_items:
            raise ValueError(f"takes 1 to {max_items} strings, got {len(items)}")
        return list(items)

    parse.__doc__ = f"1 to {max_items} strings"
    return parse


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_seconds(text: str) -> float | None:
    """``"90s"``, ``"6m0s"``, ``"120ms"``, ``"1h30m"``, ``"90"`` -> seconds; None if not a duration."""
    compact = text.strip().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", compact):
        return float(compact)
    if compact and _DURATION.sub("", compact) == "":
        return sum(float(n) * _UNIT[u] for n, u in _DURATION.findall(compact))
    return None


def duration(v: Any) -> float:
    """A positive duration: ``90``, ``"90s"``, ``"50m"``, ``"1h30m"`` -> seconds."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        seconds: float | None = float(v)
    elif isinstance(v, str):
        seconds = duration_seconds(v)
    else:
        seconds = None
    if seconds is None:
        raise ValueError(f"must be a duration like 90s, 50m or 1h30m, got {v!r}")
    if seconds <= 0:
        raise ValueError(f"must be a positive duration, got {v!r}")
    return seconds


def rpm(raw: Any) -> int | None:
    """``--rpm``: ``auto`` (None), 0 (no pacing) or requests per minute."""
    if raw == "auto" or raw is None:
        return None
    try:
        return integer(0, None)(raw)
    except ValueError:
        raise ValueError(f"must be auto, 0 (no pacing) or requests per minute, got {raw!r}") from None


def optional_off(raw: Any) -> int | None:
    """A count where 0 means off (None)."""
    return integer(0, None)(raw) or None


def table(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ValueError("must be a table of request fields, e.g. [extra_body] with top_k = 40")
    return dict(raw)


def delimiter(raw: Any) -> str:
    """A CSV field separator: one character, or ``tab``."""
    value = text(raw)
    if value in ("tab", "\\t", "\t"):
        return "\t"
    if len(value) != 1 or value in ('"', "\n", "\r"):
        raise ValueError(f"must be one character (or tab), got {value!r}")
    return value


def http_url(raw: Any) -> str:
    """An http(s) URL with a host; whether plain http may carry the key is decided with the key."""
    value = text(raw)
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an http(s) URL")
    return value


def read_toml(path: Path, kind: str) -> dict[str, Any]:
    """A TOML file (a job file, a fleet file), every problem one ``JobError`` naming it."""
    if (
        path.suffix.lower() in (".csv", ".tsv", ".tab", ".parquet", ".pq", ".jsonl", ".ndjson")
        and path.is_file()
    ):
        # Data where a job file goes: `batchllm init` writes one from it.
        raise JobError(f"{path} is data, not a {kind}: `batchllm init {path}` writes one from it")
    try:
        return tomllib.loads(read_text(path, kind))
    except FileNotFoundError:
        raise JobError(f"{path}: {kind} not found") from None
    except OSError as exc:
        raise JobError(f"{path}: cannot read the {kind}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise JobError(f"{path}: not valid TOML: {exc}") from None
