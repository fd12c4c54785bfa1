"""Labeling several rows per request (``--pack N``) in the worker pool.

    plan.items -> Packs.groups (up to N x min(samples, 4) rows) -> the pool -> Packs.label

A worker takes a group and labels it to the end in rounds. Each row's next step comes from its
own ``RowLabeler`` (labeling/rows.py) over its own attempts, exactly as without packing; rows
whose next step is alike (sample k's first answer, or a re-ask of sample k) go out together, cut
into packs of at most N rows that fit the model's window (or ``--pack-tokens``). Sample k > 0
sends the group's rows in a new order, so in new pack company (seeded by the rows: the same in
any run). Each reply becomes one attempt per row (its item, and its exact share of the tokens and
cost, labeling/pack.py), journaled at once; a row whose outcome is known is booked at once, so a
crash resends only rows with no journaled answer. A reply with no readable object, or cut off,
gives each row a ``split`` attempt (its share of what that reply cost) and the rows go again in
packs of half the size, down to one.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..errors import APIError, JobError
from ..job import Job
from ..labeling import pack as shape
from ..labeling.confidence import of_pack
from ..labeling.rows import SPLIT, Attempt, Outcome, RowLabeler, Step
from ..labeling.structured import PARAM, Formats
from ..pricing import Model, cost
from ..prompts import prompt_cache_key
from ..records import Message, Request
from .admission import Admission, Rejection
from .checks import Prepared
from .labeled import book, worst_pico
from .plan import Pack, WorkItem
from .stats import StopReason

if TYPE_CHECKING:
    from .dispatch import Dispatcher

# A reply's allowance per row beyond the job's max_tokens: its key, quotes and comma.
ITEM_TOKENS = 8
ROW_ROOM = 100  # tokens of a row's own text that the least --pack-tokens taken leaves room for
# Rounds of one group: each gives every pending row an attempt, or books it (bounded by
# samples x (1 + re-asks) plus the halvings of N; this only stops a bug from looping).
MAX_ROUNDS = 1000


class _Row:
    __slots__ = ("item", "labeler", "attempts", "calls", "latency_ms", "todo", "own")

    def __init__(self, item: WorkItem, labeler: RowLabeler, own: int) -> None:
        self.item = item
        self.labeler = labeler
        self.attempts = list(item.prior)
        self.calls = 0
        self.latency_ms = 0.0
        self.todo: Step | Outcome | None = None
        self.own = own  # tokens of the row's own line in a packed prompt

    @property
    def text(self) -> str:
        return self.item.request.messages[-1].content


def packs_for(p: Prepared, admission: Admission | None = None) -> Packs | None:
    """The job's packing, or None at one row a request; a ``--pack-tokens`` too small for one
    row is a usage error here, before anything is sent."""
    labeling = p.job.labeling
    if labeling is None or labeling.pack <= 1:
        return None
    return Packs(p.job, p.model, p.examples, admission or Admission.of(p, count_all=True))


class Packs:
    """One job's packing: the shared prefix and limits, the groups, and labeling a group."""

    def __init__(self, job: Job, model: Model, examples: tuple[Message, ...], admission: Admission) -> None:
        """``admission`` counts every row (its ``count_all``): packs are filled by tokens."""
        labeling = job.labeling
        assert labeling is not None
        self.labeling = labeling
        self.size = labeling.pack
        self.group = labeling.pack * min(labeling.samples, 4)
        self.prefix = (
            Message("system", shape.system(job.full_system, labeling)),
            *shape.examples(examples, labeling),
        )
        self.per_row = job.max_tokens
        # A pack's response_format, by its rows (labeling/structured.py); None when not structured.
        self.formats = Formats(labeling) if job.structured_output else None
        self.admission = admission
        counter = admission.counter
        self.exact = counter.exact
        self.shared = counter.count_messages((*self.prefix, Message("user", "")))
        self.cache_key = prompt_cache_key(job, self.prefix)
        limit = model.context_window
        if labeling.pack_tokens is not None:
            limit = labeling.pack_tokens if limit is None else min(limit, labeling.pack_tokens)
            least = self.least_pack_tokens()
            if labeling.pack_tokens < least:
                reply = self.max_tokens(1)
                raise JobError(
                    f"--pack-tokens {labeling.pack_tokens:,} is below one row: give at least "
                    f"{least:,} tokens = {self.shared:,} (a packed request's shared part) + "
                    f"{ITEM_TOKENS + ROW_ROOM:,} (one row's line: {ROW_ROOM} for its text, {ITEM_TOKENS} "
                    f"around it) + {reply:,} (its reply: --max-tokens {self.per_row:,}, "
                    f"{reply - self.per_row} around it)"
                )
        self.limit = limit

    def least_pack_tokens(self) -> int:
        """The least ``--pack-tokens`` taken, and the one the refusal of a smaller one states: a
        pack of one row with ``ROW_ROOM`` tokens of text, and its reply."""
        return self.shared + ITEM_TOKENS + ROW_ROOM + self.max_tokens(1)

    def max_tokens(self, rows: int) -> int:
        """A pack's reply allowance: the job's max_tokens per row, and the object around them."""
        return rows * (self.per_row + ITEM_TOKENS) + ITEM_TOKENS

    def request(self, base: Request, turns: tuple[Message, ...], rows: int) -> Request:
        """The packed request for ``rows`` rows: the shared prefix, then ``turns``; ``base`` gives
        the model and parameters (a sample's seed), the reply allowance is sized for the rows."""
        params = {**base.params, "max_tokens": self.max_tokens(rows)}
        if self.formats is not None:
            params[PARAM] = self.formats.pack(rows)
        return Request(base.provider, base.model, (*self.prefix, *turns), params, self.cache_key)

    def fits(self, own: list[int]) -> bool:
        """Do rows of these own tokens fit in one packed request (prompt and reply)?"""
        return self.limit is None or self.shared + sum(own) + self.max_tokens(len(own)) <= self.limit

    def own_tokens(self, item: WorkItem) -> int:
        """A row's own line's tokens in a packed prompt (its count without the unpacked prefix)."""
        if item.prompt_tokens:
            return max(1, item.prompt_tokens - self.admission.overhead + 4)
        return len(item.request.messages[-1].content.encode("utf-8")) // 3 + 4

    def groups(self, items: Iterator[WorkItem]) -> Iterator[Pack]:
        """The plan's rows in groups a worker labels together."""
        group: list[WorkItem] = []
        for item in items:
            group.append(item)
            if len(group) >= self.group:
                yield Pack(tuple(group), group[0].row_id)
                group = []
        if group:
            yield Pack(tuple(group), group[0].row_id)

    # -- in the pool -------------------------------------------------------------------------

    async def label(self, d: Dispatcher, group: Pack) -> None:
        """Label a group's rows to the end (or until the run stops: then the rows not booked are
        pending, their attempts journaled)."""
        labeling = self.labeling
        rows = []
        for item in group.items:
            extra = max(1, labeling.reask) if item.retry else 0
            rows.append(_Row(item, RowLabeler(labeling, item.request, extra), self.own_tokens(item)))
        reuse = d.reuse
        try:
            if reuse is not None and reuse.first_hits:
                zero_in, zero_out = cost(d.model.prices, 0, 0)
                for row in rows:
                    hit = None if row.attempts else reuse.first_hits.pop(row.item.key, None)
                    if hit is not None:  # the cache had this row's packed answer: free
                        row.attempts.append(
                            Attempt(0, "cached", hit.response, 0, 0, zero_in, zero_out, hit.truncated, "cache",
                                    confidence=hit.confidence)
                        )  # fmt: skip
            for row in rows:
                row.todo = row.labeler.next(row.attempts)
                if isinstance(row.todo, Step) and row.attempts and row.attempts[-1].kind == "cached":
                    last = row.attempts[-1]
                    d.journal.add_attempt(
                        row.item.row_id, len(row.attempts) - 1, last, row.labeler.journaled(last)
                    )
            pending = self._settle(d, rows)
            for _ in range(MAX_ROUNDS):
                if not pending or d.stopping:
                    return
                sends = [self._send(d, chunk) for chunk in self._cut(d, pending)]
                results = await asyncio.gather(*sends)
                if any(r is None for r in results):
                    return  # stopping: the rows not booked resume from their journaled attempts
                pending = self._settle(d, pending)
            raise RuntimeError("a packed group did not finish in its bound of rounds")
        finally:
            if reuse is not None:
                for row in rows:
                    reuse.abandoned(row.item.key)  # booked rows' keys are gone already

    def _settle(self, d: Dispatcher, rows: list[_Row]) -> list[_Row]:
        """Book the rows whose outcome is known; the others, with a step to send, stay."""
        left = []
        for row in rows:
            if isinstance(row.todo, Outcome):
                d.journal.resumed(row.item.row_id)
                book(d, row.item, row.attempts, row.calls, row.latency_ms, outcome=row.todo)
                row.todo = None
            elif isinstance(row.todo, Step):
                left.append(row)
        return left

    def _cut(self, d: Dispatcher, rows: list[_Row]) -> list[list[_Row]]:
        """This round's packs: rows with alike steps, in the sample's order, cut by size and tokens."""
        alike: dict[tuple[int, bool], list[_Row]] = {}
        for row in rows:
            step = row.todo
            assert isinstance(step, Step)
            alike.setdefault((step.sample, step.kind == "reask"), []).append(row)
        packs: list[list[_Row]] = []
        for (sample, reask), members in alike.items():
            if sample:  # a new order, so new company, per sample; the same in every run
                random.Random(f"{sample}:{members[0].item.row_id}").shuffle(members)
            chunk: list[_Row] = []
            cap, tokens = self.size, self.shared
            for row in members:
                size = max(1, self.size >> _splits(row.attempts, sample))
                own = row.own * (3 if reask else 1)  # a re-ask repeats the row and its answer
                fits = len(chunk) < min(cap, size) and (
                    self.limit is None or tokens + own + self.max_tokens(len(chunk) + 1) <= self.limit
                )
                if chunk and not fits:
                    packs.append(chunk)
                    chunk, cap, tokens = [], self.size, self.shared
                if self.limit is not None and self.shared + own + self.max_tokens(1) > self.limit:
                    self._too_long(d, row, self.shared + own + self.max_tokens(1))
                    continue
                chunk.append(row)
                cap, tokens = min(cap, size), tokens + own
            if chunk:
                packs.append(chunk)
        return packs

    def _too_long(self, d: Dispatcher, row: _Row, tokens: int) -> None:
        """A row that fits in no pack: an error row, as an unpacked row over the window is."""
        row.todo = None
        if row.attempts:  # a re-ask grown too long: the row ends with what it has
            d.journal.resumed(row.item.row_id)
            outcome = row.labeler.outcome(row.attempts)
            book(d, row.item, row.attempts, row.calls, row.latency_ms, outcome=outcome)
            return
        limit = "--pack-tokens" if self.labeling.pack_tokens is not None else "the context window"
        d.record_rejected(
            row.item.row_id,
            row.item.content_hash,
            Rejection(
                "ContextWindowExceeded",
                f"alone in a pack it needs {tokens:,} tokens, over {limit} (not sent)",
            ),
        )

    async def _send(self, d: Dispatcher, rows: list[_Row]) -> bool | None:
        """One packed request for these rows; each gets its attempt. None when the run stops."""
        first = rows[0].todo
        assert isinstance(first, Step)
        sample, kind = first.sample, first.kind
        texts = [row.text for row in rows]
        if kind == "reask":
            answers = [_last(row.attempts, sample) for row in rows]
            turns = shape.reask_turns(self.labeling, texts, answers)
        else:
            turns = (Message("user", shape.numbered(texts)),)
        max_tokens = self.max_tokens(len(rows))
        request = self.request(first.request, turns, len(rows))
        body = d.provider.encode(request)
        budget = d.budget
        capped = budget.active
        worst = own = worst_pico(d, request, max_tokens)
        if capped:
            taken = await budget.take(own)  # with the margin as it stands once there is room
            if taken is None:
                d.request_stop(StopReason.BUDGET, "budget reached")
                return None
            worst = taken
        billed = 0
        try:
            for row in rows:
                d.journal.leaving(row.item.row_id)
            result, calls, latency_ms = await d.call(body, 0, rows[0].item.row_id, worst)
            if result is None:
                return None
            for row in rows:
                row.calls += calls
                row.latency_ms = latency_ms
            if isinstance(result, APIError):
                for row in rows:
                    row.todo = None
                    d.journal.resumed(row.item.row_id)
                    book(d, row.item, row.attempts, row.calls, latency_ms, error=result)
                return True
            pt, ct, _ = d.usage(request, result)
            truncated = d.provider.truncated(result, max_tokens)
            items, _why = (None, "truncated") if truncated else shape.read_reply(result.text, len(rows))
            prompt = shape.prompt_shares(pt, [row.own for row in rows])
            completion = shape.completion_shares(ct, items or [""] * len(rows))
            cached = shape.cached_shares(result.cached_tokens, prompt)
            pid = shape.pack_id(body)
            sure: list[Any] = [None] * len(rows)  # each item's own tokens (labeling/confidence.py)
            if items is not None and result.logprobs is not None and self.labeling.confidence == "logprobs":
                held = PARAM in request.params  # the values' probabilities among those allowed
                sure = of_pack(self.labeling, result.text, items, result.logprobs, held)
            prices, where = d.prices_of(result), result.endpoint  # a fleet: the answering endpoint's
            reuse = d.reuse
            keep = reuse is not None and reuse.cache is not None and kind == "first"
            if result.cached_tokens:
                d.count_cached(prices, sum(cached))
            for n, row in enumerate(rows):
                ic, oc = cost(prices, prompt[n], completion[n], cached[n])
                billed += (ic or 0) + (oc or 0)
                if items is not None:
                    a = Attempt(sample, kind, items[n], prompt[n], completion[n], ic, oc, truncated, pid, n + 1,
                                where, cached[n], None, sure[n])  # fmt: skip
                elif len(rows) > 1:  # unreadable: its share paid, the row goes again in a smaller pack
                    a = Attempt(sample, SPLIT, "", prompt[n], completion[n], ic, oc, truncated, pid, n + 1,
                                where, cached[n])  # fmt: skip
                else:  # unreadable alone: an answer that does not parse (position 0: the whole reply)
                    a = Attempt(sample, kind, result.text, prompt[n], completion[n], ic, oc, truncated, pid, 0,
                                where, cached[n], result.model)  # fmt: skip
                if keep and items is not None and reuse is not None:
                    # Before the row is booked (booking lets go of its cache key). An item the
                    # reply left out is kept too, and with it what the row's unreadable packs
                    # cost it: a run the cache answers takes the same path (the same re-ask)
                    # and a pilot projects the same tokens as the run that paid (pilot.py).
                    split_pt, split_ct, split_cached = _split_tokens(row.attempts, sample)
                    reuse.keep(
                        row.item.request, True, row.item.key, items[n],
                        split_pt + prompt[n], split_ct + completion[n], False, sure[n],
                        split_cached + cached[n],
                    )  # fmt: skip
                row.attempts.append(a)
                row.todo = row.labeler.next(row.attempts)
                if isinstance(row.todo, Step) or len(row.attempts) > 1:
                    d.journal.add_attempt(row.item.row_id, len(row.attempts) - 1, a, row.labeler.journaled(a))
                if isinstance(row.todo, Outcome):  # booked with its reply, in the same commit
                    self._settle(d, [row])
            stats = d.stats
            stats.prompt_tokens += pt
            stats.completion_tokens += ct
            stats.cost_pico += billed
            d.charged(result, billed, pt, ct)
            d.limiter.on_success()
            return True
        finally:
            if not capped or worst:
                budget.settle(worst, billed, own)


def _splits(attempts: list[Attempt], sample: int) -> int:
    """How often this sample's last requests came back unreadable: the pack halves each time."""
    n = 0
    for a in reversed(attempts):
        if a.sample != sample:
            continue
        if a.kind != SPLIT:
            break
        n += 1
    return n


def _split_tokens(attempts: list[Attempt], sample: int) -> tuple[int, int, int]:
    """The prompt, completion and cached prompt tokens of this sample's last unreadable packs
    (the row's shares)."""
    pt = ct = cached = 0
    for a in reversed(attempts):
        if a.sample != sample:
            continue
        if a.kind != SPLIT:
            break
        pt, ct, cached = pt + a.prompt_tokens, ct + a.completion_tokens, cached + a.cached_tokens
    return pt, ct, cached


def _last(attempts: list[Attempt], sample: int) -> str:
    """The row's last answer in this sample (what a re-ask shows it got)."""
    for a in reversed(attempts):
        if a.sample == sample and a.kind != SPLIT:
            return a.text
    return ""
