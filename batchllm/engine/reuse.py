"""Rows answered without a request of their own: never pay twice for the same request.

Before a batch of rows is sent, each row's key is checked, in this order (the key is the row's
content hash: within one journal every row is built with the same settings, so identical
content means an identical request; the cache, shared across jobs, uses ``Request.key()``):

1. a row with the same key is in flight in this run: this row waits for its reply (a follower);
2. a row of this output already answered the same key (this run or an earlier one): its reply;
3. the response cache (cache.py) has the reply, and its policy serves this request.

Otherwise the row is sent, as the leader of its key. Identical requests share one reply at any
temperature: several answers for one row are what ``--samples`` is for. A row answered this way
costs nothing and says so (``answered_by`` names the row that paid, or ``cached``); the cost is
booked once, on the row that paid. Followers of a leader that ends without a reply (the run
stopped) stay pending, like it.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from ..pricing import Model, cost
from ..records import Entry, Request
from .cache import Cached, ResponseCache, cache_key
from .journal import Journal

Record = Callable[[Entry], None]
CACHED_REPLIES = "cached_replies"  # meta: what the cache served, as if sent (``Reuse.remember``)
_TALLY = ("replies", "prompt_tokens", "completion_tokens", "cost_pico")


class Reuse:
    def __init__(
        self,
        journal: Journal,
        cache: ResponseCache | None,
        endpoint_id: str,
        model: Model,
        record: Record,
        labeling: bool = False,
        first_is_request: bool = True,
        packed: int = 0,
    ) -> None:
        self.journal = journal
        # A row answered in a packed request (engine/packed.py) is cached per row under a key
        # that names the pack size: a run without packing (or packing another number of rows,
        # whose accuracy differs) is never served a packed answer, nor the other way.
        self.packed = packed
        # A labeling row's reply is read, and maybe re-asked, by its worker (engine/labeled.py):
        # a cache hit becomes its first attempt (``first_hits``) instead of a finished row.
        self.labeling = labeling
        self.first_hits: dict[str, Cached] = {}
        # With several samples a row's first request carries a seed its own request lacks: the
        # cache is then asked per request (``lookup``), not per row.
        self.screen_cache = cache is not None and (not labeling or first_is_request)
        self.cache = cache
        self.endpoint_id = endpoint_id
        self.model = model
        self.record = record
        self.waiting: dict[str, list[tuple[str, str]]] = {}  # key of a leader in flight -> followers
        self.cache_keys: dict[str, str] = {}  # key of a leader in flight -> its cache key
        self.copies = 0  # rows answered by another row's reply
        self.hits = 0  # rows answered from the cache
        self.saved_pico = 0  # what the cache hits would have cost
        # Completion lengths of the cached replies served: what an estimate learns from when a
        # run (a pilot) is answered from the cache (journal.observed).
        self.hit_lengths: Counter[int] = Counter()
        self.hit_tokens = [0, 0]  # the served replies' prompt and completion tokens, as billed once
        # A labeling row's samples and re-asks the cache answered (``lookup``): more requests of
        # rows already counted, not rows of their own (requests, completion tokens).
        self.more_hits = [0, 0]

    def screen(self, rows: Sequence[tuple[str, str, Request]]) -> list[str | None]:
        """Per row (row_id, content_hash, request): its key if it must be sent, None if answered."""
        self.journal.flush()  # replies recorded this turn are visible to the lookup below
        keys = [h for _, h, _ in rows]
        fresh = [k for k in keys if k not in self.waiting]
        done = self.journal.answered(fresh) if fresh else {}
        hits: dict[str, Cached] = {}
        wanted: dict[str, str] = {}
        if self.cache is not None and self.screen_cache:
            wanted = {
                self._cache_key(r): k
                for k, (_, _, r) in zip(keys, rows, strict=True)
                if k not in self.waiting and k not in done and self.cache.serves(r)
            }
            hits = {wanted[ck]: v for ck, v in self.cache.get_many(list(wanted)).items()}
        missed = {k: ck for ck, k in wanted.items() if k not in hits}
        out: list[str | None] = []
        served: dict[str, Entry] = {}  # cache hits of this batch: identical rows copy the first
        for key, (row_id, content_hash, _) in zip(keys, rows, strict=True):
            if key in self.waiting:
                self.waiting[key].append((row_id, content_hash))
                out.append(None)
            elif key in done:
                self._copy(row_id, content_hash, done[key])
                out.append(None)
            elif key in served:
                self._copy(row_id, content_hash, served[key])
                out.append(None)
            elif key in hits and self.labeling:
                self.first_hits[key] = hits[key]  # read by the row's worker, as its first reply
                self.waiting[key] = []
                self._saved(hits[key])
                out.append(key)
            elif key in hits:
                served[key] = self._cached(row_id, content_hash, key, hits[key])
                out.append(None)
            else:
                self.waiting[key] = []
                if key in missed:
                    self.cache_keys[key] = missed[key]
                out.append(key)
        return out

    def finished(self, key: str, entry: Entry) -> None:
        """A leader's row was recorded: its followers get its reply; the cache keeps it if it
        could ever serve it (a request meant to be repeatable, or any with ``--cache always``)."""
        for row_id, content_hash in self.waiting.pop(key, ()):
            self._copy(row_id, content_hash, entry)
        ck = self.cache_keys.pop(key, None)  # set when screened for this cache
        if (
            ck is not None
            and self.cache is not None
            and entry.status == "ok"
            and entry.response is not None
            and entry.extra is None
        ):
            self.cache.put(
                ck,
                entry.response,
                entry.prompt_tokens or 0,
                entry.completion_tokens or 0,
                bool(entry.truncated),
                cached_tokens=entry.cached_tokens or 0,
            )

    def abandoned(self, key: str) -> None:
        """A leader ended without a reply (the run stopped): its followers stay pending too."""
        self.waiting.pop(key, None)
        self.cache_keys.pop(key, None)

    def _free(self) -> tuple[int | None, int | None]:
        return cost(self.model.prices, 0, 0)

    def _copy(self, row_id: str, content_hash: str, source: Entry) -> None:
        zero_in, zero_out = self._free()
        self.record(
            source._replace(
                row_id=row_id,
                content_hash=content_hash,
                prompt_tokens=0 if source.prompt_tokens is not None else None,
                completion_tokens=0 if source.completion_tokens is not None else None,
                cached_tokens=0 if source.cached_tokens is not None else None,
                cached_saved_pico=0 if source.cached_saved_pico is not None else None,
                input_cost_pico=zero_in if source.prompt_tokens is not None else None,
                output_cost_pico=zero_out if source.prompt_tokens is not None else None,
                attempts=0,
                latency_ms=None,
                finished_at=time.time(),
                answered_by=source.answered_by or source.row_id,
                cached=None,  # answered by that row, not by the cache (counts.py)
            )
        )
        self.copies += 1

    def _saved(self, hit: Cached, more: bool = False) -> None:
        """A reply the cache served: what it cost when it was paid (its prompt tokens the server
        had cached at the cached price; a reply cached before they were kept, at the input price)."""
        would_in, would_out = cost(
            self.model.prices, hit.prompt_tokens, hit.completion_tokens, hit.cached_tokens
        )
        self.saved_pico += (would_in or 0) + (would_out or 0)
        self.hits += 1
        if more:
            self.more_hits[0] += 1
            self.more_hits[1] += hit.completion_tokens
        else:
            self.hit_lengths[hit.completion_tokens] += 1
        self.hit_tokens[0] += hit.prompt_tokens
        self.hit_tokens[1] += hit.completion_tokens

    def remember(self, journal: Journal) -> None:
        """Keep what the cache served in the journal: its replies' lengths (``journal.observed``)
        and, as if sent, their requests, tokens and cost (a pilot projects from them,
        reports/pilot.py). A packed reply's row is served its share of its pack's request."""
        if not self.hits:
            return
        journal.add_cached_lengths(self.hit_lengths, self.more_hits)
        before = journal.get_meta(CACHED_REPLIES) or {}
        now = (self.hits, *self.hit_tokens, self.saved_pico)
        journal.set_meta(
            CACHED_REPLIES, {k: int(before.get(k, 0)) + v for k, v in zip(_TALLY, now, strict=True)}
        )

    def _cache_key(self, request: Request) -> str:
        return cache_key(self.endpoint_id, (f"packed {self.packed}:" if self.packed else "") + request.key())

    def lookup(self, request: Request) -> Cached | None:
        """A labeling re-ask or sample: the cache's reply for it, if its policy serves it."""
        if self.cache is None or self.packed or not self.cache.serves(request):
            return None
        ck = cache_key(self.endpoint_id, request.key())
        hit = self.cache.get_many([ck]).get(ck)
        if hit is not None:
            self._saved(hit, more=True)
        return hit

    def keep(
        self,
        request: Request,
        first: bool,
        row_key: str,
        text: str,
        pt: int,
        ct: int,
        truncated: bool,
        confidence: Any = None,
        cached_tokens: int = 0,
    ) -> None:
        """A labeling request's reply and its confidence, into the cache if its policy could ever
        serve it. A row's first request was screened (``screen``): its cache key is kept when it
        may be served."""
        if self.cache is None:
            return
        if first and self.screen_cache:
            ck = self.cache_keys.pop(row_key, None)
        else:
            ck = self._cache_key(request) if self.cache.serves(request) else None
        if ck is not None:
            self.cache.put(ck, text, pt, ct, truncated, confidence, cached_tokens)

    def _cached(self, row_id: str, content_hash: str, key: str, hit: Cached) -> Entry:
        zero_in, zero_out = self._free()
        self._saved(hit)
        entry = Entry(
            row_id=row_id,
            content_hash=content_hash,
            status="ok",
            response=hit.response,
            prompt_tokens=0,
            completion_tokens=0,
            input_cost_pico=zero_in,
            output_cost_pico=zero_out,
            error=None,
            error_class=None,
            attempts=0,
            latency_ms=None,
            finished_at=time.time(),
            model=self.model.name,
            truncated=hit.truncated,
            tokens_counted=False,
            request_key=key,
            cached=True,
        )
        self.record(entry)
        return entry
