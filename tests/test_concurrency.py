"""The in-flight limit (engine/concurrency.py): rounds driven by an injected clock, then whole
runs through the CLI against the sandbox's slot-limited mode (N slots, a FIFO queue)."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchllm.engine.concurrency import FLOOR, START, STEADY_GAIN, ConcurrencyLimit
from batchllm.engine.ratelimit import RateLimiter
from batchllm.records import RateHints
from tests.conftest import prompts_csv, run_cli, summary_of


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def serve(
    limit: ConcurrencyLimit,
    clock: Clock,
    slots: int,
    seconds: float | Callable[[int], float],
    replies: int,
    trips: list[float] | None = None,
) -> list[int]:
    """A server of ``slots`` slots taking ``seconds`` a request, fed as fast as the limit allows,
    simulated reply by reply: the limit after each reply (and each round trip into ``trips``)."""
    queue: list[float] = []  # when each request in flight was sent, oldest first
    free_at = [0.0] * slots  # when each slot is next free
    done: list[tuple[float, float]] = []  # (reply time, sent time), in reply order
    seen = []
    sent = 0
    for _ in range(replies):
        while limit.try_take():
            queue.append(clock.now)
            slot = min(range(slots), key=free_at.__getitem__)
            finish = max(clock.now, free_at[slot]) + (seconds(sent) if callable(seconds) else seconds)
            sent += 1
            free_at[slot] = finish
            done.append((finish, clock.now))
        done.sort()
        finish, sent = done.pop(0)
        queue.remove(sent)
        clock.now = finish
        limit.release(finish - sent)
        if trips is not None:
            trips.append(finish - sent)
        seen.append(limit.limit)
    return seen


def test_settles_just_above_a_servers_slots() -> None:
    clock = Clock()
    limit = ConcurrencyLimit(128, 60.0, clock=clock)
    assert limit.limit == START
    seen = serve(limit, clock, slots=4, seconds=0.4, replies=400)
    # Past the first rounds: the slots busy behind a short queue (replies that come back 4 at
    # once make some rounds look faster than they are), never the ceiling's 128.
    assert min(seen[100:]) >= 4 and max(seen[100:]) <= 3 * 4
    assert max(seen) <= 16


def test_grows_while_the_rate_grows() -> None:
    clock = Clock()
    limit = ConcurrencyLimit(2000, 60.0, clock=clock)
    seen = serve(limit, clock, slots=10_000, seconds=0.2, replies=6000)
    # Rounds of 0.2 s: from 16 to the ceiling in a handful of them, as a slow start would.
    assert seen[-1] == 2000
    assert clock.now < 2.0


def test_the_server_stating_its_slots_is_believed_from_the_start() -> None:
    clock = Clock()
    limit = ConcurrencyLimit(128, 60.0, hint=4, clock=clock)
    assert limit.limit == 4
    assert not limit.growing
    seen = serve(limit, clock, slots=4, seconds=0.4, replies=200)
    assert max(seen) <= FLOOR


def test_a_queue_never_waits_past_half_the_timeout() -> None:
    # 2 slots at 1 s a request, a 4 s timeout: the first round's 16 would wait 8 s; after it,
    # no request waits in the queue more than about 2 s, floor or not.
    clock = Clock()
    limit = ConcurrencyLimit(128, 4.0, clock=clock)
    trips: list[float] = []
    serve(limit, clock, slots=2, seconds=1.0, replies=100, trips=trips)
    assert max(trips[40:]) <= 1.0 + 2.0 + 1.0


def test_a_rate_the_server_enforces_opens_the_limit() -> None:
    # An API paced at 5 requests/s, 20 s a reply: it needs 100 in flight. Growing from 8 took
    # four round trips (over a minute). A rate known from the start (a serverless API's) opens the
    # first round to --concurrency (the limiter keeps the pace) ...
    clock = Clock()
    limit = ConcurrencyLimit(256, 120.0, pace=lambda: 5.0, clock=clock)
    assert limit.limit == 256
    # ... and one the first reply states, to what that reply's round trip needs.
    stated: list[float] = []
    clock = Clock()
    limit = ConcurrencyLimit(256, 120.0, pace=lambda: stated[0] if stated else None, clock=clock)
    assert limit.limit == START
    stated.append(5.0)
    seen = serve(limit, clock, slots=10_000, seconds=20.0, replies=400)
    assert seen[0] == math.ceil(5.0 * 20.0 * STEADY_GAIN) + 1  # the first reply
    assert min(seen) >= 100  # and never under what the rate needs
    # Without a rate known to be the server's, the first round still ends with its 8 replies.
    clock = Clock()
    unpaced = ConcurrencyLimit(256, 120.0, pace=lambda: None, clock=clock)
    assert serve(unpaced, clock, slots=10_000, seconds=20.0, replies=START)[: START - 1] == [START] * (
        START - 1
    )
    # --concurrency stays the ceiling.
    clock = Clock()
    capped = ConcurrencyLimit(50, 120.0, pace=lambda: 5.0, clock=clock)
    assert max(serve(capped, clock, slots=10_000, seconds=20.0, replies=200)) == 50


def test_only_a_rate_the_server_enforces_is_a_pace() -> None:
    # The documented rate of "any server" is a guess (it may be 4 slots on a laptop); a serverless
    # API's is its limit, and so is a rate any server's replies state.
    assert RateLimiter(None, auto=True, start_rpm=300.0).enforced_rps() is None
    assert RateLimiter(None, auto=True, start_rpm=300.0, serverless=True).enforced_rps() == 5.0
    assert RateLimiter(600.0, serverless=True).enforced_rps() == 10.0
    assert RateLimiter(0, serverless=True).enforced_rps() is None  # --rpm 0: unpaced
    stated = RateLimiter(None, auto=True, start_rpm=300.0)
    stated.on_hints(RateHints(limit_requests=1000))
    assert stated.enforced_rps() == pytest.approx(0.98 * 1000 / 60)


def test_a_timeout_halves_the_limit_and_ends_growth() -> None:
    limit = ConcurrencyLimit(128, 60.0, clock=Clock())
    assert limit.try_take()
    limit.release(None, timed_out=True)
    assert limit.limit == START // 2 and not limit.growing
    assert limit.in_flight == 0


def test_waiters_are_woken_in_order_as_places_free() -> None:
    async def go() -> list[int]:
        limit = ConcurrencyLimit(2, 60.0, clock=Clock())
        order: list[int] = []

        async def one(i: int) -> None:
            await limit.take()
            order.append(i)

        assert limit.try_take() and limit.try_take()
        tasks = [asyncio.create_task(one(i)) for i in range(3)]
        await asyncio.sleep(0)
        assert order == [] and limit.in_flight == 2
        limit.release(None)
        limit.release(None)
        await asyncio.sleep(0)
        assert order == [0, 1]
        tasks[2].cancel()  # a waiter cancelled while waiting takes no place
        await asyncio.gather(*tasks, return_exceptions=True)
        assert limit.in_flight == 2
        return order

    asyncio.run(go())


# -- whole runs against a server of 4 slots at 0.4 s a request ------------------------------------

ROWS = 60
SLOTS, SECONDS = 4, 0.4


def run_against_slots(sandbox_factory, tmp_path: Path, props: bool, *extra: str):
    box = sandbox_factory(slots=SLOTS, slot_seconds=SECONDS, slots_props=props)
    src = prompts_csv(tmp_path / "in.csv", ROWS)
    out = tmp_path / "out.parquet"
    args = ["run", str(src), "-o", str(out), "--provider", "openai", "--timeout", "5", "--rpm", "0", *extra]
    result = run_cli([*args, "--input-price", "0.1", "--output-price", "0.1"], env=box.openai_env())
    assert result.exit_code == 0, result.stderr
    return box, out


@pytest.mark.parametrize("props", [True, False], ids=["total_slots", "no_hint"])
def test_default_concurrency_keeps_4_slots_busy_and_never_gives_up(sandbox_factory, tmp_path, props) -> None:
    box, out = run_against_slots(sandbox_factory, tmp_path, props)
    stats = box.sandbox.stats
    # Every row sent once: one request per row in the server's log, none given up, no retry.
    assert stats["requests"] == ROWS and stats["200"] == ROWS
    assert set(Counter(key for _, _, key in box.log()).values()) == {1}
    assert stats["given_up"] == 0
    assert summary_of(out)["this_run"]["retries"] == 0
    assert pq.read_table(out).column("status").to_pylist() == ["ok"] * ROWS
    # The queue batchllm built: a few requests, where the default --concurrency of 128 alone
    # would have queued 124 (and their last waited 12.4 s, past the timeout).
    assert box.sandbox.slots.max_queue <= 2 * SLOTS
    concurrency = summary_of(out)["concurrency"]
    assert concurrency["server_slots"] == (SLOTS if props else None)
    # Wall time loosely (a loaded machine): the exact ratio is a `make bench` figure.
    log = box.log()
    assert log[-1][0] - log[0][0] < 1.5 * ROWS * SECONDS / SLOTS


def test_a_rate_limit_and_the_slots_both_hold(sandbox_factory, tmp_path) -> None:
    # 5 requests/s paced, under what the slots serve (10/s): the pace holds, nothing queues long.
    box = sandbox_factory(slots=SLOTS, slot_seconds=SECONDS, slots_props=False)
    src = prompts_csv(tmp_path / "in.csv", 30)
    out = tmp_path / "out.parquet"
    args = ["run", str(src), "-o", str(out), "--provider", "openai", "--timeout", "5", "--rpm", "300"]
    result = run_cli([*args, "--input-price", "0.1", "--output-price", "0.1"], env=box.openai_env())
    assert result.exit_code == 0, result.stderr
    stats = box.sandbox.stats
    assert stats["requests"] == 30 and stats["given_up"] == 0
    assert box.sandbox.slots.max_queue == 0  # never more sent than the slots serve
    # Answers leave a slot 0.4 s after their request arrived, so they keep the requests' pace:
    # in any 2 s, at most 2 x 5 + 1 of them.
    times = [t for t, _, _ in box.log()]
    assert max(sum(1 for u in times if t <= u < t + 2.0) for t in times) <= 11


@pytest.mark.parametrize("props", [True, False], ids=["total_slots", "no_hint"])
def test_a_server_stating_its_slots_is_not_slow_started_by_rpm_auto(sandbox_factory, tmp_path, props) -> None:
    """--rpm auto starts a server of unknown limits at 300/min and grows from there; a server that
    states its slots is one's own, whose queue the in-flight window paces: no rate from the start."""
    box = sandbox_factory(slots=SLOTS, slot_seconds=0.05, slots_props=props)
    src, out = prompts_csv(tmp_path / "in.csv", 80), tmp_path / "out.parquet"
    args = [
        "run",
        str(src),
        "-o",
        str(out),
        "--provider",
        "openai",
        "--input-price",
        "0.1",
        "--output-price",
        "0.1",
    ]
    result = run_cli(args, env=box.openai_env())
    assert result.exit_code == 0, result.stderr
    times = [t for t, _, _ in box.log()]
    first_second = sum(1 for t in times if t < times[0] + 1.0)
    # Slow start lets about 6 leave in its first second; 4 slots of 0.05 s serve 80 a second.
    assert first_second >= 20 if props else first_second <= 10, first_second


