"""The sandbox's knobs (``SandboxConfig``): latency, slots, rate limits, faults, a labeling
model's mistakes, what it bills. Shared by both faces; ``core.py`` says what each does."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field


@dataclass
class SandboxConfig:
    api_key: str = field(default_factory=lambda: "sandbox-" + secrets.token_hex(8))
    require_key: bool = True  # False: like a local server, any or no key is accepted
    # Answers carry records.SANDBOX_HEADER, so runs against it are play money: `batchllm sandbox`
    # (served to users); not the tests', which stand in for a real API.
    marked: bool = False
    latency: float = 0.0  # seconds before the reply
    latency_per_token: float = 0.0  # seconds per completion token
    jitter: float = 0.0  # +/- fraction of the latency
    slots: int = 0  # requests computed at once, the rest queued (slots.py); 0 = no limit
    slot_seconds: float = 0.0  # seconds each request holds its slot
    slots_props: bool = True  # GET /props states total_slots, as llama.cpp does
    reply_tokens: tuple[int, int] = (8, 64)  # natural reply length range, before max_tokens
    rate_limit: float = 0.0  # requests per second; 0 = no limit
    rate_burst: int = 2
    throttle_first: int = 0  # the first N requests get a 429 ...
    throttle_ms: int = 1000  # ... asking for this wait
    quota: int = 0  # successful requests before 429 "quota used up"; 0 = no quota
    fail_5xx: float = 0.0
    fail_drop: float = 0.0
    fail_hang: float = 0.0
    fail_garbled: float = 0.0
    fail_3040: float = 0.0  # bare 429s, without a wait
    no_usage: float = 0.0  # share of replies that leave usage out
    # Prompt tokens usage counts (and bills) beyond the messages', as a server with a template or
    # system prompt of its own does: more than the client can know before the first reply.
    extra_prompt_tokens: int = 0
    # As a labeling model (labeler.py): shares of first answers that are wrong, wrapped in prose,
    # outside the label set (or of the wrong type), broken JSON, or cut off at max_tokens.
    label_wrong: float = 0.0
    label_prose: float = 0.0
    label_out_of_set: float = 0.0
    label_invalid_json: float = 0.0
    label_truncated: float = 0.0
    # Packed requests (--pack, packed.py): items left out or wrapped in prose, replies fenced or
    # in prose, replies broken off, and the error added per other row in the pack.
    pack_missing: float = 0.01
    pack_prose: float = 0.02
    pack_fenced: float = 0.05
    pack_broken: float = 0.0
    pack_decay: float = 0.004
    # The OpenAI face answers 400 naming response_format, as a server without JSON mode does;
    # otherwise it holds replies to the schema (schema.py).
    refuse_response_format: bool = False
    # Asked for logprobs (OpenAI face, logprobs.py): the share of an answer's doubt taken away
    # (an overconfident model), or a 400 naming logprobs, as a server that cannot return them.
    overconfident: float = 0.0
    refuse_logprobs: bool = False
    seed: int | None = None  # fault-injection RNG; replies are deterministic regardless
    keep_log: bool = True
    keep_bodies: bool = False  # keep raw request bodies (tests check them byte for byte)
    # What it bills, picodollars a prompt, a completion and a cached prompt token (the prompt's
    # price when only two are given): ``billed_pico`` in its stats (a fleet's sandboxes each bill
    # at their endpoint's prices, sandbox/fleet.py).
    prices: tuple[int, ...] | None = None
    prompt_cache: bool = True  # the OpenAI face caches shared prefixes as OpenAI does (prompt_cache.py)
    # The model its OpenAI face names in replies, whatever was asked (None: the one asked for),
    # as a self-hosted server names the model it has loaded (llama.cpp: its file).
    served_model: str | None = None
