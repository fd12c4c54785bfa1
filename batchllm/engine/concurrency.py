"""How many requests to keep on the wire: as many as bring more throughput, and no more.

``--concurrency`` is the ceiling. Under it the limit follows what the replies show, in the way of
TCP BBR: the requests a server needs in flight to stay busy are its delivery rate times its round
trip with no queue (its bandwidth-delay product); more only wait in its queue, where the wait
counts against ``--timeout``. A self-hosted server with 4 slots and 0.4 s a request needs about
4; a remote API at 0.2 s that takes 5,000 rows/s needs about 1,000.

- Rounds of about one round trip: a round ends once as many replies came back as the limit (or
  the requests in flight, if more) when it began. Each gives a delivery rate (replies per second)
  and its shortest round trip. Replies only count; the sums are done once a round, off the
  per-row path.
- The estimate: the highest rate of the last ``WINDOW`` rounds times the shortest round trip of
  the last ``WINDOW`` + 2. Every ``WINDOW`` rounds, two rounds keep only the estimate in flight
  (one drains the server's queue, the next sees none), so the shortest round trip is measured
  afresh: it neither keeps a value the server has left behind nor creeps up with the queue.
- The limit: the estimate times a gain, plus one. Gain 2.89 while the rate grows by a quarter a
  round (what is sent beyond the estimate turns into rate while the server has room: the limit
  nearly triples a round, as TCP's slow start doubles); 1.25 once it stopped growing or the
  estimate fell well under what was in flight (a queue holds the rest): a server's slots stay
  busy behind a short queue, and room that appears is still found (a rate up by a quarter is
  growth again). Latency that climbs with no more rate so brings the limit back to the estimate.
- Not under the fewest in flight that got about the best rate of the last rounds (the probes try
  fewer), nor under what the rate serves in ``HARMLESS`` seconds (a queue that short costs no
  one anything), nor under ``FLOOR``: when replies come back as fast as this process reads them,
  the round trip is batchllm's own, and more in flight still buys rate (each turn of the event
  loop handles more replies).
- Never a round trip, queue included, past half of ``--timeout``: the limit is at most the
  estimate plus what the rate serves in the rest of that half, and a request with no answer in
  time halves it at once. A request is then not given up for waiting behind others batchllm
  sent itself. That rate is the last rounds' average, not their best: a server with slots
  answers in bursts (4 replies each 0.4 s), and a round that caught two bursts in one round trip
  measured 17.5 replies/s from a server of 10, so the best of ten rounds was a burst's, and the
  queue it allowed took 1.6 s. A server that states its slots queues whole service times: the
  requests past its slots wait one round trip for each further time its slots are filled, so
  it has its slots times the round trips that fit in the half, and no more (4 slots at 0.4 s
  and a 1.5 s timeout: 4, where the bursts took the limit to 13 and four requests timed out).
- A server that states its slots (llama.cpp's ``GET /props``: ``total_slots``) is taken at its word
  for the first round, and needs no growth phase; otherwise the first round has ``START``.
- A rate the server enforces (``pace``: one its replies state, or a serverless API's documented
  rate) needs that rate times a round trip in flight, and never less (with ``STEADY_GAIN``). The
  rate limiter keeps the pace, so a queue builds only where the server serves less than it: a
  rate known before the first request (a serverless API's) opens the first round to the
  ceiling, and one the first reply states, to what that reply's round trip needs. Growing from
  ``START`` took four round trips to reach 100 in flight, more than a minute at 20 s a reply.

Waiters are futures in FIFO order, woken as replies free their places; no polling. The clock is
injectable, so tests drive rounds without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable

START = 8  # requests in flight in the first round, when the server states nothing
FLOOR = 8  # the least the limit goes to (never above the ceiling)
WINDOW = 10  # rounds the rate is taken over, and between two probes of the round trip
PROBE_ROUNDS = 2
STARTUP_GAIN = 2.89  # BBR's 2/ln 2: the limit nearly triples a round while the rate grows
STEADY_GAIN = 1.25
GROWN = 1.25  # a round's rate at least this over the best before it: still growing
QUEUED = 0.75  # the estimate under this share of what was in flight: a queue holds the rest
NEAR = 0.9  # a rate at least this share of the best is about as good
HARMLESS = 0.05  # seconds of queue too short to matter: rate x this may always be in flight
TIMEOUT_SHARE = 0.5  # of --timeout, the longest a queue the limit allows may take


class ConcurrencyLimit:
    """The number of requests a pool keeps on the wire, adapted round by round."""

    def __init__(
        self,
        ceiling: int,
        timeout: float,
        *,
        hint: int | None = None,
        pace: Callable[[], float | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ceiling = max(1, ceiling)
        self.timeout = timeout
        self.clock = clock
        self.floor = min(self.ceiling, FLOOR)
        paced = pace is not None and pace() is not None  # then the limiter holds the pace
        self.limit = min(self.ceiling, hint if hint else self.ceiling if paced else START)
        self.hint = hint
        self.pace = pace  # requests/s of a limit the server enforces, or None (see the docstring)
        self.in_flight = 0
        self.growing = hint is None  # a server's own figure needs no slow start
        self.peak = self.limit  # the highest limit reached, for the run's summary
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._rates: deque[float] = deque(maxlen=WINDOW)
        self._spans: deque[tuple[int, float]] = deque(maxlen=WINDOW)  # each round's replies, seconds
        self._limits: deque[int] = deque(maxlen=WINDOW)  # each of those rounds' limit
        self._trips: deque[float] = deque(maxlen=WINDOW + PROBE_ROUNDS)
        self._probe = 0  # rounds left with only the estimate in flight
        self._rounds = 0
        self._round_start = clock()
        self._fresh = True  # the first round starts with its first request (see try_take)
        self._round_size = self._round_limit = self.limit
        self._delivered = 0
        self._shortest = math.inf

    # -- the gate ----------------------------------------------------------------------------

    def try_take(self) -> bool:
        """Take a place on the wire now if one is free (the common case: no await)."""
        if self.in_flight < self.limit and not self._waiters:
            if self._fresh:
                # Not when the limit was made: the time a run takes to start (a tokenizer to
                # load, a first chunk to count) made the first round's rate look low and the
                # second's like growth, which tripled a 4-slot server's limit.
                self._fresh = False
                self._round_start = self.clock()
            self.in_flight += 1
            return True
        return False

    async def take(self) -> None:
        """Wait for a place on the wire, in arrival order."""
        if self.try_take():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # the place is handed over with the wake-up
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(None)  # handed a place and cancelled at once: give it back
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def release(self, seconds: float | None, *, timed_out: bool = False) -> None:
        """A place is free again: ``seconds`` is the round trip of a reply, None when there was
        none (an error sent no rate; a timeout halves the limit)."""
        self.in_flight -= 1
        if timed_out:
            self._cut()
        elif seconds is not None:
            self._delivered += 1
            if seconds < self._shortest:
                self._shortest = seconds
            if self._delivered == 1 and not self._rounds and self.pace is not None:
                self._open_to_pace(seconds)  # the run's first reply: its round trip is known
            if self._delivered >= self._round_size:
                self._end_round()
        self._wake()

    def _wake(self) -> None:
        waiters = self._waiters
        while waiters and self.in_flight < self.limit:
            waiter = waiters.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)

    # -- adapting ----------------------------------------------------------------------------

    def _paced(self, trip: float) -> int:
        """What a rate the server enforces needs in flight for replies ``trip`` seconds long
        (0 with no such rate)."""
        rps = self.pace() if self.pace is not None else None
        return math.ceil(rps * trip * STEADY_GAIN) + 1 if rps else 0

    def _open_to_pace(self, trip: float) -> None:
        if (paced := self._paced(trip)) > self.limit:
            self._set(paced)

    def _end_round(self) -> None:
        now = self.clock()
        elapsed = now - self._round_start
        rate = self._delivered / elapsed if elapsed > 0 else math.inf
        best_before = max(self._rates, default=0.0)
        self._rates.append(rate)
        self._spans.append((self._delivered, elapsed))
        self._limits.append(self._round_limit)
        self._trips.append(self._shortest)
        self._rounds += 1
        self._round_start = now
        self._delivered = 0
        self._shortest = math.inf
        if math.isinf(rate):  # a clock that did not move: nothing to measure by
            self._set(self.limit)
            return
        served = max(self._rates)
        estimate = served * min(self._trips)
        if self.growing and (rate < GROWN * best_before or estimate < QUEUED * self._round_limit):
            self.growing = False  # the rate stopped growing, or a queue already holds some
        elif not self.growing and best_before and rate >= GROWN * best_before:
            self.growing = True  # room appeared: find it fast
        if self._probe:
            self._probe -= 1
        elif self._rounds % WINDOW == 0 and not self.growing:
            self._probe = PROBE_ROUNDS
        if self._probe:
            limit = max(1, math.ceil(estimate))  # no queue: the round trip afresh
        else:
            gain = STARTUP_GAIN if self.growing else STEADY_GAIN
            # Never under the fewest in flight that got about the best rate: where the round
            # trip is this process's own (replies as fast as it reads them), fewer cost rate.
            enough = min(n for r, n in zip(self._rates, self._limits, strict=True) if r >= NEAR * served)
            limit = max(self.floor, math.ceil(gain * estimate) + 1, enough, math.floor(served * HARMLESS))
        paced = self._paced(min(self._trips))
        limit = max(limit, paced)
        # Never a round trip, queue included, past a share of the timeout: the requests being
        # served (the estimate: no queue), and as many more as the rate serves in what the
        # share leaves over the shortest round trip. (The rate times the share alone, taken for
        # the whole limit, kept a 4-slot server at 0.4 s a request under 4 with a 0.6 s timeout:
        # its rate fell with the limit, and the limit with its rate, to one request at a time.)
        # Never under the slots a server states either: they serve that many with no queue, and
        # an estimate a little low (a slow round) would otherwise take the limit down with it;
        # nor under what an enforced rate needs (its server serves that rate, so no queue).
        # The queue drains at the rate the server keeps up, the last rounds' average: one
        # round's rate may be a burst's (see the docstring). A server that states its slots
        # serves them at once and queues the rest by whole round trips (``_stated_most``).
        trip, share = min(self._trips), self.timeout * TIMEOUT_SHARE
        average = sum(n for n, _ in self._spans) / sum(s for _, s in self._spans)
        queue = math.floor(average * max(0.0, share - trip))
        # Unstated slots: at least what the best rate served with no queue (an estimate a little
        # low would otherwise take the limit down with the rate it brings).
        unstated = max(math.ceil(estimate), math.ceil(average * trip) + queue)
        most = self._stated_most(trip, share) if self.hint else unstated
        limit = min(limit, max(1, self.hint or 0, paced, most))
        self._set(limit)

    def _stated_most(self, trip: float, share: float) -> int:
        """The most in flight on a server of the slots it states, a round trip ``trip`` long with
        no queue: requests past the slots wait whole round trips, so as many slots-full as fit in
        ``share`` seconds (at least one: its slots serve with no queue)."""
        assert self.hint is not None
        return self.hint * max(1, math.floor(share / trip))

    def _cut(self) -> None:
        """No answer in time: the queue may be ours; halve the limit and stop growing."""
        self.growing = False
        self._set(max(1, self.limit // 2))

    def _set(self, limit: int) -> None:
        self.limit = max(1, min(self.ceiling, limit))
        self.peak = max(self.peak, self.limit)
        # A round ends once the requests now on the wire are back, and at least ``limit`` replies.
        self._round_size = max(self.limit, self.in_flight)
        self._round_limit = self.limit
