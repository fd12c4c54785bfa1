"""Pool-wide pacing: requests/min and tokens/min, adaptive to 429s; and the retry backoff policy.

``RateLimiter`` paces departures on a grid (GCRA): request k leaves no earlier than
``max(now, next) `` and moves ``next`` on by ``60 / rpm`` seconds (and by ``tokens * 60 / tpm`` for
the token limit). There is no bucket to drain at start, so no burst: in any window of W seconds
at most ``W * rpm / 60 + 1`` requests leave, from the first second on. Waiters are futures in FIFO
order, woken by a single timer (no polling loop); with no limit set, ``acquire`` returns at once.

Adaptive control (one instance serves the whole pool, so a 429 slows every worker):

- a 429 pauses departures for ``Retry-After`` when the server sent it, else for a short backoff
  that doubles while 429s keep coming; and cuts the rate (multiplicative decrease) to 85% of the
  rate the server was actually accepting, measured from recent successes;
- while no 429 comes and the limiter is what holds requests back, the rate grows again: first in
  "slow start" (x1.15 per half second, doubling in ~2.5 s, from the provider's documented
  300/min), after the first 429 additively, fast up to just under the rate where the last 429 came
  and slowly above it, so it settles just under whatever the server enforces;
- ``--rpm N`` is a hard ceiling the rate never exceeds; ``--rpm auto`` has none; ``--rpm 0`` turns
  pacing off (a 429 still pauses the pool).

Clock and sleep are injectable, so tests drive the limiter and the backoff without sleeping.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

SLOW_START_FACTOR = 1.15
STEP = 0.5  # seconds between rate increases
DECREASE = 0.85
MIN_RPM = 6.0
_RATE_WINDOW = 2.0  # seconds of successes used to measure what the server accepts


class RateLimiter:
    """Requests-per-minute and tokens-per-minute pacing for one pool of workers."""

    def __init__(
        self,
        rpm: float | None,
        tpm: float | None = None,
        *,
        auto: bool = False,
        start_rpm: float = 300.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.clock = clock
        self.auto = auto
        self.ceiling = math.inf if auto else (rpm or math.inf)
        # rate None: no pacing at all (``--rpm 0``); auto starts at the provider's documented rate.
        self.rate: float | None = start_rpm if auto else (rpm or None)
        self.tpm = tpm or None
        self.slow_start = auto
        self._next = 0.0
        self._tok_next = 0.0
        self._paused_until = 0.0
        self._waiters: deque[tuple[asyncio.Future[None], int]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._last_step = clock()
        self._bound = False  # did the limiter hold a request back since the last step?
        self._last_cut = -math.inf
        self._throttle_rate = math.inf  # accepted rate when the last 429 came
        self._consecutive_throttles = 0
        self._successes: deque[float] = deque()
        self.throttles = 0

    # -- acquiring ---------------------------------------------------------------------------

    def _ready_at(self, tokens: int) -> float:
        at = self._paused_until
        if self.rate is not None:
            at = max(at, self._next)
        if self.tpm is not None:
            at = max(at, self._tok_next)
        return at

    def _take(self, now: float, tokens: int) -> None:
        if self.rate is not None:
            self._next = max(now, self._next) + 60.0 / self.rate
        if self.tpm is not None:
            self._tok_next = max(now, self._tok_next) + tokens * 60.0 / self.tpm

    async def acquire(self, tokens: int = 0) -> None:
        """Wait until one request of ``tokens`` (estimated prompt + max_tokens) may leave."""
        now = self.clock()
        if not self._waiters and now >= self._ready_at(tokens):
            self._take(now, tokens)
            return
        self._bound = True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((future, tokens))
        self._arm()
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                # Woken and cancelled at once: the slot was taken; nothing to give back safely.
                pass
            else:
                try:
                    self._waiters.remove((future, tokens))
                except ValueError:
                    pass
            raise

    def _arm(self) -> None:
        if self._timer is not None or not self._waiters:
            return
        delay = max(0.0, self._ready_at(self._waiters[0][1]) - self.clock())
        self._timer = asyncio.get_running_loop().call_later(delay, self._wake)

    def _wake(self) -> None:
        self._timer = None
        now = self.clock()
        while self._waiters and now >= self._ready_at(self._waiters[0][1]):
            future, tokens = self._waiters.popleft()
            if future.done():
                continue
            self._take(now, tokens)
            future.set_result(None)
        self._arm()

    def _rearm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._waiters:
            self._arm()

    # -- feedback ----------------------------------------------------------------------------

    def refund_tokens(self, reserved: int, used: int) -> None:
        """A reply used fewer tokens than reserved: give the difference back to the tpm grid."""
        if self.tpm is None or used >= reserved:
            return
        self._tok_next = max(self.clock(), self._tok_next - (reserved - used) * 60.0 / self.tpm)
        self._rearm()

    def on_success(self) -> None:
        self._consecutive_throttles = 0
        if not self.auto and (self.rate is None or self.rate >= self.ceiling):
            return
        now = self.clock()
        self._successes.append(now)
        while self._successes and self._successes[0] < now - _RATE_WINDOW:
            self._successes.popleft()
        if now - self._last_step < STEP:
            return
        self._last_step = now
        if not self._bound or self.rate is None:
            return  # the limiter is not what holds the pool back: growing would mean nothing
        self._bound = False
        if self.slow_start:
            rate = self.rate * SLOW_START_FACTOR
        elif self.rate < 0.97 * self._throttle_rate:
            rate = self.rate + 0.05 * self._throttle_rate  # back quickly to just under the last 429
        else:
            rate = self.rate * 1.01  # then probe gently above it
        self.rate = min(self.ceiling, rate)

    def accepted_rpm(self) -> float:
        """Requests/min the server accepted over the last couple of seconds."""
        if len(self._successes) < 2:
            return 0.0
        span = max(self.clock() - self._successes[0], 0.25)
        return len(self._successes) * 60.0 / span

    def on_throttle(self, retry_after: float | None) -> float:
        """A 429: pause the pool, cut the rate. Returns the pause in seconds."""
        now = self.clock()
        self.throttles += 1
        self._consecutive_throttles += 1
        if retry_after is not None:
            pause = retry_after
        else:
            pause = min(30.0, 0.25 * 2 ** min(self._consecutive_throttles - 1, 8))
        self._paused_until = max(self._paused_until, now + pause)
        # 429s from requests already in flight when we cut say nothing new: one cut per window.
        if self.rate is not None and now - self._last_cut > max(1.0, 2 * 60.0 / self.rate):
            self._last_cut = now
            accepted = self.accepted_rpm() or self.rate
            self._throttle_rate = min(self.rate, accepted)
            self.rate = max(MIN_RPM, min(self.ceiling, DECREASE * self._throttle_rate))
            self.slow_start = False
            self._successes.clear()
        self._rearm()
        return pause


class Backoff:
    """Exponential backoff with full jitter, capped per wait, in attempts and in total time.

    A server-directed wait (``Retry-After``) wins over the computed one. ``rng`` and the clock are
    injectable for tests.
    """

    def __init__(
        self,
        max_attempts: int,
        *,
        base: float = 0.5,
        cap: float = 30.0,
        max_total: float = 600.0,
        rng: random.Random | None = None,
    ) -> None:
        self.max_attempts = max_attempts
        self.base = base
        self.cap = cap
        self.max_total = max_total
        self.rng = rng or random.Random()

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        if retry_after is not None:
            return min(retry_after, self.max_total)
        return self.rng.uniform(0.0, min(self.cap, self.base * 2 ** (attempt - 1)))

    def gives_up(self, attempt: int, elapsed: float, next_delay: float) -> bool:
        """After ``attempt`` failures and ``elapsed`` seconds, is another try out of bounds?"""
        return attempt >= self.max_attempts or elapsed + next_delay > self.max_total
