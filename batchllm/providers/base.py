"""What a provider is: everything batchllm knows about one API, behind one interface.

A provider turns a ``Request`` into the bytes its API wants (``encode``), and one HTTP response
into a ``Completion`` or an exception of the tree in errors.py (``parse``, a pure function of
status, headers and body, so every response shape is tested without a server). It also owns its
parameter names, ranges and order, its default endpoint and key variable, whether its replies say
they were truncated, what its headers say about rate limits, and how to advise a person when the
API stops a run. Nothing outside a provider's module knows its envelope, error codes or ranges.

The engine sees only this interface; adding a provider is one module and one line in
``providers/__init__.py``.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from typing import Any, ClassVar

from ..errors import RunStopError
from ..records import Completion, RateHints, Request
from ..values import Parser

MAX_MESSAGE = 500


class Provider:
    """Base class: class attributes describe the API, methods speak it."""

    name: ClassVar[str]
    default_endpoint: ClassVar[str]
    endpoint_env: ClassVar[str]  # environment variable that may name the endpoint
    key_env: ClassVar[str]  # environment variable that holds the key, by default
    key_required: ClassVar[bool] = True  # local OpenAI-compatible servers often need none
    documented_rpm: ClassVar[float] = 300.0  # where ``--rpm auto`` starts when no header says
    # A shared serverless API: the rate it is paced at is a limit it enforces, never a queue of a
    # few slots, so the requests in flight may open to that rate times a round trip at once
    # (engine/concurrency.py). Not so for "any server": it may be four slots on a laptop.
    serverless: ClassVar[bool] = False
    unlisted_models: ClassVar[bool] = False  # may a model missing from models.toml run?
    max_content_chars: ClassVar[int | None] = None  # longest message content the API accepts
    default_max_tokens: ClassVar[int] = 256
    # Does it take OpenAI's ``response_format`` with a JSON schema (``--structured``, labeling/structured.py)?
    takes_response_format: ClassVar[bool] = False
    # Does it return the written tokens' logprobs when asked (``--confidence``, labeling/confidence.py)?
    returns_logprobs: ClassVar[bool] = False
    # Parameters in the order they are sent, each with its parser (range and type).
    params: ClassVar[dict[str, Parser]] = {}
    # Prompt tokens the server's chat template may add beyond the Llama 3 count: reserved against
    # --max-cost, so a budget holds even when the template is not the one we count.
    template_slack: ClassVar[int] = 0
    # The shortest prompt the server's prompt cache serves from (tokens), or None when it reports
    # no cached tokens: rows sharing a prefix this long are worth one warm-up request (engine/warmup.py).
    prompt_cache_min: ClassVar[int | None] = None
    prompt_cache_step: ClassVar[int] = 128  # cached tokens come in multiples of this (OpenAI's)

    def url(self, endpoint: str) -> str:
        """The URL requests are posted to, from the endpoint the user gave."""
        return endpoint

    def slots_url(self, endpoint: str) -> str | None:
        """Where the server states how many requests it computes at once, if it may say."""
        return None

    def headers(self, key: str | None) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def encode(self, request: Request) -> bytes:
        raise NotImplementedError

    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> Completion:
        raise NotImplementedError

    def rate_hints(self, headers: Mapping[str, str]) -> RateHints | None:
        """Limits stated by a response's headers, or None when it states none."""
        return None

    def truncated(self, completion: Completion, max_tokens: int) -> bool:
        """Was the reply cut at max_tokens? The server's word when it gives one."""
        if completion.finish_reason is not None:
            return completion.finish_reason == "length"
        return completion.completion_tokens is not None and completion.completion_tokens >= max_tokens

    def advice(self, exc: RunStopError, key_source: str) -> str:
        """What a person should do after the API stopped the run, naming where the key comes from."""
        if exc.reason == "model":
            return (
                f"the server does not serve the model this job asks for ({exc.said()}): every row "
                "would fail alike, so nothing more was sent; choose a model it serves (--model, or the "
                "job file's model; `batchllm models` lists the known ones), then run the command again"
            )
        if exc.reason == "structured":
            return (
                f"the server refuses response_format ({exc.said()}), which --structured on requires: "
                "nothing more was sent, unanswered rows stay pending; --structured auto falls back to "
                "plain requests; --structured off never sends response_format"
            )
        if exc.reason == "confidence":
            return (
                f"the server refuses logprobs ({exc.said()}), which --confidence logprobs requires: "
                "nothing more was sent, unanswered rows stay pending; use --confidence auto to go on "
                "without it (votes with --samples, else no confidence column), or --confidence off"
            )
        if exc.reason == "quota":
            return (
                f"the API says the quota of the key in {key_source} is used up ({exc.said()}); "
                "rows not yet sent stay pending: run the same command again once the quota resets "
                "or is raised"
            )
        return (
            f"the API rejected the key ({exc.said()}): check {key_source}, then run the same "
            "command again to resume"
        )


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds to wait: delta-seconds or an HTTP date (RFC 9110)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def snippet(body: bytes) -> str:
    """The start of a body as one line, for an error message."""
    text = body[:MAX_MESSAGE].decode("utf-8", "replace").strip()
    return " ".join(text.split()) or "(empty body)"


def usage_int(raw: Any) -> int | None:
    """A token count as the API reported it, or None when it is missing or not a count."""
    if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
        return raw
    return None
