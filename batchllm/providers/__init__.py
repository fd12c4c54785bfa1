"""The providers batchllm speaks, by name: each one module, each the whole of what we know of it."""

from __future__ import annotations

from ..errors import JobError
from .base import Provider
from .dataoorts import Dataoorts
from .openai import OpenAI

PROVIDERS: dict[str, type[Provider]] = {p.name: p for p in (Dataoorts, OpenAI)}
DEFAULT_PROVIDER = Dataoorts.name


def get_provider(name: str) -> Provider:
    try:
        return PROVIDERS[name]()
    except KeyError:
        raise JobError(f"unknown provider {name!r}: batchllm speaks {', '.join(PROVIDERS)}") from None


__all__ = ["DEFAULT_PROVIDER", "PROVIDERS", "Provider", "get_provider"]
