"""The two faces of the sandbox: the Dataoorts envelope and OpenAI's chat completions.

A face knows only its wire format: how a request body is read and validated, and how replies and
errors are written. Everything else (auth, rate limit, quota, faults, the reply itself, latency,
counters) is the same for both and lives in ``core.py``, so the two faces answer the same knobs
the same way.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from . import schema

MAX_CHARS = 131_072


@dataclass(frozen=True, slots=True)
class Parsed:
    """What the core needs of a valid request."""

    model: Any  # as sent; an unknown or malformed one is answered by the core
    messages: list[dict[str, Any]]
    max_tokens: int
    seed_material: Any  # what the deterministic reply is derived from
    cache_key: str | None = None  # OpenAI's ``prompt_cache_key``: routing only, the reply ignores it
    logprobs: bool = False  # asked for the written tokens' logprobs (logprobs.py)
    top_logprobs: int = 0  # and each token's likeliest alternatives, so many
    held: bool = False  # the reply is held to a response_format (logprobs.py: what a server reports)


def _json(
    status: int, payload: Any, headers: dict[str, str] | None = None, sort: bool = False
) -> web.Response:
    option = orjson.OPT_SORT_KEYS if sort else 0
    return web.Response(
        status=status,
        body=orjson.dumps(payload, option=option),
        content_type="application/json",
        headers=headers,
    )


def _check_ranges(
    data: dict[str, Any], ranges: dict[str, tuple[type, float, float]], prefix: str
) -> str | None:
    for name, (kind, lo, hi) in ranges.items():
        if name not in data:
            continue
        value = data[name]
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (kind is int and not isinstance(value, int))
        ):
            return f"Type mismatch of '{prefix}{name}', '{type(value).__name__}' not in '{kind.__name__}'"
        if not lo <= value <= hi:
            return f"Value of '{prefix}{name}' must be between {lo:g} and {hi:g}, got {value}"
    return None


class DataoortsFace:
    """``POST /api/v1``: the envelope of docs/api.md, keys sorted, errors with codes."""

    path = "/api/v1"
    default_max_tokens = 256
    caches_prompts = False  # docs/api.md reports no cached tokens
    roles = {"system", "user", "assistant", "tool"}
    ranges: dict[str, tuple[type, float, float]] = {
        "temperature": (float, 0, 5),
        "top_p": (float, 0, 2),
        "top_k": (int, 1, 50),
        "seed": (int, 1, 9_999_999_999),
        "repetition_penalty": (float, 0, 2),
        "frequency_penalty": (float, 0, 2),
        "presence_penalty": (float, 0, 2),
        "max_tokens": (int, 1, 1_000_000),
    }

    def _error(
        self, status: int, code: int, message: str, headers: dict[str, str] | None = None
    ) -> web.Response:
        body = {
            "errors": [{"code": code, "message": message}],
            "messages": [],
            "result": {},
            "success": False,
        }
        return _json(status, body, headers, sort=True)

    def auth_error(self, status: int) -> web.Response:
        return self._error(status, 10000, "Authentication error")

    def throttled(self, wait: float, *, bare: bool = False) -> web.Response:
        if bare:  # a capacity error without a wait, as seen upstream
            return self._error(429, 3040, "AiError: Capacity temporarily exceeded, please try again.")
        return self._error(
            429,
            3040,
            "Capacity temporarily exceeded, please try again.",
            {"Retry-After": str(max(1, math.ceil(wait)))},
        )

    def quota_error(self) -> web.Response:
        return self._error(
            429, 3036, "You have used up your daily free allocation of 10,000 neurons, please upgrade."
        )

    def bad_input(self, detail: str) -> web.Response:
        return self._error(400, 5006, f"AiError: Bad input: Error: {detail}")

    def unknown_model(self, name: Any) -> web.Response:
        return self._error(400, 5007, f"No such model {name} or task")

    def window_error(self, needed: int, window: int) -> web.Response:
        return self._error(
            413,
            5021,
            "AiError: Ai: The estimated number of input and maximum output tokens "
            f"({needed}) exceeded this model context window limit ({window}). ({secrets.token_hex(4)})",
        )

    def parse(self, payload: Any) -> Parsed | str:
        if not isinstance(payload, dict) or not isinstance(payload.get("data"), dict):
            return "oneOf at '/' not met, required properties 'model' and 'data'"
        data = payload["data"]
        has_messages, has_prompt = "messages" in data, "prompt" in data
        if has_messages == has_prompt:
            return "oneOf at '/' not met, exactly one of 'messages' and 'prompt' is required"
        if has_prompt:
            prompt = data["prompt"]
            if not isinstance(prompt, str):
                return "Type mismatch of '/prompt', 'string' not in 'string'"
            if not 1 <= len(prompt) <= MAX_CHARS:
                return f"String length of '/prompt' must be between 1 and {MAX_CHARS}"
            messages = [{"role": "user", "content": prompt}]
        else:
            messages = data["messages"]
            if not isinstance(messages, list) or not messages:
                return "Type mismatch of '/messages', expected a non-empty array"
            for i, m in enumerate(messages):
                if not isinstance(m, dict) or m.get("role") not in self.roles:
                    return (
                        f"oneOf at '/messages/{i}' not met, role must be one of system, user, assistant, tool"
                    )
                if not isinstance(m.get("content"), str):
                    return f"Type mismatch of '/messages/{i}/content', 'array' not in 'string'"
                if len(m["content"]) > MAX_CHARS:
                    return f"String length of '/messages/{i}/content' must be at most {MAX_CHARS}"
        problem = _check_ranges(data, self.ranges, "/")
        if problem:
            return problem
        model = payload.get("model")
        return Parsed(model, messages, data.get("max_tokens", self.default_max_tokens), data)

    def success(
        self,
        text: str,
        prompt_tokens: int,
        n: int,
        truncated: bool,
        model: str,
        usage: bool,
        cached: int = 0,
        logprobs: list[Any] | None = None,  # never asked of this face
    ) -> web.Response:
        result: dict[str, Any] = {"response": text}
        if usage:
            result["usage"] = {
                "completion_tokens": n,
                "prompt_tokens": prompt_tokens,
                "total_tokens": prompt_tokens + n,
            }
        return _json(200, {"errors": [], "messages": [], "result": result, "success": True}, sort=True)

    def rate_headers(self, limit_rpm: int, remaining: int, reset_s: float) -> dict[str, str]:
        return {}  # Cloudflare states no limits in its headers


class OpenAIFace:
    """``POST /v1/chat/completions``: OpenAI's reply and error objects and ``x-ratelimit-*`` headers."""

    path = "/v1/chat/completions"
    default_max_tokens = 256
    caches_prompts = True
    roles = {"system", "user", "assistant", "tool", "developer"}

    def __init__(self, refuse_response_format: bool = False, refuse_logprobs: bool = False) -> None:
        self.refuse_response_format = refuse_response_format
        self.refuse_logprobs = refuse_logprobs

    ranges: dict[str, tuple[type, float, float]] = {
        "temperature": (float, 0, 2),
        "top_p": (float, 0, 1),
        "seed": (int, -(2**63), 2**63 - 1),
        "frequency_penalty": (float, -2, 2),
        "presence_penalty": (float, -2, 2),
        "max_tokens": (int, 1, 1_000_000),
        # vLLM's extra sampling parameters, as a self-hosted server accepts them
        "top_k": (int, -1, 1_000_000),
        "repetition_penalty": (float, 0.01, 2),
    }

    def _error(
        self,
        status: int,
        message: str,
        kind: str,
        code: str | None,
        headers: dict[str, str] | None = None,
        param: str | None = None,
    ) -> web.Response:
        return _json(
            status, {"error": {"message": message, "type": kind, "param": param, "code": code}}, headers
        )

    def auth_error(self, status: int) -> web.Response:
        return self._error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")

    def throttled(self, wait: float, *, bare: bool = False) -> web.Response:
        headers = (
            None
            if bare
            else {"retry-after-ms": str(round(wait * 1000)), "retry-after": str(max(1, math.ceil(wait)))}
        )
        return self._error(
            429, "Rate limit reached for requests.", "requests", "rate_limit_exceeded", headers
        )

    def quota_error(self) -> web.Response:
        return self._error(
            429,
            "You exceeded your current quota, please check your plan and billing details.",
            "insufficient_quota",
            "insufficient_quota",
        )

    def bad_input(self, detail: str) -> web.Response:
        return self._error(400, detail, "invalid_request_error", None)

    def unknown_model(self, name: Any) -> web.Response:
        return self._error(
            404, f"The model `{name}` does not exist.", "invalid_request_error", "model_not_found"
        )

    def window_error(self, needed: int, window: int) -> web.Response:
        return self._error(
            400,
            f"This model's maximum context length is {window} tokens. However, you requested {needed} "
            "tokens. Please reduce the length of the messages or completion.",
            "invalid_request_error",
            "context_length_exceeded",
            param="messages",
        )

    def parse(self, payload: Any) -> Parsed | str:
        if not isinstance(payload, dict):
            return "the request body must be a JSON object"
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty array"
        flat = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in self.roles:
                return f"messages[{i}].role must be one of {', '.join(sorted(self.roles))}"
            content = m.get("content")
            if isinstance(content, list):  # content parts: only text ones here
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    return f"messages[{i}].content: only text parts are supported"
                content = "".join(str(p.get("text", "")) for p in content)
            if not isinstance(content, str):
                return f"messages[{i}].content must be a string"
            flat.append({"role": m["role"], "content": content})
        problem = _check_ranges(payload, self.ranges, "")
        if problem:
            return problem
        stop = payload.get("stop")
        if stop is not None and not (
            isinstance(stop, str)
            or (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop))
        ):
            return "'stop' must be a string or a list of at most 4 strings"
        if not isinstance(payload.get("model"), str):
            return "'model' is required"
        if "response_format" in payload:  # replies held to it: labeler.py, packed.py
            if self.refuse_response_format:
                return "Invalid parameter: 'response_format' of type 'json_schema' is not supported with this model."
            why = schema.problem(payload["response_format"])
            if why:
                return why
        logprobs = payload.get("logprobs", False)
        if not isinstance(logprobs, bool):
            return (
                f"Invalid type for 'logprobs': expected a boolean, but got {type(logprobs).__name__} instead."
            )
        if logprobs and self.refuse_logprobs:  # as a server that cannot return them
            return "Invalid parameter: 'logprobs' is not supported with this model."
        top = payload.get("top_logprobs", 0)
        if type(top) is not int or not 0 <= top <= 20:
            return "Invalid 'top_logprobs': expected an integer from 0 to 20."
        if top and not logprobs:
            return "Invalid 'top_logprobs': 'logprobs' must be true when 'top_logprobs' is set."
        cache_key = payload.get("prompt_cache_key")
        if cache_key is not None and not isinstance(cache_key, str):
            return "'prompt_cache_key' must be a string"
        seed_material = {k: v for k, v in payload.items() if k not in ("model", "prompt_cache_key")}
        seed_material["messages"] = flat
        return Parsed(
            payload["model"],
            flat,
            payload.get("max_tokens", self.default_max_tokens),
            seed_material,
            cache_key,
            logprobs,
            top,
            "response_format" in payload,
        )

    def success(
        self,
        text: str,
        prompt_tokens: int,
        n: int,
        truncated: bool,
        model: str,
        usage: bool,
        cached: int = 0,
        logprobs: list[Any] | None = None,
    ) -> web.Response:
        body: dict[str, Any] = {
            "id": "chatcmpl-" + secrets.token_hex(12),
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "length" if truncated else "stop",
                    "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
                }
            ],
        }
        if usage:
            body["usage"] = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": n,
                "total_tokens": prompt_tokens + n,
                "prompt_tokens_details": {"cached_tokens": cached},
            }
        return _json(200, body)

    def rate_headers(self, limit_rpm: int, remaining: int, reset_s: float) -> dict[str, str]:
        return {
            "x-ratelimit-limit-requests": str(limit_rpm),
            "x-ratelimit-remaining-requests": str(remaining),
            "x-ratelimit-reset-requests": f"{max(0, round(reset_s * 1000))}ms",
        }
