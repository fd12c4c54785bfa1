"""A fleet behind one worker pool: each request to the cheapest endpoint with room (issue 23).

    worker -> Router.acquire(tokens) -> Member (the cheapest with a free slot, not benched, whose
              own limiter lets a request leave now) -> Member.complete(body) -> Router.release

Every endpoint keeps its own limiter (its ``rpm``/``tpm``, its ``Retry-After`` pauses), its own
connection pool and its own concurrency, so none is ever pushed past its limit, and a pricier
one gets a request only when every cheaper one is full: the fleet runs at the sum of its limits.
Waiting workers are served first come, first served by one pump (no polling): it runs when a
worker asks, when a request ends, and on a timer set to the earliest moment a limiter or a bench
lets a request leave.

Failing over: ``BENCH_AFTER`` failures in a row without an answer (timeouts, dropped connections,
5xx) bench an endpoint for ``BENCH_S`` seconds, doubling while it keeps failing; after a bench it
takes one request at a time (a probe) until one succeeds. A rejected key, an exhausted quota or
a model it does not serve takes it out for the rest of the run, with one warning saying why; its
rows go to the others. The run stops (exit 4) when none is left: every endpoint out, or failing
every request with no answer for ``GIVE_UP_S`` seconds (a refused port is benched, not out, as
it may come back, so a fleet of dead ones would otherwise wait for a probe to succeed forever).

A body is encoded once, for the job's provider and model; an endpoint of another provider or
model name gets it re-encoded (``rebody``), a few microseconds a request. Optional fields
(``response_format``, ``logprobs``) are each endpoint's own: a body carries one when any endpoint
takes it (job.py), and it is taken out for an endpoint whose provider has none or that refused it
(a 400 naming it turns it off for that endpoint alone: member.py, refusable.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from ..access import is_loopback
from ..errors import APIError, JobError, RunStopError
from ..fleet import FleetEndpoint
from ..providers import Provider
from .counts import plural
from .deadline import paces
from .member import BENCH_S, Member
from .ratelimit import RateLimiter

# A request may leave this much before its slot: the timer wakes that early, so a timer that
# fires a little late still sends on the grid (a slot taken early is counted from the grid, not
# from now, so the pace never passes the limit); counted from a late "now" instead, 1-3 ms of
# timer slack cost 5-10% of a 40/s endpoint's pace under load.
EARLY = 0.002
AIM = 0.995  # of the time left to the deadline that the plan fills
REPLAN_S = 2.0
BENCH_AFTER = 3
BENCH_MAX_S = 60.0
GIVE_UP_S = 30.0  # an endpoint failing this long with no answer is not waited for, if none is


class Router:
    """The fleet's members, cheapest first, and the workers waiting for one."""

    def __init__(
        self, members: list[Member], warn: Callable[[str], None], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.members = members  # cheapest first (api.py orders them)
        self.by_name = {m.name: m for m in members}
        self.warn = warn
        self.clock = clock
        self._waiters: deque[tuple[asyncio.Future[Member], int]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self.deadline: float | None = None  # --deadline, on this router's clock
        self._left: Callable[[], int] = lambda: 0
        self._replan_at = 0.0
        self.plan_note: str | None = None
        # Called when no endpoint is left (``left``) with no failure to say so: the pool stops.
        self.on_down: Callable[[], None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None

    # -- a deadline --------------------------------------------------------------------------

    def meet(self, seconds: float, left: Callable[[], int]) -> None:
        """Finish the ``left()`` requests within ``seconds`` at the least cost (see ``_replan``)."""
        self.deadline = self.clock() + seconds
        self._left = left
        self._replan(self.clock())

    def _replan(self, now: float) -> None:
        """The cheapest mix that ends by the deadline (deadline.py), from what is left and what
        each endpoint carries now (its limit, and its slots over the latency it shows; nothing
        while benched). Aimed at ``AIM`` of the time left, so the last replies land before the
        deadline; made again every ``REPLAN_S`` seconds. When no mix can make it, every endpoint
        runs at full pace."""
        assert self.deadline is not None
        self._replan_at = now + REPLAN_S
        left, time_left = self._left(), (self.deadline - now) * AIM
        live = [m for m in self.members if m.gone is None]
        need = left / time_left if time_left > 0 else float("inf")
        carries = [m.capacity() if now >= m.benched_until else 0.0 for m in live]
        plan = paces([m.price for m in live], carries, need) if live else None
        self.plan_note = None
        if plan is None:
            plan = [None] * len(live)
            self.plan_note = (
                f"no mix of endpoints ends {plural(left, 'request')} by the deadline: all at full pace"
            )
        for m, pace in zip(live, plan, strict=True):
            m.idle = pace == 0
            if pace is None or m.idle:
                m.paced = None  # full pace (only its own limits hold it), or none at all
            elif m.paced is None:
                m.paced = RateLimiter(pace * 60.0, clock=self.clock)
            else:  # the same grid at the new pace: a new limiter would let one leave at once
                m.paced.rate = pace * 60.0

    async def __aenter__(self) -> Router:
        for m in self.members:
            await m.client.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for timer in (self._timer, self._watchdog):
            if timer is not None:
                timer.cancel()
        for m in self.members:
            await m.client.__aexit__(*exc)

    @property
    def concurrency(self) -> int:
        """Workers the pool needs to fill every endpoint at once."""
        return min(10_000, sum(m.concurrency for m in self.members))

    # -- choosing ----------------------------------------------------------------------------

    async def acquire(self, tokens: int = 0) -> Member:
        """Wait for the cheapest endpoint with room; it is held until ``release``."""
        future: asyncio.Future[Member] = asyncio.get_running_loop().create_future()
        self._waiters.append((future, tokens))
        self._pump()
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(future.result())
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove((future, tokens))
            raise

    def _pick(self, now: float, tokens: int) -> Member | None:
        for m in self.members:
            if m.free(now) and m.free_at(tokens) <= now + EARLY:
                return m
        return None

    def _pump(self) -> None:
        now = self.clock()
        if self.deadline is not None and now >= self._replan_at:
            self._replan(now)
        while self._waiters:
            future, tokens = self._waiters[0]
            if future.done():
                self._waiters.popleft()
                continue
            m = self._pick(now, tokens)
            if m is None:
                break
            self._waiters.popleft()
            m.take(tokens)
            m.in_flight += 1
            if m.quiet_since is None:
                m.quiet_since = now
                self._watch(now)
            future.set_result(m)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._waiters:
            tokens = self._waiters[0][1]
            times = [
                max(m.benched_until, m.free_at(tokens))
                for m in self.members
                if m.gone is None and not m.idle and m.in_flight < (1 if m.probing else m.concurrency)
            ]
            if self.deadline is not None:  # a new plan may give an idle endpoint a pace
                times.append(self._replan_at)
            if times:  # else a request ending pumps again
                delay = max(0.0, min(times) - now - EARLY)
                self._timer = asyncio.get_running_loop().call_later(delay, self._pump)

    def release(self, m: Member) -> None:
        m.in_flight -= 1
        self._pump()

    # -- what happened -----------------------------------------------------------------------

    def answered(self, m: Member, latency_ms: float) -> None:
        m.counts.ok += 1
        m.counts.latency_ms += latency_ms
        self.heard(m)
        if m.probing:
            m.probing = False
            m.bench_s = BENCH_S
        m.limiter.on_success()

    def heard(self, m: Member) -> None:
        """The endpoint answered (a reply, a 429, a request it rejects): it is up."""
        m.failures = 0
        m.quiet_since = None
        m.quiet_failed = False

    def throttled(self, m: Member, retry_after: float | None) -> None:
        m.counts.throttled += 1
        self.heard(m)
        m.limiter.on_throttle(retry_after)

    def failed(self, m: Member, exc: APIError) -> bool:
        """A failure with no answer (timeout, dropped connection, 5xx): bench after a few. True
        while an endpoint is left to wait for (see ``left``)."""
        now = self.clock()
        m.counts.errors += 1
        m.failures += 1
        m.quiet_failed = True
        m.cause = exc.message if exc.status is None else f"HTTP {exc.status}: {exc.message}"
        if m.failures >= BENCH_AFTER or m.probing:
            m.benched_until = now + m.bench_s
            m.bench_s = min(BENCH_MAX_S, m.bench_s * 2)
            m.probing = True
            m.failures = 0
        if self._watchdog is not None:  # its quiet now counts from its first failure's rule
            self._watchdog.cancel()
            self._watchdog = None
            self._watch(now)
        return self.left()

    def lose(self, m: Member, exc: RunStopError) -> bool:
        """A key, quota or model problem: ``m`` is out for the run. True while an endpoint is
        left to wait for (see ``left``)."""
        if m.gone is None:
            m.gone = exc.reason or "stopped"
            m.cause = out_cause(m, exc)
            if self.left():
                self.warn(f"endpoint {m.name!r} is out for this run: it {m.cause}; its rows go to the others")
        self._pump()
        return self.left()

    def left(self) -> bool:
        """Is an endpoint left that may still answer: not out, and not silent since its first
        request after its last answer for ``GIVE_UP_S`` once a request failed, or for its
        ``--timeout`` while its requests are only slow (``Member.silent_after``; one never tried may)?"""
        now = self.clock()
        return any(
            m.gone is None and ((at := m.silent_after(GIVE_UP_S)) is None or now < at) for m in self.members
        )

    def _watch(self, now: float) -> None:
        """Wake when the next endpoint has been silent ``GIVE_UP_S``: with none left, the run is
        stopped then (``on_down``), not at the next failure, which a hung endpoint gives only
        at its ``--timeout``."""
        if self._watchdog is not None or self.on_down is None:
            return
        due = [
            at
            for m in self.members
            if m.gone is None and (at := m.silent_after(GIVE_UP_S)) is not None and at > now
        ]
        if due:  # else none is silent yet: the next to send calls this again
            loop = asyncio.get_running_loop()
            self._watchdog = loop.call_later(min(due) - now, self._wake_watch)

    def _wake_watch(self) -> None:
        self._watchdog = None
        if not self.left():
            assert self.on_down is not None
            self.on_down()
        else:
            self._watch(self.clock())

    def none_left(self) -> str:
        """Why the run stops when ``left()`` is false: each endpoint and its cause, in words."""
        now = self.clock()
        causes = []
        for m in self.members:
            if m.gone is None and m.quiet_since is not None:
                cause = m.cause or f"{plural(m.in_flight, 'request')} in flight, no reply yet"
                causes.append(f"{m.name!r} has answered nothing for {now - m.quiet_since:.0f} s ({cause})")
            else:
                causes.append(f"{m.name!r} {m.cause}")
        return "no endpoint of the fleet is left to send to: " + "; ".join(causes)

    def summary(self) -> dict[str, Any]:
        down = not self.left()  # the run stopped for want of an endpoint: say which never answered
        return {
            m.name: m.counts.describe(m.gone or ("no answer" if down and m.quiet_since is not None else None))
            for m in self.members
        }


def out_cause(m: Member, exc: RunStopError) -> str:
    """Why a key, quota or model problem takes ``m`` out, in words; its key variable is named
    only when the fleet file names one (without, the endpoint got no key at all)."""
    said = exc.said()
    var = m.spec.key_env
    if exc.reason == "model":
        return f"does not serve the model {m.model.name!r} ({said})"
    if exc.reason == "structured":
        return f"refuses response_format, which --structured on requires ({said})"
    if exc.reason == "confidence":
        return f"refuses logprobs, which --confidence logprobs requires ({said})"
    if exc.reason == "quota":
        whose = f"the key from {var}" if var else "its account"
        return f"says the quota of {whose} is used up ({said})"
    if var:
        return f"rejected the key from {var} ({said})"
    return f"wants a key ({said}): name the variable that holds it with key_env in the fleet file"


def fleet_router(
    fleet: tuple[FleetEndpoint, ...],
    timeout: float,
    primary: Provider,
    primary_model: str,
    warn: Callable[[str], None],
    environ: Mapping[str, str] | None = None,
    fields: tuple[str, ...] = (),
    required: tuple[str, ...] = (),
) -> Router:
    """The fleet's members, cheapest first (by the price of a request with as many prompt as
    reply tokens), each with its key from its own variable; a missing key is a usage error."""
    environ = os.environ if environ is None else environ
    members = []
    for spec in fleet:
        key = None
        if spec.key_env:
            key = environ.get(spec.key_env) or None
            if key is None:
                raise JobError(
                    f"fleet endpoint {spec.name!r}: the environment variable {spec.key_env} is not set"
                )
            parts = urlsplit(spec.endpoint)
            if parts.scheme == "http" and not is_loopback(parts.hostname or ""):
                raise JobError(
                    f"fleet endpoint {spec.name!r}: its key would cross the network in clear text; use https"
                )
        members.append(Member(spec, key, timeout, primary, primary_model, fields, warn, required))
    return Router(sorted(members, key=lambda m: m.price), warn)