@pytest.mark.parametrize("hint", [4, None], ids=["total_slots", "no_hint"])
def test_a_timeout_near_the_service_time_keeps_the_slots_busy(hint) -> None:
    # 4 slots at 0.4 s, a 0.6 s timeout: 4 in flight wait in no queue, so the limit stays at the
    # slots (it fell to 1 when the queue's share of the timeout was taken for the whole limit).
    clock = Clock()
    limit = ConcurrencyLimit(128, 0.6, hint=hint, clock=clock)
    trips: list[float] = []
    seen = serve(limit, clock, slots=4, seconds=0.4, replies=400, trips=trips)
    assert min(seen[100:]) >= 4, seen[100:]
    assert max(trips[100:]) < 0.6  # none would have timed out
    assert 400 / clock.now > 0.9 * 4 / 0.4  # rows/s: the slots' 10, nearly


def test_slow_requests_never_take_the_limit_under_the_slots_a_server_states() -> None:
    # Every seventh request takes 0.55 s, not 0.4: some rounds' rates come out low, and with a
    # 0.6 s timeout the limit followed them under the 4 slots the server states (7.3 rows/s).
    clock = Clock()
    limit = ConcurrencyLimit(128, 0.6, hint=4, clock=clock)
    seen = serve(limit, clock, slots=4, seconds=lambda n: 0.55 if n % 7 == 0 else 0.4, replies=2000)
    assert min(seen[40:]) >= 4


