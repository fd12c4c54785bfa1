"""Pool-wide pacing: requests/min and tokens/min, adaptive to 429s; and the retry backoff policy.

``RateLimiter`` paces departures on a grid (GCRA): request k leaves no earlier than
``max(now, next) `` and moves ``next`` on by ``60 / rpm`` seconds (and by ``tokens * 60 / tpm`` for
the token limit). There is no bucket to drain at start, so no burst: in any window of W seconds
at most ``W * rpm / 60 + 1`` requests leave, from the first second on. Waiters are futures in FIFO
order, woken by a single timer (no polling loop); with no limit set, ``acquire`` returns at once.

Adaptive control (one instance serves the whole pool, so a 429 slows every worker):

- a 429 pauses departures for ``Retry-After`` when the server sent it, else for a short backoff
  that doubles while 429s keep coming; and cuts the rate to 97% of the limit it reveals (in slow
  start the last rate that drew no 429, after it the rate that did), held there for 10 s;
- while no 429 comes and the limiter is what holds requests back, the rate grows: first in "slow
  start" from the provider's documented 300/min, linearly for 5 s up to four times that (the
  account may be shared, so 429s can come below it: docs/api.md), then doubling every ~2.5 s;
  after the first 429, held 15 s and then probing up by 0.5% of the limit per second, so it
  settles just under whatever the server enforces and still finds a raised limit;
- a server that states its limit (``RateHints`` from ``x-ratelimit-limit-requests``, per minute)
  is paced evenly at 98% of it from the first reply that says so, before any 429, and never
  above it; pacing evenly matters because servers may enforce a per-minute limit over shorter
  windows, so spending ``remaining`` in one burst would draw 429s;
- ``--rpm N`` is a hard ceiling the rate never exceeds; ``--rpm auto`` has none; ``--rpm 0`` turns
  pacing off (a 429 still pauses the pool).

Clock and sleep are injectable, so tests drive the limiter and the backoff without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable

from ..records import RateHints

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

STEP = 0.5  # seconds between rate increases
LINEAR_STEPS = 10  # slow start: +30% of the starting rate per step for 5 s (4x after 5 s) ...
LINEAR_GROWTH = 0.3
SLOW_START_FACTOR = 1.15  # ... then x1.15 per step (doubling every ~2.5 s)
DECREASE = 0.97  # of the rate that drew the 429
HOLD = 15.0  # seconds at the reduced rate before probing again
PROBE = 0.0025  # of the limit estimate per STEP: +0.5%/s
MIN_RPM = 6.0
STATED = 0.98  # of a limit the server states in its headers


class RateLimiter:
    """Requests-per-minute and tokens-per-minute pacing for one pool of workers."""

    def __init__(
        self,
        rpm: float | None,
        tpm: float | None = None,
        *,
        auto: bool = False,
        start_rpm: float = 300.0,
        serverless: bool = False,
        clock: Clock = time.monotonic,
    ) -> None:
        self.clock = clock
        self.auto = auto
        self.serverless = serverless  # its pace is a limit it enforces (providers/base.py)
        self.ceiling = math.inf if auto else (rpm or math.inf)
        self._user_ceiling = self.ceiling
        self._stated: float | None = None  # STATED x the limit the server's headers give
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
        self._no_cut_until = -math.inf
        self._hold_until = -math.inf
        self._safe_rate: float | None = None  # slow start: the last rate that drew no 429
        self._start_rate = start_rpm
        self._steps = 0
        self._limit_estimate = self.rate or 0.0
        self._consecutive_throttles = 0
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
                with contextlib.suppress(ValueError):
                    self._waiters.remove((future, tokens))
            raise

    def free_at(self, tokens: int = 0) -> float:
        """The earliest moment (this limiter's clock) one request of ``tokens`` may leave; in the
        past when one may leave now. For a caller that queues its own waiters (router.py)."""
        return self._ready_at(tokens)

    def take(self, tokens: int = 0) -> None:
        """Take a departure now, without waiting: for a caller that checked ``free_at`` first
        (router.py). Counted from now, as ``acquire`` does: a timer that fires late costs a little
        pace, never a burst (keeping to the grid instead drew 429s from a server counting
        arrivals exactly)."""
        self._take(self.clock(), tokens)

    def ready_at(self, tokens: int = 0) -> float:
        """When the next request of ``tokens`` could leave (this limiter's clock)."""
        return max(self.clock(), self._ready_at(tokens))

    def slot(self, tokens: int = 0) -> float:
        """Reserve the next departure on the grid without waiting: the time (this limiter's clock)
        at which one request of ``tokens`` may leave. For a limiter shared by other processes,
        which sleep until their slot (cluster/coordinator.py); a slot never used is capacity
        lost, never a burst later."""
        now = self.clock()
        at = max(now, self._ready_at(tokens))
        if at > now:
            self._bound = True
        self._take(at, tokens)
        return at

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

    def enforced_rps(self) -> float | None:
        """Requests a second the pool is paced at, when that is a limit the server enforces
        rather than a guess: one its replies state, or any pace of a serverless API (its
        documented rate, or ``--rpm``). None when unpaced or when the rate may be a guess at a
        server of a few slots (the in-flight window then finds its size from replies alone)."""
        if self.rate is None or (self._stated is None and not self.serverless):
            return None
        return self.rate / 60.0

    def self_hosted(self) -> None:
        """The server states its slots (llama.cpp's ``/props``): a server of its own, whose queue,
        not a rate, sets the pace; the in-flight window finds it (concurrency.py). ``--rpm auto``
        then paces nothing from the start, where slow start held a short run to 5/s at first; a
        429 still pauses the pool. A serverless API's pace stays the limit it enforces."""
        if self.auto and not self.serverless:
            self.rate = None
            self.slow_start = False

    def on_hints(self, hints: RateHints) -> None:
        """A reply stated the account's limit: pace evenly just under it, and never above it."""
        limit = hints.limit_requests
        if not limit or self.rate is None:
            return
        target = STATED * limit
        if target == self._stated:
            return
        self._stated = target
        self.ceiling = min(self._user_ceiling, target)
        if self.auto or self.rate > self.ceiling:
            self.rate = self.ceiling
            self._limit_estimate = self.ceiling
            self.slow_start = False
        self._rearm()

    def on_success(self) -> None:
        self._consecutive_throttles = 0
        if self.rate is None or self.rate >= self.ceiling:
            return
        now = self.clock()
        if now - self._last_step < STEP:
            return
        self._last_step = now
        if not self._bound or now < self._hold_until:
            # The limiter is not what holds the pool back (growing would mean nothing), or we
            # are holding just under the rate that drew the last 429.
            self._bound = False
            return
        self._bound = False
        if self.slow_start:
            self._safe_rate = self.rate
            self._steps += 1
            if self._steps <= LINEAR_STEPS:
                rate = self.rate + LINEAR_GROWTH * self._start_rate
            else:
                rate = self.rate * SLOW_START_FACTOR
        else:
            rate = self.rate + PROBE * self._limit_estimate
        self.rate = min(self.ceiling, rate)

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
        # 429s from requests sent before the cut say nothing new: one cut per reaction window.
        if self.rate is not None and now >= self._no_cut_until:
            # In slow start the last step's rate drew no 429; after it, the current rate is the
            # first one that did. Either way settle a little under it, hold, then probe gently.
            limit = self._safe_rate if self.slow_start and self._safe_rate else self.rate
            self._limit_estimate = limit
            self.rate = max(MIN_RPM, min(self.ceiling, DECREASE * limit))
            self.slow_start = False
            self._hold_until = now + pause + HOLD
            self._no_cut_until = now + pause + max(0.5, 2 * 60.0 / self.rate)
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
