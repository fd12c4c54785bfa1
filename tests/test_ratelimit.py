"""The limiter and the backoff policy, driven by an injected clock: no real sleeping."""

from __future__ import annotations

import asyncio
import random

import pytest

from batchllm.engine.ratelimit import DECREASE, Backoff, RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(coro)


def test_grid_spacing_and_no_initial_burst() -> None:
    clock = Clock()
    limiter = RateLimiter(rpm=60, clock=clock)

    async def go() -> list[float]:
        ready = []
        await limiter.acquire()  # the first leaves at once
        ready.append(clock.now)
        for _ in range(5):
            at = limiter._ready_at(0)
            assert at > clock.now  # no burst: the next must wait a full interval
            clock.now = at
            await limiter.acquire()
            ready.append(clock.now)
        return ready

    times = run(go())
    assert [round(b - a, 9) for a, b in zip(times, times[1:], strict=False)] == [1.0] * 5


def test_idle_time_is_not_banked() -> None:
    clock = Clock()
    limiter = RateLimiter(rpm=60, clock=clock)

    async def go() -> None:
        await limiter.acquire()
        clock.now += 100  # a long idle spell must not allow a burst afterwards
        await limiter.acquire()
        assert limiter._ready_at(0) == pytest.approx(clock.now + 1.0)

    run(go())


def test_tpm_spacing_and_refund() -> None:
    clock = Clock()
    limiter = RateLimiter(rpm=0, tpm=6000, clock=clock)  # 100 tokens/s

    async def go() -> None:
        await limiter.acquire(500)
        assert limiter._ready_at(0) == pytest.approx(clock.now + 5.0)
        limiter.refund_tokens(500, 100)  # the reply used 100: 4 s of credit back
        assert limiter._ready_at(0) == pytest.approx(clock.now + 1.0)

    run(go())


def test_off_means_no_waiting() -> None:
    limiter = RateLimiter(rpm=0, clock=Clock())

    async def go() -> None:
        for _ in range(10_000):
            await limiter.acquire()

    run(go())


def test_throttle_pauses_the_pool_for_retry_after_and_cuts_the_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(rpm=1200, clock=clock)
    pause = limiter.on_throttle(3.0)
    assert pause == 3.0
    assert limiter._ready_at(0) >= clock.now + 3.0
    assert limiter.rate == pytest.approx(1200 * DECREASE)
    # A burst of 429s from requests already in flight cuts only once.
    limiter.on_throttle(3.0)
    assert limiter.rate == pytest.approx(1200 * DECREASE)


def test_throttle_without_retry_after_backs_off_exponentially() -> None:
    clock = Clock()
    limiter = RateLimiter(rpm=0, clock=clock)
    assert [limiter.on_throttle(None) for _ in range(4)] == [0.25, 0.5, 1.0, 2.0]
    limiter.on_success()
    assert limiter.on_throttle(None) == 0.25


def _drive(limiter: RateLimiter, clock: Clock, seconds: float) -> None:
    """Successes every 10 ms with the limiter binding, for ``seconds``."""
    end = clock.now + seconds
    while clock.now < end:
        clock.now += 0.01
        limiter._bound = True
        limiter.on_success()


def test_auto_starts_at_the_documented_rate_and_grows_while_binding() -> None:
    clock = Clock()
    limiter = RateLimiter(rpm=None, auto=True, start_rpm=300, clock=clock)
    assert limiter.rate == 300
    _drive(limiter, clock, 5.0)
    assert 1100 <= limiter.rate <= 1250  # about 4x after 5 s, not more
    _drive(limiter, clock, 5.0)
    assert limiter.rate > 3000  # then exponential


def test_auto_settles_under_the_limit_that_drew_a_429() -> None:
    clock = Clock()
    limiter = RateLimiter(rpm=None, auto=True, start_rpm=300, clock=clock)
    _drive(limiter, clock, 4.0)
    safe = limiter._safe_rate
    limiter.on_throttle(1.0)
    assert limiter.rate == pytest.approx(DECREASE * safe)
    settled = limiter.rate
    _drive(limiter, clock, 10.0)
    assert limiter.rate == settled  # held after a 429
    _drive(limiter, clock, 10.0)
    assert settled < limiter.rate < settled * 1.1  # then probes gently


def test_growth_only_when_the_limiter_binds() -> None:
    clock = Clock()
    limiter = RateLimiter(rpm=None, auto=True, start_rpm=300, clock=clock)
    for _ in range(1000):
        clock.now += 0.01
        limiter.on_success()
    assert limiter.rate == 300


def test_fixed_rpm_is_a_hard_ceiling() -> None:
    clock = Clock()
    limiter = RateLimiter(rpm=600, clock=clock)
    _drive(limiter, clock, 60.0)
    assert limiter.rate == 600


def test_backoff_full_jitter_caps_and_retry_after_wins() -> None:
    backoff = Backoff(6, base=0.5, cap=4.0, max_total=30.0, rng=random.Random(1))
    for attempt in range(1, 10):
        for _ in range(50):
            assert 0 <= backoff.delay(attempt) <= min(4.0, 0.5 * 2 ** (attempt - 1))
    assert backoff.delay(1, retry_after=7.0) == 7.0
    assert backoff.delay(1, retry_after=99.0) == 30.0
    assert not backoff.gives_up(5, 10.0, 1.0)
    assert backoff.gives_up(6, 10.0, 1.0)
    assert backoff.gives_up(2, 29.5, 1.0)