def test_a_tight_timeout_still_keeps_4_slots_busy(sandbox_factory, tmp_path) -> None:
    # --timeout 0.6 against 0.4 s a request: the slots busy, nothing queued long enough to time
    # out (the limit fell to one request at a time, 2.5 rows/s where the slots serve 10).
    box, out = run_against_slots(sandbox_factory, tmp_path, True, "--timeout", "0.6")
    stats = box.sandbox.stats
    assert stats["requests"] == ROWS and stats["given_up"] == 0
    assert summary_of(out)["concurrency"]["last"] >= SLOTS
    log = box.log()
    assert log[-1][0] - log[0][0] < 1.5 * ROWS * SECONDS / SLOTS


def test_a_serverless_api_gets_its_rate_in_flight_after_one_round_trip(sandbox_factory, tmp_path) -> None:
    # Dataoorts at 2 s a reply, paced at 100 requests/s: 200 in flight keep the pace. The
    # replies come at the pace from the first on; growing from 8 (8, 24, 70 ...) answered 32
    # in the first 3 s.
    box = sandbox_factory(latency=2.0)
    src = prompts_csv(tmp_path / "in.csv", 300)
    out = tmp_path / "out.parquet"
    result = run_cli(
        ["run", str(src), "-o", str(out), "--rpm", "6000", "--concurrency", "256"], env=box.env()
    )
    assert result.exit_code == 0, result.stderr
    times = sorted(t for t, status, _ in box.log() if status == 200)
    assert len(times) == 300
    assert sum(1 for t in times if t < times[0] + 3.0) >= 200
    # The summary gives the most that were in flight (the pace's 200 or so), not the limit's 256.
    most = summary_of(out)["concurrency"]["most_in_flight"]
    assert 120 <= most < 256 and f"at most {most:,} in flight" in result.output
    assert summary_of(out)["concurrency"]["held_the_pace"] is False


