"""The HTTP boundary: one aiohttp session, the Dataoorts envelope, and the only place where
transport failures and API error bodies become batchllm's exceptions (see errors.py).

``parse_response`` is a pure function of (status, headers, body) so every response shape in
CONTRACT.md is tested without a server; ``Client.complete`` adds the transport: it posts a body
built by ``prompts.RequestEncoder`` and returns a ``Completion`` or raises an ``APIError``.

The key lives in the session's default headers only; no message or exception built here
includes headers, so it cannot leak into a row's ``error`` or a log line.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from .errors import APIError, FatalAPIError, RetryableAPIError, RunStopError

AUTH_CODES = {10000}
QUOTA_CODES = {3036, 4006}
CAPACITY_CODE = 3040
RETRYABLE_CODES = {CAPACITY_CODE, 3007, 3008}
_MAX_MESSAGE = 500


@dataclass(frozen=True, slots=True)
class Completion:
    """A successful reply. Usage is None when the body carried none (the caller then counts)."""

    response: str
    prompt_tokens: int | None
    completion_tokens: int | None


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


def _snippet(body: bytes) -> str:
    text = body[:_MAX_MESSAGE].decode("utf-8", "replace").strip()
    return " ".join(text.split()) or "(empty body)"


def parse_response(status: int, headers: Mapping[str, str], body: bytes) -> Completion:
    """Turn one HTTP response into a ``Completion`` or raise the matching ``APIError``."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        payload = None
    code, message = _first_error(payload)
    retry_after = parse_retry_after(headers.get("Retry-After"))

    if 200 <= status < 300:
        if not isinstance(payload, dict):
            raise RetryableAPIError(f"response body is not JSON: {_snippet(body)}", status)
        if payload.get("success") is True:
            return _completion(payload, status, body)
        if payload.get("success") is False:
            return _raise_for(status, code, message or "success: false without a message", retry_after)
        raise RetryableAPIError(f"response is not the API envelope: {_snippet(body)}", status)

    if message is None:
        message = _snippet(body) if payload is None else "no error message"
    return _raise_for(status, code, message, retry_after)


def _completion(payload: dict[str, Any], status: int, body: bytes) -> Completion:
    result = payload.get("result")
    if not isinstance(result, dict) or not isinstance(result.get("response"), str):
        raise RetryableAPIError(f"success without result.response: {_snippet(body)}", status)
    usage = result.get("usage")
    prompt = completion = None
    if isinstance(usage, dict):
        p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(p, int) and not isinstance(p, bool) and p >= 0:
            prompt = p
        if isinstance(c, int) and not isinstance(c, bool) and c >= 0:
            completion = c
    return Completion(result["response"], prompt, completion)


def _raise_for(status: int, code: int | str | None, message: str, retry_after: float | None) -> Completion:
    message = message[:_MAX_MESSAGE]
    if status in (401, 403) or code in AUTH_CODES:
        raise RunStopError(message, status, code)
    if code in QUOTA_CODES:
        raise RunStopError(message, status, code)
    if status in (408, 409, 429) or status >= 500 or code in RETRYABLE_CODES:
        # A capacity error inside a 200 is still the server asking us to slow down.
        effective = 429 if code == CAPACITY_CODE else status
        raise RetryableAPIError(message, effective, code, retry_after)
    raise FatalAPIError(message, status, code)


class Client:
    """One session, a connector sized to the concurrency, the key in its default headers."""

    def __init__(self, endpoint: str, api_key: str, *, concurrency: int, timeout: float) -> None:
        self.endpoint = endpoint
        self._api_key = api_key
        self._concurrency = concurrency
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        connector = aiohttp.TCPConnector(
            limit=self._concurrency, limit_per_host=0, ttl_dns_cache=300, enable_cleanup_closed=False
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers={"Authorization": f"Bearer {self._api_key}", "Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            skip_auto_headers=("User-Agent",),
            raise_for_status=False,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def complete(self, body: bytes) -> Completion:
        """POST one request body; return its completion or raise an ``APIError``."""
        assert self._session is not None, "use `async with Client(...)`"
        try:
            async with self._session.post(self.endpoint, data=body) as resp:
                raw = await resp.read()
                return parse_response(resp.status, resp.headers, raw)
        except APIError:
            raise
        except TimeoutError:
            raise RetryableAPIError(f"no response within {self._timeout:g} s (timeout)") from None
        except aiohttp.ClientResponseError as exc:
            raise RetryableAPIError(f"bad HTTP response: {exc.message}", exc.status) from None
        except (aiohttp.ClientError, OSError) as exc:
            detail = str(exc) or type(exc).__name__
            raise RetryableAPIError(f"connection failed: {detail}") from None
