"""Any server that speaks OpenAI's chat completions: vLLM, Ollama, llama.cpp, LiteLLM, OpenAI.

Request: ``POST {base}/chat/completions`` with ``{"model", "messages", <params>, <extra_body>}``;
the endpoint the user gives is the base URL (``http://host:8000/v1``). Success:
``choices[0].message.content``, ``choices[0].finish_reason`` (``length`` = cut at max_tokens),
``usage``, which some servers leave out (the dispatcher then counts; its
``prompt_tokens_details.cached_tokens`` are the prompt tokens served from the server's prompt
cache), and ``model``, the model that answered (OpenAI a dated snapshot of the one asked for,
llama.cpp the file it loaded). Failure: an error object
``{"error": {"message", "type", "code", "param"}}`` (some servers send a bare string).

Classification: 401/403 stop the run (key); a 429 whose code or type is ``insufficient_quota``
stops it (quota); other 429s, 408, 409 and 5xx are retried after ``retry-after-ms`` or
``retry-after``; everything else fails the row. The ``x-ratelimit-*`` headers (limits per minute,
resets as durations like ``1s``, ``6m0s``, ``120ms``) become ``RateHints`` for the limiter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import orjson

from ..errors import FatalAPIError, RetryableAPIError, RunStopError
from ..records import Completion, RateHints, Request
from ..values import duration_seconds, integer, number, strings
from .base import MAX_MESSAGE, Provider, parse_retry_after, snippet, usage_int

QUOTA = "insufficient_quota"


class OpenAI(Provider):
    name = "openai"
    default_endpoint = "https://api.openai.com/v1"
    endpoint_env = "OPENAI_BASE_URL"
    key_env = "OPENAI_API_KEY"
    key_required = False  # vLLM, Ollama and llama.cpp run without one
    documented_rpm = 300.0  # no published figure for "any server": start where Dataoorts does
    unlisted_models = True
    default_max_tokens = 256
    takes_response_format = True  # a server that refuses it: engine/refusable.py
    returns_logprobs = True  # asked with "logprobs": true; a server that refuses: engine/refusable.py
    params = {
        "max_tokens": integer(1, None),
        "temperature": number(0, 2),
        "top_p": number(0, 1),
        "seed": integer(None, None),
        "frequency_penalty": number(-2, 2),
        "presence_penalty": number(-2, 2),
        "stop": strings(4),
    }
    # A server's own chat template (vLLM's Llama 3.1 template adds a date preamble) may bill more
    # prompt tokens than the plain template counted here.
    template_slack = 64
    # OpenAI caches prompts from 1,024 tokens; vLLM and llama.cpp from less, so the warm-up
    # (engine/warmup.py) pays off on them too from here.
    prompt_cache_min = 1024

    def url(self, endpoint: str) -> str:
        return endpoint.rstrip("/") + "/chat/completions"

    def encode(self, request: Request) -> bytes:
        if request.cache_key is not None:  # groups one prefix's requests on OpenAI's cache
            return orjson.dumps(
                {
                    "model": request.model,
                    "messages": request.messages,
                    **request.params,
                    "prompt_cache_key": request.cache_key,
                }
            )
        return orjson.dumps({"model": request.model, "messages": request.messages, **request.params})

    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> Completion:
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            payload = None
        if 200 <= status < 300:
            if not isinstance(payload, dict):
                raise RetryableAPIError(f"response body is not JSON: {snippet(body)}", status)
            if "choices" not in payload and "error" in payload:
                _raise_for(status or 500, payload, body, headers)
            return _completion(payload, status, body)
        _raise_for(status, payload, body, headers)
        raise AssertionError("unreachable")

    def rate_hints(self, headers: Mapping[str, str]) -> RateHints | None:
        limit = headers.get("x-ratelimit-limit-requests")
        limit_tokens = headers.get("x-ratelimit-limit-tokens")
        if limit is None and limit_tokens is None:
            return None
        return RateHints(
            limit_requests=_int(limit),
            remaining_requests=_int(headers.get("x-ratelimit-remaining-requests")),
            reset_requests_s=_seconds(headers.get("x-ratelimit-reset-requests")),
            limit_tokens=_int(limit_tokens),
            remaining_tokens=_int(headers.get("x-ratelimit-remaining-tokens")),
            reset_tokens_s=_seconds(headers.get("x-ratelimit-reset-tokens")),
        )

    def slots_url(self, endpoint: str) -> str | None:
        # llama.cpp states ``total_slots`` at the server's root; other servers answer 404.
        parts = urlsplit(endpoint)
        return f"{parts.scheme}://{parts.netloc}/props"


def _completion(payload: dict[str, Any], status: int, body: bytes) -> Completion:
    # The shape nearly every reply has, read at once (a few microseconds a row at zero latency);
    # anything else falls through to the field-by-field checks and their messages.
    try:
        choice = payload["choices"][0]
        content = choice["message"]["content"]
        finish = choice.get("finish_reason")
        usage = payload["usage"]
        prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
        details = usage.get("prompt_tokens_details")
        cached = 0 if details is None else details.get("cached_tokens") or 0
        model = payload.get("model")
    except (KeyError, IndexError, TypeError, AttributeError):
        pass
    else:
        if (
            type(content) is str
            and type(prompt) is int
            and type(completion) is int
            and prompt >= 0
            and completion >= 0
            and (finish is None or type(finish) is str)
            and type(cached) is int
            and 0 <= cached <= prompt
            and (model is None or type(model) is str)
        ):
            logprobs = choice.get("logprobs")  # asked for: a labeling row's confidence
            tokens = logprobs.get("content") if type(logprobs) is dict else None
            return Completion(content, prompt, completion, finish, None, cached, model or None,
                              tokens if type(tokens) is list else None)  # fmt: skip
    choices = payload.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else None
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        raise RetryableAPIError(f"reply without choices[0].message: {snippet(body)}", status)
    content = message.get("content")
    if content is None:  # a refusal or tool call: billed, so kept, as empty text
        content = ""
    if not isinstance(content, str):
        raise RetryableAPIError(f"choices[0].message.content is not text: {snippet(body)}", status)
    finish = choice.get("finish_reason") if isinstance(choice, dict) else None
    usage = payload.get("usage")
    prompt = completion = None
    cached = 0
    if isinstance(usage, dict):
        prompt = usage_int(usage.get("prompt_tokens"))
        completion = usage_int(usage.get("completion_tokens"))
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and prompt is not None:
            # Never more than the prompt: a server's odd figure must not make a cost negative.
            cached = min(usage_int(details.get("cached_tokens")) or 0, prompt)
    model = payload.get("model")  # the model that answered
    # Asked for (a labeling row's confidence): the written tokens, kept as the server sent them
    # and read only as far as the label (labeling/confidence.py).
    logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
    tokens = logprobs.get("content") if isinstance(logprobs, dict) else None
    # Positional (per reply): text, usage, finish_reason, endpoint (a fleet's, set later), cached, model, logprobs.
    return Completion(
        content,
        prompt,
        completion,
        finish if isinstance(finish, str) else None,
        None,
        cached,
        model if isinstance(model, str) and model else None,
        tokens if isinstance(tokens, list) else None,
    )


def _error_fields(payload: Any, body: bytes) -> tuple[str, str | None, str | None]:
    """(message, code, type) of an OpenAI error object, a bare error string, or any body."""
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        code, kind = error.get("code"), error.get("type")
        message = error.get("message")
        return (
            str(message) if message else "no error message",
            None if code is None else str(code),
            None if kind is None else str(kind),
        )
    if isinstance(error, str) and error:
        return error, None, None
    if isinstance(payload, dict) and isinstance(payload.get("detail"), str):  # FastAPI-style servers
        return payload["detail"], None, None
    return snippet(body), None, None


def _raise_for(status: int, payload: Any, body: bytes, headers: Mapping[str, str]) -> None:
    message, code, kind = _error_fields(payload, body)
    message = message[:MAX_MESSAGE]
    if status in (401, 403):
        raise RunStopError(message, status, code, reason="auth")
    if QUOTA in (code, kind):
        raise RunStopError(message, status, code, reason="quota")
    if code == "model_not_found" or (status == 404 and "model" in message.lower()):
        raise RunStopError(message, status, code, reason="model")
    if status in (408, 409, 429) or status >= 500:
        raise RetryableAPIError(message, status, code, _retry_after(headers))
    raise FatalAPIError(message, status, code)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    return parse_retry_after(headers.get("retry-after"))


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(float(value))
    except ValueError:
        return None


def _seconds(value: str | None) -> float | None:
    return None if value is None else duration_seconds(value)