def test_a_run_held_back_by_its_concurrency_says_so(sandbox_factory, tmp_path) -> None:
    # --rpm 6000 (100/s) with --concurrency 4 at 0.25 s a reply: at most 16/s leave. The summary
    # says the ceiling, not the rate, set the pace, and that a higher --concurrency goes faster.
    box = sandbox_factory(latency=0.25)
    src = prompts_csv(tmp_path / "in.csv", 40)
    out = tmp_path / "out.parquet"
    result = run_cli(["run", str(src), "-o", str(out), "--rpm", "6000", "--concurrency", "4"], env=box.env())
    assert result.exit_code == 0, result.stderr
    concurrency = summary_of(out)["concurrency"]
    assert concurrency["held_the_pace"] is True and concurrency["most_in_flight"] == 4
    assert "at most 4 in flight (all that --concurrency allows" in result.output
    assert "a higher --concurrency goes faster" in result.output


@pytest.mark.parametrize("timeout", [1.2, 1.5, 2.0])
def test_the_queue_past_a_servers_stated_slots_fits_in_half_the_timeout(timeout) -> None:
    # 4 slots at 0.4 s answer 4 replies at a time: a round of 7 that caught two bursts in 0.4 s
    # measured 17.5 replies/s from a server of 10, and the queue that rate allowed took the limit
    # to 12 (1.2 s round trips at --timeout 1.5). Past the slots, requests wait whole service
    # times: as many slots-full as fit in half the timeout (1 at 1.2 and 1.5, 2 at 2.0).
    clock = Clock()
    limit = ConcurrencyLimit(128, timeout, hint=4, clock=clock)
    trips: list[float] = []
    seen = serve(limit, clock, slots=4, seconds=lambda n: 0.4 + 0.003 * (n % 3), replies=1000, trips=trips)
    assert max(seen) <= 4 * math.floor(timeout / 2 / 0.4), max(seen)
    assert max(trips) <= timeout / 2
    assert 1000 / clock.now > 0.95 * 4 / 0.4  # the slots kept busy


SLOT_RUN_ROWS = 120


def test_a_tight_timeout_against_stated_slots_gives_up_no_request_in_our_own_queue(
    sandbox_factory, tmp_path
) -> None:
    """--timeout 1.5 against 4 stated slots at 0.4 s: half of it fits one service time, so no
    queue. The limit climbed to 13 (a queue of 1.2 s): four requests timed out and were sent
    again, perhaps billed twice. Bursts of replies make it depend on timing: three runs."""
    src = prompts_csv(tmp_path / "in.csv", SLOT_RUN_ROWS)
    for attempt in range(3):
        box = sandbox_factory(slots=SLOTS, slot_seconds=SECONDS)
        out = tmp_path / f"out{attempt}.parquet"
        args = ["run", str(src), "-o", str(out), "--provider", "openai", "--timeout", "1.5"]
        result = run_cli([*args, "--input-price", "0.1", "--output-price", "0.1"], env=box.openai_env())
        assert result.exit_code == 0, result.stderr
        stats = box.sandbox.stats
        # Every row sent once, answered, none given up or retried.
        assert stats["requests"] == SLOT_RUN_ROWS and stats["200"] == SLOT_RUN_ROWS, (attempt, result.output)
        assert set(Counter(key for _, _, key in box.log()).values()) == {1}
        assert stats["given_up"] == 0
        assert summary_of(out)["this_run"]["retries"] == 0
        assert pq.read_table(out).column("status").to_pylist() == ["ok"] * SLOT_RUN_ROWS
        assert "maybe billed besides" not in result.output
        concurrency = summary_of(out)["concurrency"]
        assert concurrency["server_slots"] == SLOTS and concurrency["peak"] == SLOTS, concurrency
        # The slots kept busy (loosely: a loaded machine).
        log = box.log()
        assert log[-1][0] - log[0][0] < 1.3 * SLOT_RUN_ROWS * SECONDS / SLOTS
        box.stop()
