"""One rate limit, one budget and one journal for every actor of a cluster run.

The coordinator is a single async Ray actor (``num_cpus=0``), placed on the driver's node so
that the journal it writes is the ordinary SQLite journal beside the output (engine/journal.py:
one writer, a local disk, what ``report``, ``status`` and a local resume read). Its logic is this
plain class; ``driver.py`` makes it an actor. Actors ask it for three things:

- **departure slots** (``lease``): the limiter is the local engine's ``RateLimiter`` (GCRA pacing,
  adaptive to 429s and to stated limits), asked for its next slots with ``slot()`` instead of
  waited on. An actor gets the slots of its waiting requests as offsets from now, at most
  ``HORIZON`` ahead, and sleeps until each: the sum over all actors follows one grid, and a slot
  an actor never uses (it died, its batch ended) is capacity lost, never a burst later: a time
  slot expires by itself. With no pacing at all the answer says so, and actors ask again only
  once a second (``FREE_FOR``).
- **budget** (``reserve``/``settle``): each row's worst case is reserved against the one
  ``Budget`` before it is sent, as on one machine. A reservation belongs to its actor; an actor
  that stops calling (heartbeats every second, ``hello``) for ``ttl`` seconds is taken for dead
  and its reservations expire as *spent*: the requests may have been billed with the replies
  lost, so the cap holds even then, and the summary counts them as maybe billed.
- **rows** (``lookup``/``wait``/``record``): which rows of a batch are done already (resume: a
  second run sends nothing), and a claim on the others, so that two actors never send the same
  row at once (identical prompts share a row id without ``--id-column``) and a batch Ray retries
  after its actor died waits for that actor's claims to expire instead of paying again for
  replies it recorded. Replies reach the journal in small groups as they arrive (worker.py),
  so a killed actor loses at most what it had in flight.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

from ..engine.budget import Budget
from ..engine.journal import Journal
from ..engine.ratelimit import RateLimiter
from ..engine.stats import StopReason
from ..errors import BatchLLMError
from ..job import Job
from ..providers import get_provider
from ..records import Entry, RateHints

HORIZON = 0.25  # seconds of slots leased ahead
FREE_FOR = 1.0  # seconds an actor sends unpaced before asking again
LEASE_TTL = 5.0  # seconds of silence before an actor's claims and reservations expire
WAIT_POLL = 0.05
PACE = 0.98  # of --rpm and --tpm: what lateness in waking up may add stays under the limit


class Coordinator:
    def __init__(self, job: Job, ttl: float = LEASE_TTL, clock: Any = time.time) -> None:
        provider = get_provider(job.provider)
        self.job = job
        self.ttl = ttl
        self.clock = clock
        # Slots are wall-clock times (one clock for every process of a machine, NTP's across
        # machines); an actor wakes a few ms after its slot, so the grid runs at PACE of the limit.
        # A fleet's endpoints are paced in each actor, each with its share of their limits
        # (worker.py): this grid would only hold them back.
        fleet = job.fleet is not None
        self.limiter = RateLimiter(
            None if fleet else job.rpm * PACE if job.rpm else job.rpm,
            None if fleet else job.tpm * PACE if job.tpm else job.tpm,
            auto=job.rpm is None and not fleet,
            start_rpm=provider.documented_rpm,
            clock=clock,
        )
        # An error of ours opening the journal is kept for the driver (``failed``): raised here,
        # Ray would report it only as the text of a dead actor's traceback, exit 75.
        self.failure: BatchLLMError | None = None
        try:
            self.journal = Journal.open(job.journal_dir, job.request_settings(), restart=job.restart)
        except BatchLLMError as exc:
            self.failure = exc
            return
        self.lost = self.journal.start_inflight()  # a killed local run's requests in flight
        self.budget = Budget(job.max_cost_pico, self.journal.committed_pico(), job.max_cost_per_run_pico)
        self.counts: Counter[str] = Counter()
        self.claims: dict[str, str] = {}  # row_id -> owner
        # Without --id-column identical prompts share a row id: which batch shows the row's cost
        # in the output (the others show a copy at 0), so the output's costs add up exactly.
        self.shows = job.id_column is None
        self.shown: dict[str, str] = {}  # row_id -> the batch showing its cost
        self.finished_batches: set[str] = set()
        self.seen: dict[str, float] = {}  # owner -> when last heard from
        self.leases: dict[str, list[int]] = {}  # owner -> budget reservations (picodollars)
        self.expired: dict[str, list[int]] = {}  # reservations of owners taken for dead
        self.maybe_billed = [0, 0]  # requests, worst-case picodollars
        self.stop_reason: StopReason | None = None
        self.stop_message: str | None = None
        self.started = time.monotonic()
        self.since = time.time()

    # -- liveness ----------------------------------------------------------------------------

    def hello(self, *owners: str) -> None:
        """Heard from: an actor (its budget reservations) or one of its batches (its claims)."""
        now = self.clock()
        for owner in owners:
            self.seen[owner] = now
        self._expire()

    def _expire(self) -> None:
        now = self.clock()
        dead = [o for o, t in self.seen.items() if now - t > self.ttl]
        for owner in dead:
            del self.seen[owner]
            for reserved in self.leases.pop(owner, []):
                # Sent, maybe billed, reply lost with the actor: count it as spent.
                self.budget.settle(reserved, reserved)
                self.expired.setdefault(owner, []).append(reserved)
                self.maybe_billed[0] += 1
                self.maybe_billed[1] += reserved
            for row_id in [r for r, o in self.claims.items() if o == owner]:
                del self.claims[row_id]
            if self.shown and owner not in self.finished_batches:
                # Its output was lost with it: the batch Ray runs again shows these rows.
                for row_id in [r for r, o in self.shown.items() if o == owner]:
                    del self.shown[row_id]

    # -- failing -----------------------------------------------------------------------------

    def fail(self, error: BatchLLMError) -> None:
        """An actor met an error of ours (it fails the Ray job): the first is the one reported."""
        if self.failure is None:
            self.failure = error

    def failed(self) -> BatchLLMError | None:
        """The error of ours that failed the run, if one did (cluster/opening.py)."""
        return self.failure

    # -- stopping ----------------------------------------------------------------------------

    def stop(self, reason: str, message: str) -> None:
        """Stop the run: the first reason given is the one reported."""
        if self.stop_reason is None:
            self.stop_reason = StopReason(reason)
            self.stop_message = message

    def stopped(self) -> tuple[str, str] | None:
        if self.stop_reason is None:
            return None
        return self.stop_reason.value, self.stop_message or self.stop_reason.value

    # -- pacing ------------------------------------------------------------------------------

    def lease(
        self, owner: str, tokens: list[int], successes: int = 0, refunded: int = 0
    ) -> tuple[list[float], bool, tuple[str, str] | None]:
        """Departure slots for ``tokens`` (one per waiting request): (wall-clock times, whether
        pacing is on at all, the stop if the run is stopping)."""
        self.hello(owner)
        limiter = self.limiter
        if successes:
            self.counts["requests_ok"] += successes
            limiter.on_success()
        if refunded:
            limiter.refund_tokens(refunded, 0)
        if self.stop_reason is not None:
            return [], True, self.stopped()
        now = self.clock()
        paced = limiter.rate is not None or limiter.tpm is not None
        slots: list[float] = []
        for n in tokens:
            if slots and limiter.ready_at(n) > now + HORIZON:
                break
            slots.append(limiter.slot(n))
        paced = paced or (bool(slots) and slots[0] > now)  # paused by a 429
        return slots, paced, None

    def throttled(self, retry_after: float | None) -> None:
        self.counts["throttled"] += 1
        self.limiter.on_throttle(retry_after)

    def hints(self, hints: RateHints) -> None:
        self.limiter.on_hints(hints)

    # -- budget ------------------------------------------------------------------------------

    async def reserve(self, owner: str, worst_pico: int, wait: float = 2.0) -> bool | None:
        """Reserve a row's worst case: True, False (the budget is spent: the run stops), or
        None when in-flight reservations had not settled within ``wait`` s (ask again)."""
        self.hello(owner)
        if self.stop_reason is not None:
            return False
        try:
            ok = await asyncio.wait_for(self.budget.reserve(worst_pico), wait)
        except TimeoutError:
            return None
        if ok:
            self.leases.setdefault(owner, []).append(worst_pico)
        else:
            self.stop(StopReason.BUDGET.value, "budget reached")
        return ok

    def settle(self, owner: str, reserved_pico: int, actual_pico: int) -> None:
        held = self.leases.get(owner)
        if held is not None and reserved_pico in held:
            held.remove(reserved_pico)
            self.budget.settle(reserved_pico, actual_pico)
            return
        gone = self.expired.get(owner)
        if gone is not None and reserved_pico in gone:
            # Taken for dead too early: it was counted as spent in full; put the truth back.
            gone.remove(reserved_pico)
            self.budget.spent -= reserved_pico - actual_pico
            self.budget.spent_run -= reserved_pico - actual_pico
            self.maybe_billed[0] -= 1
            self.maybe_billed[1] -= reserved_pico

    def gave_up(self, row_id: str, worst_pico: int) -> None:
        """A request an actor stopped waiting for (a timeout): maybe billed, in the journal, and
        spent in the budget; when that leaves no room, the run stops."""
        self.journal.gave_up(row_id, worst_pico)
        if not self.budget.gave_up(worst_pico):
            self.stop(StopReason.BUDGET.value, "budget reached")

    # -- rows --------------------------------------------------------------------------------

    def _done(self, row_ids: list[str]) -> dict[str, Entry]:
        self.journal.flush()
        found = self.journal.fetch(row_ids)
        if self.job.retry_errors:  # failed in an earlier run: send again
            return {r: e for r, e in found.items() if e.status != "error" or e.finished_at >= self.since}
        return found

    def lookup(
        self, owner: str, row_ids: list[str]
    ) -> tuple[dict[str, Entry], list[str], list[str], tuple[str, str] | None]:
        """Rows already done (entries), rows another live batch is sending (to ``wait`` for),
        which of the done rows another batch shows (to show as copies), and the stop if the run
        is stopping (then nothing is claimed); the rest are claimed for ``owner``."""
        self.hello(owner)
        done = self._done(row_ids)
        if self.stop_reason is not None:
            return done, [], self._copies(owner, list(done)), self.stopped()
        _, waiting = self._claim(owner, row_ids, done)
        return done, waiting, self._copies(owner, list(done)), None

    def _claim(self, owner: str, row_ids: list[str], done: dict[str, Entry]) -> tuple[list[str], list[str]]:
        """Claim the rows not done and not held by another batch: (claimed, held by others)."""
        claimed, held = [], []
        for row_id in row_ids:
            if row_id in done:
                continue
            holder = self.claims.get(row_id)
            if holder is None or holder == owner:
                self.claims[row_id] = owner
                claimed.append(row_id)
            else:
                held.append(row_id)
        return claimed, held

    def _copies(self, owner: str, row_ids: list[str]) -> list[str]:
        if not self.shows:
            return []
        copies = []
        for row_id in row_ids:
            shown_by = self.shown.setdefault(row_id, owner)
            if shown_by != owner:
                copies.append(row_id)
        return copies

    def finished(self, owner: str) -> None:
        """A batch returned its output: the rows it shows stay shown."""
        if self.shows:
            self.finished_batches.add(owner)

    async def wait(
        self, owner: str, row_ids: list[str], timeout: float = 2.0
    ) -> tuple[dict[str, Entry], list[str], list[str], list[str]]:
        """Wait for rows other batches claimed: (entries now done, rows claimed for ``owner`` as
        their holder died or gave up, rows still held by others, done rows shown elsewhere)."""
        deadline = time.monotonic() + timeout
        while True:
            self.hello(owner)
            done = self._done(row_ids)
            claimed, held = self._claim(owner, row_ids, done)
            if not held or time.monotonic() >= deadline:
                return done, claimed, held, self._copies(owner, list(done))
            await asyncio.sleep(WAIT_POLL)

    def release(self, owner: str, row_ids: list[str]) -> None:
        """Rows an actor stopped before sending: another may take them."""
        for row_id in row_ids:
            if self.claims.get(row_id) == owner:
                del self.claims[row_id]

    def record(self, owner: str, entries: list[Entry], counts: dict[str, int]) -> None:
        """Rows finished by ``owner``: into the journal, committed before this returns."""
        self.hello(owner)
        for entry in entries:
            self.journal.add(entry)
            if self.shows:
                self.shown.setdefault(entry.row_id, owner)
            if self.claims.get(entry.row_id) == owner:
                del self.claims[entry.row_id]
        self.counts.update(counts)
        self.journal.flush()
        if self.journal.write_error is not None:
            self.stop(StopReason.JOURNAL.value, f"cannot write the journal: {self.journal.write_error}")

    # -- reading -----------------------------------------------------------------------------

    def note_run(self, command: str, input_rows: int) -> None:
        """What ``status`` tells of this run: without --id-column, identical prompts are one row
        of the journal here, so its rows are fewer than the output's."""
        self.journal.set_meta(
            "last_run",
            {
                "command": command,
                "input": str(self.job.input),
                "input_rows": input_rows,
                "engine": "ray",
                "shared_ids": self.job.id_column is None,
                "started_at": time.time(),
            },
        )

    def done_before(self) -> int:
        """Rows earlier runs finished (not sent again), for the progress display."""
        counts = self.journal.counts_before
        return (
            counts.get("ok", 0)
            + counts.get("invalid", 0)
            + (0 if self.job.retry_errors else counts.get("error", 0))
        )

    def snapshot(self) -> dict[str, Any]:
        """This run's counters, for the progress display."""
        c = self.counts
        done = c["ok"] + c["error"] + c["invalid"]
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return {
            "done": done,
            "ok": c["ok"],
            "error": c["error"],
            "requests": c["requests"],
            "retries": c["retries"],
            "throttled": c["throttled"],
            "tokens": c["prompt_tokens"] + c["completion_tokens"],
            "cost_pico": c["cost_pico"],
            "rows_per_s": done / elapsed,
        }

    def finish(self) -> dict[str, Any]:
        """Close the journal; what the summary needs."""
        self.journal.flush()
        if self.maybe_billed[0]:  # actors taken for dead: in the journal, for status and report
            add = (self.maybe_billed[0], self.maybe_billed[1])
            self.journal.set_meta("maybe_billed", self.journal.maybe_billed(current=False, add=add))
        out = {
            "counts": dict(self.counts),
            "totals": self.journal.totals(),
            "stop": self.stopped(),
            "spent_pico": self.budget.spent,
            "spent_run_pico": self.budget.spent_run,
            "refused_pico": self.budget.refused,  # the worst case that did not fit (budget.advice)
            "run_cap_reached": self.budget.run_cap_reached,
            "maybe_billed": tuple(self.maybe_billed),
            "lost_before": self.lost,
            "estimate": self.journal.get_meta("estimate"),
        }
        self.journal.close()
        return out
