"""A local emulator of the Dataoorts API (CONTRACT.md), served over real HTTP by aiohttp.web.

It is what the demo, the tests and the benchmarks talk to, through exactly the client code a real
run uses. It implements the contract's envelope (keys sorted), Bearer auth (401/403, code 10000),
validation of every documented range (400/5006), unknown models (400/5007), the context-window
check (prompt tokens + max_tokens, 413/5021 with the documented message), and deterministic
replies: the same request always gets the same text, cut at ``max_tokens``. ``prompt_tokens`` is
counted by ``tokens.py``, the same counter ``batchllm estimate`` uses (exact when the Llama 3
tokenizer data is installed). Every reply word is exactly one Llama 3 token, so
``completion_tokens`` is the word count and truncation is exact.

Knobs for testing the client under realistic conditions (``SandboxConfig``):

- latency: fixed + per output token, with +/- jitter;
- a server-side rate limit (GCRA: ``rate_limit`` requests/s with ``rate_burst`` tolerance) that
  answers 429/3040 with ``Retry-After`` in whole seconds, as Cloudflare does;
- a daily quota (429/3036 once ``quota`` requests succeeded);
- fault injection rates: 500/503, dropped connections, hangs, garbled bodies, bare 3040s.

``GET /_sandbox/stats`` and ``GET /_sandbox/log`` expose what it received, for tests and benchmarks
(the request log holds the user message's hash, never a key).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from .pricing import Model, load_models
from .tokens import get_counter

_ROLES = {"system", "user", "assistant", "tool"}
MAX_CHARS = 131_072
DEFAULT_MAX_TOKENS = 256
_RANGES: dict[str, tuple[type, float, float]] = {
    "temperature": (float, 0, 5),
    "top_p": (float, 0, 2),
    "top_k": (int, 1, 50),
    "seed": (int, 1, 9_999_999_999),
    "repetition_penalty": (float, 0, 2),
    "frequency_penalty": (float, 0, 2),
    "presence_penalty": (float, 0, 2),
    "max_tokens": (int, 1, 1_000_000),
}
# Each is a single Llama 3 token both as " word" and as "Word" (checked by the tests), so a reply
# of n words is exactly n completion tokens.
_WORDS = [
    "the",
    "data",
    "model",
    "system",
    "value",
    "result",
    "process",
    "first",
    "answer",
    "review",
    "product",
    "quality",
    "service",
    "price",
    "good",
    "great",
    "poor",
    "simple",
    "clear",
    "strong",
    "small",
    "large",
    "fast",
    "slow",
    "better",
    "common",
    "general",
    "local",
    "final",
    "total",
    "overall",
    "rating",
    "customer",
    "order",
    "delivery",
    "support",
    "design",
    "feature",
    "battery",
    "screen",
    "sound",
    "size",
    "color",
    "material",
    "experience",
    "issue",
    "problem",
    "solution",
    "option",
    "level",
    "point",
    "part",
    "case",
    "example",
    "report",
    "summary",
    "sample",
    "label",
    "class",
    "category",
    "positive",
    "negative",
    "neutral",
    "because",
    "while",
    "however",
    "also",
    "very",
    "quite",
    "rather",
    "often",
    "usually",
]


@dataclass
class SandboxConfig:
    api_key: str = field(default_factory=lambda: "sandbox-" + secrets.token_hex(8))
    latency: float = 0.0  # seconds before the reply
    latency_per_token: float = 0.0  # seconds per completion token
    jitter: float = 0.0  # +/- fraction of the latency
    reply_tokens: tuple[int, int] = (8, 64)  # natural reply length range, before max_tokens
    rate_limit: float = 0.0  # requests per second; 0 = no limit
    rate_burst: int = 2
    quota: int = 0  # successful requests before 429/3036; 0 = no quota
    fail_5xx: float = 0.0
    fail_drop: float = 0.0
    fail_hang: float = 0.0
    fail_garbled: float = 0.0
    fail_3040: float = 0.0
    seed: int | None = None  # fault-injection RNG; replies are deterministic regardless
    keep_log: bool = True
    keep_bodies: bool = False  # keep raw request bodies (tests check them byte for byte)


class _Gcra:
    """Generic cell rate algorithm: ``rate``/s, up to ``burst`` back to back."""

    def __init__(self, rate: float, burst: int) -> None:
        self.interval = 1.0 / rate
        self.tolerance = (max(1, burst) - 1) * self.interval
        self.tat = 0.0

    def admit(self, now: float) -> float:
        """0 when admitted, else seconds until a request would be."""
        allowed_at = self.tat - self.tolerance
        if now < allowed_at:
            return allowed_at - now
        self.tat = max(now, self.tat) + self.interval
        return 0.0


def _error(status: int, code: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"errors": [{"code": code, "message": message}], "messages": [], "result": {}, "success": False}
    return web.Response(
        status=status,
        body=orjson.dumps(body, option=orjson.OPT_SORT_KEYS),
        content_type="application/json",
        headers=headers,
    )


def _bad_input(detail: str) -> web.Response:
    return _error(400, 5006, f"AiError: Bad input: Error: {detail}")


def reply_text(data: dict[str, Any], model: str, low: int, high: int) -> tuple[str, int]:
    """The deterministic natural reply for a request (before max_tokens): text and token count."""
    digest = hashlib.sha256(orjson.dumps([model, data], option=orjson.OPT_SORT_KEYS)).digest()
    rng = random.Random(digest)
    n = rng.randint(low, max(low, high))
    words = [rng.choice(_WORDS) for _ in range(n)]
    if words:
        words[0] = words[0].capitalize()
    return " ".join(words), n


class Sandbox:
    """The emulator's state and handlers; ``app()`` gives the aiohttp application."""

    def __init__(self, config: SandboxConfig | None = None, models: dict[str, Model] | None = None):
        self.config = config or SandboxConfig()
        self.models = models or load_models()
        self.counter = get_counter()
        self.rng = random.Random(self.config.seed)
        self.limiter = (
            _Gcra(self.config.rate_limit, self.config.rate_burst) if self.config.rate_limit > 0 else None
        )
        self.stats: Counter[str] = Counter()
        self.log: list[tuple[float, int, str]] = []  # (time, status, hash of the last user message)
        self.bodies: list[bytes] = []
        self.first_at: float | None = None  # wall-clock time of the first and last answer
        self.last_at: float | None = None
        self.started = time.monotonic()
        self._auth = f"Bearer {self.config.api_key}"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/api/v1", self.handle)
        app.router.add_get("/_sandbox/stats", self.handle_stats)
        app.router.add_get("/_sandbox/log", self.handle_log)
        app.router.add_post("/_sandbox/reset", self.handle_reset)
        return app

    async def handle_stats(self, request: web.Request) -> web.Response:
        body = {**self.stats, "first_at": self.first_at, "last_at": self.last_at}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def handle_reset(self, request: web.Request) -> web.Response:
        self.stats.clear()
        self.log.clear()
        self.bodies.clear()
        self.first_at = self.last_at = None
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

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if self.config.keep_bodies:
            self.bodies.append(body)
        key = _user_key(body)
        response = await self._respond(request, body)
        if response is not None:
            self._record(response.status, key)
            return response
        # A dropped connection or a hang the client gave up on: no response to record.
        self._record(0, key)
        raise asyncio.CancelledError

    async def _respond(self, request: web.Request, body: bytes) -> web.StreamResponse | None:
        cfg = self.config
        auth = request.headers.get("Authorization")
        if auth is None or not auth.startswith("Bearer "):
            return _error(401, 10000, "Authentication error")
        if auth != self._auth:
            return _error(403, 10000, "Authentication error")

        if self.limiter is not None:
            wait = self.limiter.admit(time.monotonic())
            if wait > 0:
                return _error(
                    429,
                    3040,
                    "Capacity temporarily exceeded, please try again.",
                    {"Retry-After": str(max(1, math.ceil(wait)))},
                )
        if cfg.quota and self.stats["200"] >= cfg.quota:
            return _error(
                429, 3036, "You have used up your daily free allocation of 10,000 neurons, please upgrade."
            )

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
            return _error(429, 3040, "AiError: Capacity temporarily exceeded, please try again.")

        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _bad_input("request body is not valid JSON")
        if not isinstance(payload, dict) or not isinstance(payload.get("data"), dict):
            return _bad_input("oneOf at '/' not met, required properties 'model' and 'data'")
        model_name = payload.get("model")
        model = self.models.get(model_name) if isinstance(model_name, str) else None
        if model is None:
            return _error(400, 5007, f"No such model {model_name} or task")
        data = payload["data"]
        problem = _validate(data)
        if problem:
            return _bad_input(problem)

        messages = data.get("messages")
        if messages is None:
            messages = [{"role": "user", "content": data["prompt"]}]
        prompt_tokens = self.counter.count_messages(messages)
        max_tokens = data.get("max_tokens", DEFAULT_MAX_TOKENS)
        if prompt_tokens + max_tokens > model.context_window:
            return _error(
                413,
                5021,
                "AiError: Ai: The estimated number of input and maximum output tokens "
                f"({prompt_tokens + max_tokens}) exceeded this model context window limit "
                f"({model.context_window}). ({secrets.token_hex(4)})",
            )

        text, n = reply_text(data, model.name, *cfg.reply_tokens)
        if n > max_tokens:
            text = " ".join(text.split(" ")[:max_tokens])
            n = max_tokens
        delay = cfg.latency + cfg.latency_per_token * n
        if delay > 0:
            if cfg.jitter:
                delay *= 1 + cfg.jitter * (2 * self.rng.random() - 1)
            await asyncio.sleep(delay)

        result = {
            "errors": [],
            "messages": [],
            "result": {
                "response": text,
                "usage": {
                    "completion_tokens": n,
                    "prompt_tokens": prompt_tokens,
                    "total_tokens": prompt_tokens + n,
                },
            },
            "success": True,
        }
        encoded = orjson.dumps(result, option=orjson.OPT_SORT_KEYS)
        if fault == "garbled":
            return web.Response(
                status=200, body=encoded[: len(encoded) // 2], content_type="application/json"
            )
        return web.Response(status=200, body=encoded, content_type="application/json")

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
        data = orjson.loads(body)["data"]
        if "messages" in data:
            content = [m for m in data["messages"] if m.get("role") == "user"][-1]["content"]
        else:
            content = data["prompt"]
        return hashlib.blake2b(str(content).encode(), digest_size=8).hexdigest()
    except Exception:  # noqa: BLE001 - any malformed body is logged under one key
        return "malformed"


def _validate(data: dict[str, Any]) -> str | None:
    has_messages, has_prompt = "messages" in data, "prompt" in data
    if has_messages == has_prompt:
        return "oneOf at '/' not met, exactly one of 'messages' and 'prompt' is required"
    if has_prompt:
        prompt = data["prompt"]
        if not isinstance(prompt, str):
            return "Type mismatch of '/prompt', 'string' not in 'string'"
        if not 1 <= len(prompt) <= MAX_CHARS:
            return f"String length of '/prompt' must be between 1 and {MAX_CHARS}"
    else:
        messages = data["messages"]
        if not isinstance(messages, list) or not messages:
            return "Type mismatch of '/messages', expected a non-empty array"
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in _ROLES:
                return f"oneOf at '/messages/{i}' not met, role must be one of system, user, assistant, tool"
            if not isinstance(m.get("content"), str):
                return f"Type mismatch of '/messages/{i}/content', 'array' not in 'string'"
            if len(m["content"]) > MAX_CHARS:
                return f"String length of '/messages/{i}/content' must be at most {MAX_CHARS}"
    for name, (kind, lo, hi) in _RANGES.items():
        if name not in data:
            continue
        value = data[name]
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (kind is int and not isinstance(value, int))
        ):
            return f"Type mismatch of '/{name}', '{type(value).__name__}' not in '{kind.__name__}'"
        if not lo <= value <= hi:
            return f"Value of '/{name}' must be between {lo:g} and {hi:g}, got {value}"
    return None


async def start_sandbox(
    config: SandboxConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, Sandbox, str]:
    """Start the sandbox in the running loop; returns (runner, sandbox, endpoint URL)."""
    sandbox = Sandbox(config)
    runner = web.AppRunner(sandbox.app(), access_log=None, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096)
    await site.start()
    # The bound port (port 0 picks a free one): aiohttp exposes it only through the server.
    sockets = getattr(site._server, "sockets", None)
    assert sockets, "the sandbox did not bind"
    bound = sockets[0].getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return runner, sandbox, f"http://{shown}:{bound}/api/v1"
