"""A labeling row in the worker pool: requests until its answer validates, each one journaled.

The next request is always decided by ``labeling.rows.RowLabeler`` from the attempts so far (a
resumed row starts from the attempts its earlier run journaled), so this module only does what
needs the engine: reserve each request's worst case against ``--max-cost`` before it leaves,
send it through the dispatcher's retrying ``call``, journal the reply as an attempt at once, and
book the row once its outcome is known, with the tokens and costs of every request summed.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import orjson

from ..errors import APIError
from ..labeling.confidence import of_reply
from ..labeling.rows import Attempt, Outcome, RowLabeler, Step
from ..labeling.spec import Labeling
from ..labeling.structured import PARAM
from ..pricing import cost
from ..records import Entry, Request
from .journal import Journal
from .stats import StopReason

if TYPE_CHECKING:
    from .dispatch import Dispatcher
    from .plan import WorkItem


def worst_pico(d: Dispatcher, request: Request, max_tokens: int) -> int:
    """The most one request may cost: its prompt (counted, or bounded by its bytes) and max_tokens."""
    prices = d.model.prices
    if prices is None:
        return 0
    counter = d.counter
    if counter.exact:
        tokens = counter.count_messages(request.messages)
    else:
        tokens = sum(len(m.content.encode("utf-8")) + 8 for m in request.messages) + 16
    schema = request.params.get(PARAM)  # a server may bill it as prompt: at most a token a byte
    if schema is not None:
        tokens += len(orjson.dumps(schema))
    return (tokens + d.provider.template_slack) * prices.input_pico + max_tokens * prices.output_pico


async def label_row(d: Dispatcher, item: WorkItem) -> None:
    assert d.labeling is not None
    # --retry-errors gives an invalid row a fresh allowance of re-asks, at least one (with
    # --reask 0 it would otherwise have nothing left to try).
    labeler = RowLabeler(d.labeling, item.request, max(1, d.labeling.reask) if item.retry else 0)
    attempts = list(item.prior)
    reuse = d.reuse
    if reuse is not None and reuse.first_hits and not attempts:
        hit = reuse.first_hits.pop(item.key, None)
        if hit is not None:  # the cache had the first reply: it costs nothing
            zero_in, zero_out = cost(d.model.prices, 0, 0)
            attempts.append(Attempt(0, "cached", hit.response, 0, 0, zero_in, zero_out, hit.truncated,
                                    confidence=hit.confidence))  # fmt: skip
    calls, latency_ms = 0, 0.0
    todo = labeler.next(attempts)
    if attempts and attempts[-1].kind == "cached" and len(attempts) == 1 and isinstance(todo, Step):
        # Not journaled yet: the row goes on.
        d.journal.add_attempt(item.row_id, 0, attempts[0], labeler.journaled(attempts[0]))
    while isinstance(todo, Step):
        result, n, latency_ms = await _ask(d, item, todo)
        calls += n
        if result is None:
            return  # stopping: the attempts so far are journaled; the row resumes from them
        if isinstance(result, APIError):
            d.journal.resumed(item.row_id)
            book(d, item, attempts, calls, latency_ms, error=result)
            return
        attempts.append(result)
        todo = labeler.next(attempts)
        if len(attempts) > 1 or isinstance(todo, Step):
            # Kept so a crash resumes after it and --reparse can read every reply; a row done
            # in one request is saved whole by its entry, in the same commit (half the writes).
            d.journal.add_attempt(item.row_id, len(attempts) - 1, result, labeler.journaled(result))
    d.journal.resumed(item.row_id)  # booked from every attempt, old ones included
    book(d, item, attempts, calls, latency_ms, outcome=todo)


async def _ask(d: Dispatcher, item: WorkItem, step: Step) -> tuple[Attempt | APIError | None, int, float]:
    """One request of a row, its worst case reserved against ``--max-cost`` while it is out:
    (the reply as an attempt, or the final error, or None when the run stops; requests made;
    latency in ms)."""
    budget = d.budget
    capped = budget.active
    max_tokens = step.request.max_tokens or d.max_tokens
    first = step.request is item.request
    body = item.body if first else d.provider.encode(step.request)
    # The first request's worst case was counted with the batch it came in (admission.py, the
    # prompt counted over threads): counting it again here was a fifth of a label's CPU.
    worst = own = item.worst_pico if first else worst_pico(d, step.request, max_tokens)
    if capped:
        taken = await budget.take(own)  # with the margin as it stands once there is room
        if taken is None:
            d.request_stop(StopReason.BUDGET, "budget reached")
            return None, 0, 0.0
        worst = taken
    billed = 0
    try:
        reuse = d.reuse
        if reuse is not None and not first:
            hit = reuse.lookup(step.request)
            if hit is not None:  # a re-ask or sample the cache has answered before: free
                zero_in, zero_out = cost(d.model.prices, 0, 0)
                attempt = Attempt(step.sample, step.kind, hit.response, 0, 0, zero_in, zero_out, hit.truncated,
                                  confidence=hit.confidence)  # fmt: skip
                return attempt, 0, 0.0
        result, n, latency_ms = await d.call(body, 0, item.row_id, worst)
        if result is None or isinstance(result, APIError):
            return result, n, latency_ms
        pt, ct, _ = d.usage(step.request, result)
        truncated = d.provider.truncated(result, max_tokens)
        labeling, tokens = d.labeling, result.logprobs
        assert labeling is not None
        # Only the label's tokens are read, and only when the job asked for them.
        sure = None
        if tokens is not None and labeling.confidence == "logprobs":
            sure = of_reply(labeling, result.text, truncated, tokens, PARAM in step.request.params)
        if reuse is not None and reuse.cache is not None:  # with its confidence: a hit has the same
            reuse.keep(
                step.request, first, item.key, result.text, pt, ct, truncated, sure, result.cached_tokens
            )
        prices, cached = d.prices_of(result), result.cached_tokens  # a fleet: the answering endpoint's
        in_cost, out_cost = cost(prices, pt, ct, cached)
        billed = (in_cost or 0) + (out_cost or 0)
        if cached:
            d.count_cached(prices, cached)
        stats = d.stats
        stats.prompt_tokens += pt
        stats.completion_tokens += ct
        stats.cost_pico += billed
        d.charged(result, billed, pt, ct)
        d.limiter.on_success()
        # Positional, as records.Entry is built (keywords cost half as much again, per request).
        attempt = Attempt(step.sample, step.kind, result.text, pt, ct, in_cost, out_cost, truncated,
                          None, None, result.endpoint, cached, result.model, sure)  # fmt: skip
        return attempt, n, latency_ms
    finally:
        if not capped or worst:
            budget.settle(worst, billed, own)


def book(
    d: Dispatcher,
    item: WorkItem,
    attempts: list[Attempt],
    calls: int,
    latency_ms: float,
    error: APIError | None = None,
    outcome: Outcome | None = None,
) -> None:
    """The row's entry: the outcome, with the tokens and costs of every request it took (and,
    for a packed row, which pack and item its answer came from)."""
    # One pass over the row's requests (a few microseconds a row at thousands of rows/s).
    pt = ct = cached = in_cost = out_cost = reask_cost = sample_cost = 0
    priced = True
    for a in attempts:
        pt += a.prompt_tokens
        ct += a.completion_tokens
        cached += a.cached_tokens
        ic, oc = a.input_cost_pico, a.output_cost_pico
        if ic is None or oc is None:
            priced = False
            continue
        in_cost += ic
        out_cost += oc
        if a.kind == "reask":
            reask_cost += ic + oc
        elif a.kind == "sample":
            sample_cost += ic + oc
    text: str | None
    message: str | None
    error_class: str | None
    if error is not None:
        status, text, message, error_class = "error", None, error.describe(), type(error).__name__
        extra: dict[str, object] = {
            "reask_cost_pico": reask_cost if priced else None,
            "sample_cost_pico": sample_cost if priced else None,
            "reasks": [a.kind for a in attempts].count("reask"),
        }
        d.stats.error += 1
        d.track(True, error)
    else:
        assert outcome is not None
        status, text = outcome.status, outcome.text
        message = None if outcome.error is None else f"invalid: {outcome.error}"
        error_class = None if outcome.error is None else "Invalid"
        extra = {
            "reask_cost_pico": reask_cost if priced else None,
            "sample_cost_pico": sample_cost if priced else None,
            "value": outcome.value,
            "parse_error": outcome.error,
            "reasks": outcome.reasks,
            "agreement": outcome.agreement,
            "votes": outcome.votes,
        }
        if outcome.confidence is not None:
            extra["confidence"] = outcome.confidence
        if status == "ok":
            d.stats.ok += 1
        else:
            d.stats.invalid += 1
        # An answer that never validated is paid for and useless: it counts against
        # --max-error-rate as a failure does (a wrong label set or schema stops the run early).
        d.track(status != "ok")
    if attempts and attempts[-1].pack_id is not None:
        answered = next(
            (a for a in reversed(attempts) if outcome is not None and a.text == outcome.text), attempts[-1]
        )
        extra["pack_id"], extra["pack_position"] = answered.pack_id, answered.pack_position
        # What its requests' prompts would have been alone, one row per request (``report``).
        asked = sum(1 for a in attempts if a.kind not in ("split", "cached"))
        extra["alone_prompt_tokens"] = item.prompt_tokens * asked
    some = bool(attempts)
    if len(attempts) == 1:  # most rows: one request, booked without building the lists below
        where = attempts[0].endpoint or None
        model = d.model_at(where)
        first = attempts[0]  # "cached", or a reply the cache had for its request (reuse.lookup)
        from_cache = (
            True if first.kind == "cached" or first.prompt_tokens == first.completion_tokens == 0 else None
        )
        served = attempts[0].served_model
    else:
        # A fleet's endpoints that answered the row's requests, in order (costs at each one's prices).
        endpoints = list(dict.fromkeys(a.endpoint for a in attempts if a.endpoint))
        where = ",".join(endpoints) or None
        model = ",".join(dict.fromkeys(d.model_at(e) for e in endpoints)) or d.model.name
        # From the cache when no request of it was paid: a first reply "cached", and samples or
        # re-asks the cache answered (kept with no tokens, at no cost).
        free = all(a.kind == "cached" or a.prompt_tokens == a.completion_tokens == 0 for a in attempts)
        from_cache = True if some and free else None
        served = ",".join(dict.fromkeys(a.served_model for a in attempts if a.served_model)) or None
    d.record(
        item,
        Entry(item.row_id, item.content_hash, status, text, pt if some else None, ct if some else None,
              in_cost if some and priced else None, out_cost if some and priced else None, message,
              error_class, calls, latency_ms or None, time.time(), model,
              attempts[-1].truncated if some else None, None, orjson.dumps(extra).decode(),
              item.key or None, None, from_cache, where, cached if some else None, served,
              d.attempts_saving(attempts) if some and priced else None),
    )  # fmt: skip


def reparse(journal: Journal, labeling: Labeling, model: str) -> int:
    """``--reparse``: read every stored reply again under this label set or schema; no request.

    Rows keep their tokens, costs and attempts; their label, status, parse error and confidence
    are redone (a confidence from the figures kept with each reply, labeling/confidence.py).
    Returns how many rows were read again.
    """
    rows = journal.labeled_rows()
    done = 0
    base = Request("", model, (), {})
    for start in range(0, len(rows), 8192):
        chunk = rows[start : start + 8192]
        attempts, entries = journal.attempts_for(chunk), journal.fetch(chunk)
        firsts = journal.first_attempts([r for r in chunk if r not in attempts])
        for row_id in chunk:
            entry = entries.get(row_id)
            if entry is None or entry.status == "error":
                continue  # unfinished rows resume in a run; failed requests have no reply to read
            # A row answered in one request kept no attempt: its entry holds the reply.
            tried = attempts.get(row_id) or firsts.get(row_id)
            if not tried:
                continue
            outcome = RowLabeler(labeling, base).outcome(tried)
            extra = orjson.loads(entry.extra or "{}")
            extra.update(
                value=outcome.value,
                parse_error=outcome.error,
                agreement=outcome.agreement,
                votes=outcome.votes,
            )
            if outcome.confidence is None:
                extra.pop("confidence", None)
            else:
                extra["confidence"] = outcome.confidence
            journal.add(
                entry._replace(
                    status=outcome.status,
                    response=outcome.text,
                    error=None if outcome.error is None else f"invalid: {outcome.error}",
                    error_class=None if outcome.error is None else "Invalid",
                    extra=orjson.dumps(extra).decode(),
                )
            )
            done += 1
        journal.flush()
    return done
