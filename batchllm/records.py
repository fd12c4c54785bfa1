"""The values that cross modules: what is asked, what comes back, what is kept.

    Request     provider, model, messages, parameters; ``key()`` hashes the canonical form
    Completion  a reply as the provider reported it: text, usage (or None), finish_reason
    RateHints   what a reply's headers say about the account's limits
    Entry       one finished row in the journal (a NamedTuple: SQLite takes it as it is)

A ``Request`` is provider-neutral: each provider encodes it into its own body (providers/). Its
``key`` is the same for the same request in any run or process (sorted keys, no whitespace, UTF-8),
so it can name a request across runs (a cache, duplicate detection).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

# The header every answer of batchllm's sandbox carries: a run it answers is play money, served
# (``batchllm sandbox``) or built in (``--sandbox``) alike (engine/client.py ``played``).
SANDBOX_HEADER = "X-Batchllm-Sandbox"


# Message and Request are built once per row on the hot path: plain slotted dataclasses, since a
# frozen one pays an ``object.__setattr__`` per field. Treat them as immutable all the same.
@dataclass(slots=True)
class Message:
    """One chat turn. orjson encodes it as ``{"role": ..., "content": ...}``, in that order."""

    role: str
    content: str


@dataclass(slots=True)
class Request:
    """One chat request: the unit a provider encodes and the key a cache would use.

    ``params`` holds the sampling parameters in the order the provider sends them; one mapping is
    shared by every row of a job, so treat it as read-only.
    """

    provider: str
    model: str
    messages: tuple[Message, ...]
    params: Mapping[str, Any]
    # Names the request's shared prefix for the server's prompt cache (prompts.py
    # ``prompt_cache_key``): routing only, so not part of ``key()``.
    cache_key: str | None = None

    def key(self) -> str:
        """Hex digest of the canonical request: stable across runs, processes and param order."""
        canonical = orjson.dumps(
            [self.provider, self.model, self.messages, self.params], option=orjson.OPT_SORT_KEYS
        )
        return hashlib.blake2b(canonical, digest_size=16).hexdigest()

    @property
    def max_tokens(self) -> int | None:
        value = self.params.get("max_tokens")
        return value if isinstance(value, int) else None


@dataclass(frozen=True, slots=True)
class Completion:
    """A successful reply. A usage field is None when the server did not report it."""

    text: str
    prompt_tokens: int | None
    completion_tokens: int | None
    finish_reason: str | None = None
    endpoint: str | None = None  # the fleet endpoint that answered (engine/router.py)
    cached_tokens: int = 0  # of prompt_tokens, served from the server's prompt cache (0: it said none)
    # The reply's own ``model`` (None: the provider names none): a server answers with the model
    # it has loaded, whatever was asked (llama.cpp names its file).
    model: str | None = None
    # The written tokens' ``{"token", "logprob"}`` entries, when asked for and returned.
    logprobs: list[Any] | None = None


@dataclass(frozen=True, slots=True)
class RateHints:
    """Limits a server stated in its headers; per minute, as OpenAI documents them."""

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None


class Entry(NamedTuple):
    """One finished row as the journal keeps it (column for column, see engine/journal.py).

    Costs are integer picodollars, or None when the model has no price. ``truncated`` is what
    the provider said (or, for one that does not say, what its contract implies);
    ``tokens_counted`` is True when the server reported no usage and batchllm counted it. For a
    labeling job, tokens and costs are the sums over all the row's requests (re-asks and samples
    included) and ``extra`` holds the labeling result as JSON (labeling/rows.py).
    ``request_key`` is the row's ``Request.key()``; a row answered without a request of its own
    has ``answered_by`` (the row in this output whose identical request paid) or ``cached``
    (served from the response cache), and costs nothing. ``model`` is the model asked for (and
    priced); ``served_model`` the one the replies named, when they named one.
    """

    row_id: str
    content_hash: str
    status: str  # "ok", "error", or "invalid" (a labeling answer that never validated)
    response: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    input_cost_pico: int | None
    output_cost_pico: int | None
    error: str | None
    error_class: str | None
    attempts: int
    latency_ms: float | None
    finished_at: float
    model: str | None
    truncated: bool | None
    tokens_counted: bool | None
    extra: str | None = None
    request_key: str | None = None
    answered_by: str | None = None
    cached: bool | None = None
    endpoint: str | None = None  # the fleet endpoint that answered (--fleet), else None
    # Of prompt_tokens, those the server served from its prompt cache (billed at the cached price).
    cached_tokens: int | None = None
    served_model: str | None = None  # the model the reply named (``model`` is the one asked for)
    # What cached_tokens cost less than at the input price, at the prices the row was answered
    # at (pricing.cached_saving); None in a row from before it was kept, or without prices.
    cached_saved_pico: int | None = None
