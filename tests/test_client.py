"""Every Dataoorts response shape of docs/api.md through the provider's ``parse``, and the transport."""

from __future__ import annotations

import asyncio
import email.utils
import socket

import aiohttp
import pytest

from batchllm.engine.client import Client, cannot_connect
from batchllm.errors import FatalAPIError, RetryableAPIError, RunStopError
from batchllm.providers.base import parse_retry_after
from batchllm.providers.dataoorts import Dataoorts

parse_response = Dataoorts().parse

OK = b'{"errors":[],"messages":[],"result":{"response":"Deep learning is","usage":{"completion_tokens":512,"prompt_tokens":27,"total_tokens":539}},"success":true}'


def err(code: object, message: str = "m", result: str = "{}") -> bytes:
    code_json = f'"{code}"' if isinstance(code, str) else str(code)
    return f'{{"errors":[{{"code":{code_json},"message":"{message}"}}],"messages":[],"result":{result},"success":false}}'.encode()


def test_success() -> None:
    c = parse_response(200, {}, OK)
    assert (c.text, c.prompt_tokens, c.completion_tokens) == ("Deep learning is", 27, 512)


def test_success_with_unknown_keys_and_tool_calls() -> None:
    body = b'{"errors":[],"extra":1,"result":{"response":"x","tool_calls":[],"usage":{"completion_tokens":1,"prompt_tokens":2,"total_tokens":3,"new":0}},"success":true}'
    assert parse_response(200, {}, body).text == "x"


def test_success_without_usage_leaves_counting_to_the_caller() -> None:
    c = parse_response(200, {}, b'{"result":{"response":"x"},"success":true}')
    assert c.prompt_tokens is None and c.completion_tokens is None


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"<html>oops</html>",
        OK[: len(OK) // 2],
        b'{"result":{"usage":{}},"success":true}',
        b'{"foo":1}',
        b"[]",
    ],
)
def test_garbled_200s_are_retryable(body: bytes) -> None:
    with pytest.raises(RetryableAPIError):
        parse_response(200, {}, body)


@pytest.mark.parametrize(
    ("status", "body", "kind", "code"),
    [
        (429, err(3040, "Capacity temporarily exceeded, please try again."), RetryableAPIError, 3040),
        (429, err(3036, "You have used up your daily free allocation"), RunStopError, 3036),
        (429, err(4006), RunStopError, 4006),
        (400, err(5006, "AiError: Bad input: Error: oneOf at '/' not met"), FatalAPIError, 5006),
        (413, err(5021, "AiError: Ai: The estimated number ..."), FatalAPIError, 5021),
        (400, err(5007, "No such model x or task"), RunStopError, 5007),  # no row can succeed
        (401, err(10000, "Authentication error"), RunStopError, 10000),
        (403, err(10000, "Authentication error"), RunStopError, 10000),
        (403, b"Forbidden", RunStopError, None),
        (413, err(3006, "Request is too large"), FatalAPIError, 3006),
        (408, err(3007, "Request timeout"), RetryableAPIError, 3007),
        (408, err(3008, "Request was aborted"), RetryableAPIError, 3008),
        (409, b"", RetryableAPIError, None),
        (500, b"<html>Internal</html>", RetryableAPIError, None),
        (502, b"bad gateway", RetryableAPIError, None),
        (503, err(1, "busy", "null"), RetryableAPIError, 1),
        (504, b"", RetryableAPIError, None),
        (200, err(3040), RetryableAPIError, 3040),
        (200, err("3040"), RetryableAPIError, 3040),  # codes seen as strings
        (404, b"not found", FatalAPIError, None),
    ],
)
def test_failures_are_classified(status: int, body: bytes, kind: type, code: object) -> None:
    with pytest.raises(kind) as info:
        parse_response(status, {}, body)
    assert type(info.value) is kind
    assert info.value.code == code


def test_capacity_in_a_200_counts_as_throttling() -> None:
    with pytest.raises(RetryableAPIError) as info:
        parse_response(200, {}, err(3040))
    assert info.value.throttled


def test_retry_after_seconds_and_http_date() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    now = 1_700_000_000.0
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now=now) == pytest.approx(
        30, abs=1
    )
    with pytest.raises(RetryableAPIError) as info:
        parse_response(429, {"Retry-After": "7"}, err(3040))
    assert info.value.retry_after == 7.0


def test_message_keeps_the_raw_api_text() -> None:
    with pytest.raises(FatalAPIError) as info:
        parse_response(400, {}, err(5006, "AiError: Bad input: x (req-123)"))
    assert info.value.describe() == "FatalAPIError HTTP 400 code 5006: AiError: Bad input: x (req-123)"


def test_transport_failures_become_retryable(sandbox_factory) -> None:
    box = sandbox_factory(fail_drop=1.0)

    async def go() -> None:
        async with Client(Dataoorts(), box.url, box.key, concurrency=2, timeout=5) as client:
            with pytest.raises(RetryableAPIError, match="connection"):
                await client.complete(b'{"model":"meta/llama-3.1-70b-instruct","data":{"prompt":"hi"}}')
        async with Client(Dataoorts(), "http://127.0.0.1:1/api/v1", "k", concurrency=2, timeout=5) as client:
            with pytest.raises(
                RetryableAPIError, match="^cannot connect to 127.0.0.1:1: connection refused$"
            ):
                await client.complete(b"{}")

    asyncio.run(go())


def test_a_host_name_that_does_not_resolve_is_said_so() -> None:
    """The resolver's errno is not an OS errno: read as one it said "unknown error -2"."""
    key = aiohttp.client_reqrep.ConnectionKey("api.example.com", 443, True, True, None, None, None)
    failed = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert cannot_connect(aiohttp.ClientConnectorError(key, failed)) == (
        "cannot connect to api.example.com:443: the name does not resolve (Name or service not known)"
    )


def test_timeout_is_retryable(sandbox_factory) -> None:
    box = sandbox_factory(fail_hang=1.0)

    async def go() -> None:
        async with Client(Dataoorts(), box.url, box.key, concurrency=2, timeout=0.3) as client:
            with pytest.raises(RetryableAPIError, match="timeout"):
                await client.complete(b'{"model":"meta/llama-3.1-70b-instruct","data":{"prompt":"hi"}}')

    asyncio.run(go())
