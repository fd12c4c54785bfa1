"""The sandbox honours the contract (docs/api.md) over real loopback HTTP."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from batchllm.sandbox import WORDS as _WORDS
from batchllm.tokens import get_counter

from .conftest import BIN, PAGE_EXAMPLE, ROOT

MODEL = "meta/llama-3.1-70b-instruct"


def post(box, body: object, key: str | None = "use-box", raw: bytes | None = None) -> tuple[int, dict, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(
        box.url, data=data, method="POST", headers={"Content-Type": "application/json"}
    )
    if key is not None:
        req.add_header("Authorization", f"Bearer {box.key if key == 'use-box' else key}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, dict(e.headers), json.loads(e.read())


def req(**data: object) -> dict:
    return {"model": MODEL, "data": {"messages": [{"role": "user", "content": "hello"}], **data}}


def test_page_example(sandbox) -> None:
    body = PAGE_EXAMPLE
    status, _, payload = post(sandbox, body)
    assert status == 200
    assert list(payload) == ["errors", "messages", "result", "success"]  # keys sorted
    assert list(payload["result"]["usage"]) == ["completion_tokens", "prompt_tokens", "total_tokens"]
    usage = payload["result"]["usage"]
    assert usage["prompt_tokens"] == 27
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # Same request, same reply.
    assert post(sandbox, body)[2] == payload


def test_prompt_form_counts_as_one_user_turn(sandbox) -> None:
    a = post(sandbox, {"model": MODEL, "data": {"prompt": "hello"}})[2]
    b = post(sandbox, req())[2]
    assert a["result"]["usage"]["prompt_tokens"] == b["result"]["usage"]["prompt_tokens"]


def test_default_max_tokens_is_256_and_replies_are_cut_exactly(sandbox_factory) -> None:
    box = sandbox_factory(reply_tokens=(400, 400))
    usage = post(box, req())[2]["result"]["usage"]
    assert usage["completion_tokens"] == 256
    payload = post(box, req(max_tokens=7))[2]
    assert payload["result"]["usage"]["completion_tokens"] == 7
    assert get_counter().completion_tokens(payload["result"]["response"]) == 7


def test_reply_words_are_single_tokens() -> None:
    enc = get_counter()
    for w in _WORDS:
        assert enc.completion_tokens(" " + w) == 1, w
        assert enc.completion_tokens(w.capitalize()) == 1, w


@pytest.mark.parametrize(
    ("key", "status"),
    [(None, 401), ("wrong", 403)],
)
def test_auth(sandbox, key: str | None, status: int) -> None:
    code, _, payload = post(sandbox, req(), key=key)
    assert code == status
    assert payload["errors"][0] == {"code": 10000, "message": "Authentication error"}
    assert payload["success"] is False


@pytest.mark.parametrize(
    "data",
    [
        {"temperature": 5.1},
        {"temperature": -0.1},
        {"top_p": 2.5},
        {"top_k": 0},
        {"top_k": 51},
        {"top_k": 1.5},
        {"seed": 0},
        {"seed": 10_000_000_000},
        {"repetition_penalty": 2.1},
        {"frequency_penalty": -1},
        {"presence_penalty": 3},
        {"max_tokens": 0},
        {"temperature": "hot"},
        {"messages": [{"role": "user", "content": ["a", "list"]}]},
        {"messages": [{"role": "robot", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "x" * 131_073}]},
        {"messages": []},
    ],
)
def test_validation_400_5006(sandbox, data: dict) -> None:
    body = req()
    body["data"].update(data)
    status, _, payload = post(sandbox, body)
    assert status == 400
    assert payload["errors"][0]["code"] == 5006
    assert payload["errors"][0]["message"].startswith("AiError: Bad input")


def test_prompt_and_messages_rules(sandbox) -> None:
    assert post(sandbox, {"model": MODEL, "data": {"prompt": ""}})[0] == 400
    assert post(sandbox, {"model": MODEL, "data": {}})[0] == 400
    both = {"model": MODEL, "data": {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}}
    assert post(sandbox, both)[0] == 400
    assert post(sandbox, None, raw=b"{not json")[0] == 400


def test_unknown_model_5007(sandbox) -> None:
    status, _, payload = post(sandbox, {"model": "meta/nope", "data": {"prompt": "hi"}})
    assert status == 400
    assert payload["errors"][0] == {"code": 5007, "message": "No such model meta/nope or task"}


def test_window_413_5021(sandbox) -> None:
    status, _, payload = post(sandbox, req(max_tokens=24_995))
    assert status == 413
    message = payload["errors"][0]["message"]
    assert payload["errors"][0]["code"] == 5021
    assert message.startswith("AiError: Ai: The estimated number of input and maximum output tokens (")
    assert "exceeded this model context window limit (25000)." in message
    small = {"model": "meta/llama-3.1-8b-instruct", "data": {"prompt": "hi", "max_tokens": 7990}}
    assert post(sandbox, small)[0] == 413


def test_rate_limit_429_3040_with_retry_after(sandbox_factory) -> None:
    box = sandbox_factory(rate_limit=1, rate_burst=1)
    assert post(box, req())[0] == 200
    status, headers, payload = post(box, req())
    assert status == 429
    assert payload["errors"][0]["code"] == 3040
    assert int(headers["Retry-After"]) >= 1


def test_quota_429_3036(sandbox_factory) -> None:
    box = sandbox_factory(quota=1)
    assert post(box, req())[0] == 200
    status, _, payload = post(box, req())
    assert (status, payload["errors"][0]["code"]) == (429, 3036)


def test_injected_5xx_and_garbled(sandbox_factory) -> None:
    box = sandbox_factory(fail_5xx=1.0)
    req_ = urllib.request.Request(
        box.url, data=json.dumps(req()).encode(), headers={"Authorization": f"Bearer {box.key}"}
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req_, timeout=5)
    assert info.value.code in (500, 503)
    info.value.close()
    box2 = sandbox_factory(fail_garbled=1.0)
    req2 = urllib.request.Request(
        box2.url, data=json.dumps(req()).encode(), headers={"Authorization": f"Bearer {box2.key}"}
    )
    with urllib.request.urlopen(req2, timeout=5) as r, pytest.raises(json.JSONDecodeError):
        json.loads(r.read())


def test_slots_serve_n_at_once_in_arrival_order_and_count_the_queue(sandbox_factory) -> None:
    box = sandbox_factory(slots=2, slot_seconds=0.3)
    started = time.monotonic()
    with ThreadPoolExecutor(6) as pool:
        statuses = [s for s, _, _ in pool.map(lambda _: post(box, req()), range(6))]
    took = time.monotonic() - started
    assert statuses == [200] * 6
    assert took >= 3 * 0.3  # 6 requests, 2 at a time
    assert box.sandbox.slots.max_queue >= 1 and box.sandbox.stats["given_up"] == 0
    with urllib.request.urlopen(box.base + "/props", timeout=5) as r:
        assert json.loads(r.read())["total_slots"] == 2
    with urllib.request.urlopen(box.base + "/_sandbox/stats", timeout=5) as r:
        assert json.loads(r.read())["max_queue"] == box.sandbox.slots.max_queue


def test_slots_without_props_and_a_client_that_gives_up(sandbox_factory) -> None:
    box = sandbox_factory(slots=1, slot_seconds=0.5, slots_props=False)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(box.base + "/props", timeout=5)
    assert info.value.code == 404
    info.value.close()
    data = json.dumps(req()).encode()
    request = urllib.request.Request(box.url, data=data, headers={"Authorization": f"Bearer {box.key}"})
    with pytest.raises(TimeoutError):
        urllib.request.urlopen(request, timeout=0.1)
    deadline = time.monotonic() + 5
    while box.sandbox.stats["given_up"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert box.sandbox.stats["given_up"] == 1  # computed after its client left: wasted


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--port", "99999"], "'--port': 99999"),
        (["--port", "-5"], "'--port': -5"),
        (["--latency", "-1"], "'--latency'"),
        (["--slot-seconds", "-1"], "'--slot-seconds'"),
        (["--slots", "-1"], "'--slots'"),
        (["--rate-limit", "-1"], "'--rate-limit'"),
        (["--quota", "-1"], "'--quota'"),
        (["--jitter", "5"], "'--jitter'"),
        (["--reply-tokens", "50-10"], "--reply-tokens '50-10'"),
        (["--fail-5xx", "2"], "--fail-5xx must be a share"),
        (["--latency", "nan"], "--latency must be a finite number, got nan"),
        (["--slot-seconds", "inf"], "--slot-seconds must be a finite number, got inf"),
        (["--fail-hang", "nan"], "--fail-hang must be a finite number"),
        (
            ["--fleet", "jobs/fleets/three_endpoints.toml", "--port", "65535"],
            "3 endpoints need ports up to 65535",
        ),
        (["--port-file", "/nonexistent-folder/port"], "--port-file /nonexistent-folder/port: no folder"),
        (["--write-fleet", "served.toml"], "--write-fleet writes the served fleet's file: give --fleet too"),
    ],
)
def test_bad_sandbox_flags_are_one_line_before_it_listens(args: list[str], named: str) -> None:
    done = subprocess.run([str(BIN), "sandbox", *args], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    assert named in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "listening" not in done.stderr
