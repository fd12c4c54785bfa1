"""The Dataoorts serverless API (docs/api.md): its envelope, parameters, codes and limits.

Request: ``POST {endpoint}`` with ``{"model": ..., "data": {"messages": [...], <params>}}``.
Success: ``{"errors": [], "messages": [], "result": {"response", "usage"}, "success": true}``;
failure: the same envelope with ``success: false`` and ``errors[0] = {code, message}`` (codes may
arrive as strings). Replies carry no ``finish_reason``: a reply was cut exactly when
``completion_tokens == max_tokens``. Classification is by HTTP status first, then by code:
401/403/10000 stop the run (key), 3036/4006 stop it (quota), 3040 inside any status is the
server asking us to slow down (a 429), 408/409/429/5xx and 3007/3008 are retried, the rest fail
the row.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from ..errors import FatalAPIError, RetryableAPIError, RunStopError
from ..records import Completion, Request
from ..values import integer, number
from .base import MAX_MESSAGE, Provider, parse_retry_after, snippet, usage_int

AUTH_CODES = {10000}
QUOTA_CODES = {3036, 4006}
MODEL_CODES = {5007}  # "No such model ... or task": no row can succeed (docs/api.md)
CAPACITY_CODE = 3040
RETRYABLE_CODES = {CAPACITY_CODE, 3007, 3008}


class Dataoorts(Provider):
    name = "dataoorts"
    default_endpoint = "https://cloud.dataoorts.com/api/v1"
    endpoint_env = "DATAOORTS_ENDPOINT"
    key_env = "DATAOORTS_API_KEY"
    # Workers AI's documented limit, which the provider sits on (docs/api.md).
    documented_rpm = 300.0
    serverless = True
    max_content_chars = 131_072
    default_max_tokens = 256  # the API's own default when left out; we always send it
    # The page's order: the request body stays byte for byte what the page shows.
    params = {
        "temperature": number(0, 5),
        "top_p": number(0, 2),
        "top_k": integer(1, 50),
        "max_tokens": integer(1, None),
        "seed": integer(1, 9_999_999_999),
        "repetition_penalty": number(0, 2),
        "frequency_penalty": number(0, 2),
        "presence_penalty": number(0, 2),
    }

    def encode(self, request: Request) -> bytes:
        return orjson.dumps(
            {"model": request.model, "data": {"messages": request.messages, **request.params}}
        )

    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> Completion:
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            payload = None
        code, message = _first_error(payload)
        retry_after = parse_retry_after(headers.get("Retry-After"))

        if 200 <= status < 300:
            if not isinstance(payload, dict):
                raise RetryableAPIError(f"response body is not JSON: {snippet(body)}", status)
            if payload.get("success") is True:
                return _completion(payload, status, body)
            if payload.get("success") is False:
                _raise_for(status, code, message or "success: false without a message", retry_after)
            raise RetryableAPIError(f"response is not the API envelope: {snippet(body)}", status)

        if message is None:
            message = snippet(body) if payload is None else "no error message"
        _raise_for(status, code, message, retry_after)
        raise AssertionError("unreachable")


def _as_code(raw: Any) -> int | str | None:
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str) and raw.strip().lstrip("-").isdigit():
        return int(raw)
    return raw if isinstance(raw, str) and raw else None


def _first_error(payload: Any) -> tuple[int | str | None, str | None]:
    if not isinstance(payload, dict):
        return None, None
    errors = payload.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        message = errors[0].get("message")
        return _as_code(errors[0].get("code")), str(message) if message is not None else None
    return None, None


def _completion(payload: dict[str, Any], status: int, body: bytes) -> Completion:
    result = payload.get("result")
    if not isinstance(result, dict) or not isinstance(result.get("response"), str):
        raise RetryableAPIError(f"success without result.response: {snippet(body)}", status)
    usage = result.get("usage")
    prompt = completion = None
    if isinstance(usage, dict):
        prompt = usage_int(usage.get("prompt_tokens"))
        completion = usage_int(usage.get("completion_tokens"))
    return Completion(result["response"], prompt, completion)


def _raise_for(status: int, code: int | str | None, message: str, retry_after: float | None) -> None:
    message = message[:MAX_MESSAGE]
    if status in (401, 403) or code in AUTH_CODES:
        raise RunStopError(message, status, code, reason="auth")
    if code in QUOTA_CODES:
        raise RunStopError(message, status, code, reason="quota")
    if code in MODEL_CODES:
        raise RunStopError(message, status, code, reason="model")
    if status in (408, 409, 429) or status >= 500 or code in RETRYABLE_CODES:
        # A capacity error inside a 200 is still the server asking us to slow down.
        effective = 429 if code == CAPACITY_CODE else status
        raise RetryableAPIError(message, effective, code, retry_after)
    raise FatalAPIError(message, status, code)
