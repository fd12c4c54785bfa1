"""How the worker pool books a row (a mixin of ``dispatch.Dispatcher``): its usage and cost at
the prices of whoever answered (a fleet's endpoint, engine/router.py, or the job's model), its
entry in the journal, errors and rows refused unsent, and the error-rate watch that stops a run.
A reply that names another model than the one priced (a self-hosted server answers with the model
it has loaded, whatever was asked) is said once per name, in the run's warnings.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..errors import APIError
from ..pricing import Model, Prices, cached_saving, cost
from ..records import Completion, Entry, Request
from ..tokens import TokenCounter, counter_for
from .admission import Rejection
from .journal import Journal
from .plan import WorkItem
from .stats import ErrorWindow, FirstFailures, Stats, StopReason

if TYPE_CHECKING:
    from ..labeling.rows import Attempt
    from ..providers import Provider
    from .ratelimit import RateLimiter
    from .router import Router
    from .seams import Ledger, Pacer


class Booking:
    model: Model
    provider: Provider
    router: Router | None
    journal: Journal | Ledger
    limiter: RateLimiter | Pacer
    max_tokens: int
    stats: Stats
    errors: ErrorWindow
    first: FirstFailures
    _prices: Prices | None
    warn: Callable[[str], None]
    served: set[str]  # the model names replies gave so far

    def record(self, item: WorkItem, entry: Entry) -> None:
        raise NotImplementedError  # dispatch.Dispatcher's

    def request_stop(self, reason: StopReason, message: str) -> None:
        raise NotImplementedError  # dispatch.Dispatcher's

    def prices_of(self, c: Completion) -> Prices | None:
        """The prices of whoever answered: the fleet endpoint's, else the model's."""
        if c.endpoint is None or self.router is None:
            return self._prices
        return self.router.by_name[c.endpoint].model.prices

    def charged(self, c: Completion, pico: int, prompt_tokens: int, completion_tokens: int) -> None:
        """What a reply cost, on the books of the fleet endpoint that gave it (the summary's,
        and the ledger's split of a fleet run by endpoint)."""
        if c.endpoint is not None and self.router is not None:
            counts = self.router.by_name[c.endpoint].counts
            counts.cost_pico += pico
            counts.prompt_tokens += prompt_tokens
            counts.completion_tokens += completion_tokens

    def note_served(self, served: str, c: Completion) -> None:
        """The first reply naming ``served``: said when it is not the model priced."""
        self.served.add(served)
        priced = self.model_of(c)
        if not same_model(served, priced):
            costs = f": costs are at the prices of {priced!r}" if self.prices_of(c) is not None else ""
            self.warn(
                f"the server answered as model {served!r}, not {priced!r}{costs} (the served_model "
                "column names the model that answered)"
            )

    def model_of(self, c: Completion) -> str:
        return self.model_at(c.endpoint)

    def model_at(self, endpoint: str | None) -> str:
        """The model name a fleet endpoint serves (the job's when unknown: not in this fleet)."""
        member = None if endpoint is None or self.router is None else self.router.by_name.get(endpoint)
        return self.model.name if member is None else member.model.name

    @property
    def counter(self) -> TokenCounter:
        return counter_for(self.model.name)

    def usage(self, request: Request, c: Completion, prompt_estimate: int = 0) -> tuple[int, int, bool]:
        """(prompt, completion tokens, counted): the server's usage, or our count when it sent none."""
        prompt_tokens, completion_tokens = c.prompt_tokens, c.completion_tokens
        counted = prompt_tokens is None or completion_tokens is None
        if counted:  # the server reported no usage: count it, and say so on the row
            counter = counter_for(self.model.name)
            if prompt_tokens is None:
                prompt_tokens = prompt_estimate or counter.count_messages(request.messages)
            if completion_tokens is None:
                completion_tokens = counter.completion_tokens(c.text)
        assert prompt_tokens is not None and completion_tokens is not None
        return prompt_tokens, completion_tokens, counted

    def _record_ok(
        self, item: WorkItem, c: Completion, attempts: int, latency_ms: float, reserved_tokens: int
    ) -> int:
        prompt_tokens, completion_tokens, counted = self.usage(item.request, c, item.prompt_tokens)
        cached = c.cached_tokens
        prices = self.prices_of(c)
        in_cost, out_cost = cost(prices, prompt_tokens, completion_tokens, cached)
        truncated = self.provider.truncated(c, item.request.max_tokens or self.max_tokens)
        # Positional (per row, keywords cost half as much again): the fields of records.Entry.
        self.record(
            item,
            Entry(item.row_id, item.content_hash, "ok", c.text, prompt_tokens, completion_tokens, in_cost,
                  out_cost, None, None, attempts, latency_ms, time.time(), self.model_of(c), truncated,
                  counted, None, item.key or None, None, None, c.endpoint, cached, c.model,
                  None if in_cost is None else cached_saving(prices, cached)),
        )  # fmt: skip
        billed = (in_cost or 0) + (out_cost or 0)
        self.charged(c, billed, prompt_tokens, completion_tokens)
        stats = self.stats
        stats.ok += 1
        stats.prompt_tokens += prompt_tokens
        stats.completion_tokens += completion_tokens
        stats.cost_pico += billed
        if cached:
            self.count_cached(prices, cached)
        self.limiter.on_success()
        if reserved_tokens:
            self.limiter.refund_tokens(reserved_tokens, prompt_tokens + completion_tokens)
        self.track(False)
        return billed

    def record_copy(self, entry: Entry) -> None:
        """A row answered by another row's reply, or by the cache (reuse.py)."""
        self.journal.add(entry)
        stats = self.stats
        if entry.status == "ok":
            stats.ok += 1
        elif entry.status == "invalid":
            stats.invalid += 1
        else:
            stats.error += 1

    def count_cached(self, prices: Prices | None, cached: int) -> None:
        """Prompt tokens a reply had served from the server's prompt cache, and what they saved."""
        self.stats.cached_tokens += cached
        self.stats.cached_saved_pico += cached_saving(prices, cached)

    def attempts_saving(self, attempts: Sequence[Attempt]) -> int:
        """What a labeling row's requests' cached tokens saved, each at the prices of the endpoint
        that answered it (an attempt keeps no prices: a row resumed from its attempts has its
        earlier ones at this run's)."""
        return sum(cached_saving(self.prices_at(a.endpoint), a.cached_tokens) for a in attempts)

    def prices_at(self, endpoint: str | None) -> Prices | None:
        """The prices of a fleet endpoint, else the model's (``prices_of`` by name)."""
        member = None if endpoint is None or self.router is None else self.router.by_name.get(endpoint)
        return self._prices if member is None else member.model.prices

    def add_error(
        self,
        row_id: str,
        content_hash: str,
        error: str,
        error_class: str,
        attempts: int,
        item: WorkItem | None = None,
    ) -> None:
        entry = Entry(
            row_id=row_id,
            content_hash=content_hash,
            status="error",
            response=None,
            prompt_tokens=None,
            completion_tokens=None,
            input_cost_pico=None,
            output_cost_pico=None,
            error=error,
            error_class=error_class,
            attempts=attempts,
            latency_ms=None,
            finished_at=time.time(),
            model=self.model.name,
            truncated=None,
            tokens_counted=None,
            request_key=item.key or None if item is not None else None,
        )
        if item is not None:
            self.record(item, entry)
        else:
            self.journal.add(entry)
        self.stats.error += 1

    def _record_error(self, item: WorkItem, exc: APIError, attempts: int) -> None:
        self.add_error(item.row_id, item.content_hash, exc.describe(), type(exc).__name__, attempts, item)
        self.track(True, exc, item.row_id)

    def record_rejected(self, row_id: str, content_hash: str, why: Rejection) -> None:
        """A row refused before any request (over the window, no prompt): an error, not sent."""
        self.add_error(row_id, content_hash, f"{why.error_class}: {why.message}", why.error_class, 0)
        self.stats.rejected += 1

    def forget_first_failures(self) -> None:
        """After a stop on the first rows failing alike: those rows pending again (not billed)."""
        if self.first.stopped and isinstance(self.journal, Journal):
            self.journal.forget_failures(self.first.row_ids)

    def track(self, failed: bool, error: APIError | None = None, row_id: str | None = None) -> None:
        """Sliding window of the last N sent rows; too many failures stop the run, and so do the
        first rows all failing alike (``FirstFailures``; ``row_id``, a row it may leave pending)."""
        if (self.first.active or self.first.stopped) and self.first.add(error, row_id):
            self.request_stop(StopReason.API, self.first.message())
        if self.errors.add(failed):
            self.request_stop(StopReason.ERROR_RATE, self.errors.message())


def same_model(served: str, asked: str) -> bool:
    """A reply's model is the one asked for, or a dated snapshot of it (OpenAI answers
    ``gpt-4o-mini`` as ``gpt-4o-mini-2024-07-18``, at the same prices)."""
    if served == asked:
        return True
    suffix = served[len(asked) + 1 :] if served.startswith(asked + "-") else ""
    return suffix.replace("-", "").isdigit()
