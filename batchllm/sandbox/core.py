"""A local emulator of the APIs batchllm speaks, served over real HTTP by aiohttp.web.

It is what the demo, the tests and the benchmarks talk to, through exactly the client code a real
run uses. One ``Sandbox`` serves two faces (faces.py): ``POST /api/v1`` speaks the Dataoorts
envelope of docs/api.md, ``POST /v1/chat/completions`` speaks OpenAI's chat completions. Both
implement auth (401/403), validation of every documented range (400), unknown models, the
context-window check (prompt tokens + max_tokens), and deterministic replies: the same request
always gets the same text, cut at ``max_tokens``. ``prompt_tokens`` is counted by ``tokens.py``,
the same counter ``batchllm estimate`` uses (exact when the Llama 3 tokenizer data is installed).
Every reply word is exactly one Llama 3 token, so ``completion_tokens`` is the word count and
truncation is exact.

Knobs for testing the client under realistic conditions (``SandboxConfig``), shared by both faces:

- latency: fixed + per output token, with +/- jitter;
- slots (slots.py): N requests computed at once for a fixed time each, the rest queued in order,
  as a self-hosted server does; ``GET /props`` states ``total_slots`` as llama.cpp does (unless
  ``slots_props`` is off, a server that says nothing of its slots);
- a server-side rate limit (GCRA, gcra.py: ``rate_limit`` requests/s with ``rate_burst`` tolerance) that
  answers 429 with a wait (``Retry-After`` in whole seconds, as Cloudflare does; the OpenAI face
  also sends ``retry-after-ms`` and states the limit in ``x-ratelimit-*`` headers on every reply);
- ``throttle_first``: the first N requests are answered 429 with a wait of ``throttle_ms``;
- a quota (429 "quota used up" once ``quota`` requests succeeded);
- fault injection rates: 500/503, dropped connections, hangs, garbled bodies, bare 429s, and
  replies without usage.

``GET /_sandbox/stats`` and ``GET /_sandbox/log`` expose what it received, for tests and benchmarks
(the request log holds the user message's hash, never a key).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections import Counter
from typing import Any

import orjson
from aiohttp import web

from ..pricing import Model
from ..records import SANDBOX_HEADER
from ..tokens import get_counter
from . import labeler, packed
from .config import SandboxConfig
from .faces import DataoortsFace, OpenAIFace, Parsed
from .gcra import Gcra
from .logprobs import Mark, content
from .prompt_cache import PromptCache
from .replies import reply_text, served_models
from .slots import Slots

Face = DataoortsFace | OpenAIFace


class Sandbox:
    """The emulator's state and handlers; ``app()`` gives the aiohttp application."""

    def __init__(self, config: SandboxConfig | None = None, models: dict[str, Model] | None = None):
        self.config = config or SandboxConfig()
        self.models = models or served_models()
        self.counter = get_counter()
        self.prompt_cache = PromptCache(self.counter) if self.config.prompt_cache else None
        self.rng = random.Random(self.config.seed)
        self.limiter = (
            Gcra(self.config.rate_limit, self.config.rate_burst) if self.config.rate_limit > 0 else None
        )
        self.slots = Slots(self.config.slots, self.config.slot_seconds) if self.config.slots > 0 else None
        self.stats: Counter[str] = Counter()
        self.log: list[tuple[float, int, str]] = []  # (time, status, hash of the last user message)
        self.bodies: list[bytes] = []
        self.first_at: float | None = None  # wall-clock time of the first and last answer
        self.last_at: float | None = None
        self.started = time.monotonic()
        self._auth = f"Bearer {self.config.api_key}"
        self._arrived = 0
        cfg = self.config
        self.label_rates = [
            ("wrong", cfg.label_wrong),
            ("prose", cfg.label_prose),
            ("out_of_set", cfg.label_out_of_set),
            ("invalid_json", cfg.label_invalid_json),
            ("truncated", cfg.label_truncated),
        ]
        self.pack_knobs = {
            "pack_missing": cfg.pack_missing,
            "pack_prose": cfg.pack_prose,
            "pack_fenced": cfg.pack_fenced,
            "pack_broken": cfg.pack_broken,
            "pack_decay": cfg.pack_decay,
        }

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        if self.config.marked:
            app.on_response_prepare.append(_says_sandbox)
        for face in (
            DataoortsFace(),
            OpenAIFace(self.config.refuse_response_format, self.config.refuse_logprobs),
        ):
            app.router.add_post(face.path, self._handler(face))
        if self.slots is not None and self.config.slots_props:
            app.router.add_get("/props", self.handle_props)
        app.router.add_get("/_sandbox/stats", self.handle_stats)
        app.router.add_get("/_sandbox/log", self.handle_log)
        app.router.add_post("/_sandbox/reset", self.handle_reset)
        return app

    async def handle_stats(self, request: web.Request) -> web.Response:
        body = {**self.stats, "first_at": self.first_at, "last_at": self.last_at}
        if self.slots is not None:
            body["max_queue"] = self.slots.max_queue
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def handle_props(self, request: web.Request) -> web.Response:
        assert self.slots is not None
        return web.Response(body=orjson.dumps(self.slots.props()), content_type="application/json")

    async def handle_reset(self, request: web.Request) -> web.Response:
        self.stats.clear()
        self.log.clear()
        if self.prompt_cache is not None:
            self.prompt_cache.clear()
        self.bodies.clear()
        self.first_at = self.last_at = None
        if self.slots is not None:
            self.slots.max_queue = 0
        return web.Response(text="reset")

    async def handle_log(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.log), content_type="application/json")

    def _record(self, status: int, key: str) -> None:
        now = time.time()
        if self.first_at is None:
            self.first_at = now
        self.last_at = now
        self.stats["requests"] += 1
        self.stats[str(status)] += 1
        if self.config.keep_log:
            self.log.append((time.monotonic() - self.started, status, key))

    def _handler(self, face: Face) -> Any:
        async def handle(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            if self.config.keep_bodies:
                self.bodies.append(body)
            key = _user_key(body)
            response = await self._respond(face, request, body)
            if response is not None and (request.transport is None or request.transport.is_closing()):
                self.stats["given_up"] += 1  # the client left before its answer: computed for nothing
            if response is not None:
                self._record(response.status, key)
                if request.transport is None or request.transport.is_closing():
                    # Answered (and billed) after the client left: it timed out waiting.
                    self.stats["unheard"] += 1
                return response
            # A dropped connection or a hang the client gave up on: no response to record.
            self._record(0, key)
            raise asyncio.CancelledError

        return handle

    def _rate_headers(self, face: Face) -> dict[str, str]:
        if self.limiter is None:
            return {}
        remaining, reset = self.limiter.remaining(time.monotonic())
        return face.rate_headers(round(self.config.rate_limit * 60), remaining, reset)

    async def _respond(self, face: Face, request: web.Request, body: bytes) -> web.StreamResponse | None:
        cfg = self.config
        if cfg.require_key:
            auth = request.headers.get("Authorization")
            if auth is None or not auth.startswith("Bearer "):
                return face.auth_error(401)
            if auth != self._auth:
                return face.auth_error(403)

        self._arrived += 1
        if self._arrived <= cfg.throttle_first:
            return face.throttled(cfg.throttle_ms / 1000)
        if self.limiter is not None:
            wait = self.limiter.admit(time.monotonic())
            if wait > 0:
                response = face.throttled(wait)
                response.headers.update(self._rate_headers(face))
                return response
        if cfg.quota and self.stats["200"] >= cfg.quota:
            return face.quota_error()

        fault = self._fault()
        if fault == "drop":
            if request.transport is not None:
                request.transport.abort()
            return None
        if fault == "hang":
            await asyncio.sleep(3600)
            return None
        if fault == "5xx":
            status = self.rng.choice((500, 503))
            return web.Response(
                status=status,
                text=f"<html><body>{status} upstream error</body></html>",
                content_type="text/html",
            )
        if fault == "3040":
            return face.throttled(0, bare=True)

        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            return face.bad_input("request body is not valid JSON")
        parsed = face.parse(payload)
        if isinstance(parsed, str):
            return face.bad_input(parsed)
        model = self.models.get(parsed.model) if isinstance(parsed.model, str) else None
        if model is None:
            return face.unknown_model(parsed.model)
        return await self._answer(face, parsed, model, fault == "garbled")

    async def _answer(self, face: Face, parsed: Parsed, model: Model, garbled: bool) -> web.Response:
        cfg = self.config
        prompt_tokens = self.counter.count_messages(parsed.messages) + cfg.extra_prompt_tokens
        window = model.context_window or 0
        if prompt_tokens + parsed.max_tokens > window:
            return face.window_error(prompt_tokens + parsed.max_tokens, window)

        in_pack = packed.reply(parsed.messages, parsed.seed_material, self.label_rates, self.pack_knobs)
        labeled = (
            None
            if in_pack is not None
            else labeler.answer(parsed.messages, parsed.seed_material, self.label_rates)
        )
        marks: list[Mark] = []
        if in_pack is not None:
            text, counts, marks = in_pack
            self.stats.update(counts)
            text, n, truncated = self._cut(text, parsed.max_tokens)
        elif labeled is not None:
            text, which, reask, marks = labeled
            self.stats["labeling_reasks" if reask else f"label_{which or 'clean'}"] += 1
            text, n, truncated = self._cut(text, parsed.max_tokens)
        else:
            text, n = reply_text(parsed.seed_material, model.name, *cfg.reply_tokens)
            truncated = n > parsed.max_tokens
            if n > parsed.max_tokens:
                text = " ".join(text.split(" ")[: parsed.max_tokens])
                n = parsed.max_tokens
        if self.slots is not None:
            await self.slots.serve()
        # Looked up as a slot takes the request, stored once it is answered (prompt_cache.py).
        prefix: list[bytes] = []
        cached = 0
        if self.prompt_cache is not None and face.caches_prompts:
            prefix, cached = self.prompt_cache.lookup(model.name, parsed.messages)
        delay = cfg.latency + cfg.latency_per_token * n
        if delay > 0:
            if cfg.jitter:
                delay *= 1 + cfg.jitter * (2 * self.rng.random() - 1)
            await asyncio.sleep(delay)
        usage = not (cfg.no_usage and self.rng.random() < cfg.no_usage)
        if not garbled:  # what the emulated provider bills
            self.stats["prompt_tokens"] += prompt_tokens
            self.stats["completion_tokens"] += n
            self.stats["cached_tokens"] += cached
            if cfg.prices is not None:
                price_in, price_out, *cached_price = cfg.prices
                price_cached = cached_price[0] if cached_price else price_in
                self.stats["billed_pico"] += (
                    (prompt_tokens - cached) * price_in + cached * price_cached + n * price_out
                )
            if self.prompt_cache is not None:
                self.prompt_cache.answered(prefix)
        if parsed.cache_key is not None:
            self.stats["prompt_cache_keyed"] += 1
        odds = (cfg.label_wrong, cfg.overconfident, parsed.top_logprobs, parsed.held)  # logprobs.py
        tokens = content(text, marks, *odds) if parsed.logprobs else None
        response = face.success(
            text, prompt_tokens, n, truncated, cfg.served_model or model.name, usage, cached, tokens
        )
        response.headers.update(self._rate_headers(face))
        if garbled:
            assert isinstance(response.body, bytes)
            response.body = response.body[: len(response.body) // 2]
        return response

    def _cut(self, text: str, max_tokens: int) -> tuple[str, int, bool]:
        """A labeling reply cut at max_tokens, word by word (counted with the real tokenizer)."""
        n = self.counter.completion_tokens(text)
        if n <= max_tokens:
            return text, n, False
        words = text.split(" ")
        while len(words) > 1 and self.counter.completion_tokens(" ".join(words)) > max_tokens:
            words.pop()
        text = " ".join(words)
        if self.counter.completion_tokens(text) > max_tokens:  # one word too long (JSON, no spaces)
            low, high = 0, len(text)  # the longest start of it that fits
            while low < high:
                mid = (low + high + 1) // 2
                low, high = (
                    (mid, high)
                    if self.counter.completion_tokens(text[:mid]) <= max_tokens
                    else (low, mid - 1)
                )
            text = text[:low]
        return text, self.counter.completion_tokens(text), True

    def _fault(self) -> str | None:
        cfg = self.config
        roll = self.rng.random()
        for name, rate in (
            ("5xx", cfg.fail_5xx),
            ("drop", cfg.fail_drop),
            ("hang", cfg.fail_hang),
            ("garbled", cfg.fail_garbled),
            ("3040", cfg.fail_3040),
        ):
            if roll < rate:
                return name
            roll -= rate
        return None


def _user_key(body: bytes) -> str:
    """Hash of the request's last user message: identifies a row in the request log."""
    try:
        payload = orjson.loads(body)
        data = payload.get("data", payload)
        if "messages" in data:
            content = [m for m in data["messages"] if m.get("role") == "user"][-1]["content"]
        else:
            content = data["prompt"]
        return hashlib.blake2b(str(content).encode(), digest_size=8).hexdigest()
    except Exception:  # noqa: BLE001 - any malformed body is logged under one key
        return "malformed"


async def _says_sandbox(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer says it is the sandbox's: a run against a served sandbox (``--endpoint``)
    is play money in the ledger, as a ``--sandbox`` run is (engine/client.py ``played``)."""
    response.headers[SANDBOX_HEADER] = "1"
