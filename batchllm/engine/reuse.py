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
from collections.abc import Callable, Sequence

from ..pricing import Model, cost
from ..records import Entry, Request
from .cache import Cached, ResponseCache, cache_key
from .journal import Journal

Record = Callable[[Entry], None]


class Reuse:
    def __init__(
        self, journal: Journal, cache: ResponseCache | None, endpoint_id: str, model: Model, record: Record
    ) -> None:
        self.journal = journal
        self.cache = cache
        self.endpoint_id = endpoint_id
        self.model = model
        self.record = record
        self.waiting: dict[str, list[tuple[str, str]]] = {}  # key of a leader in flight -> followers
        self.cache_keys: dict[str, str] = {}  # key of a leader in flight -> its cache key
        self.copies = 0  # rows answered by another row's reply
        self.hits = 0  # rows answered from the cache
        self.saved_pico = 0  # what the cache hits would have cost

    def screen(self, rows: Sequence[tuple[str, str, Request]]) -> list[str | None]:
        """Per row (row_id, content_hash, request): its key if it must be sent, None if answered."""
        self.journal.flush()  # replies recorded this turn are visible to the lookup below
        keys = [h for _, h, _ in rows]
        fresh = [k for k in keys if k not in self.waiting]
        done = self.journal.answered(fresh) if fresh else {}
        hits: dict[str, Cached] = {}
        if self.cache is not None:
            wanted = {
                cache_key(self.endpoint_id, r.key()): k
                for k, (_, _, r) in zip(keys, rows, strict=True)
                if k not in self.waiting and k not in done and self.cache.serves(r)
            }
            hits = {wanted[ck]: v for ck, v in self.cache.get_many(list(wanted)).items()}
        missed = {k: ck for ck, k in wanted.items() if k not in hits} if self.cache is not None else {}
        out: list[str | None] = []
        for key, (row_id, content_hash, _) in zip(keys, rows, strict=True):
            if key in self.waiting:
                self.waiting[key].append((row_id, content_hash))
                out.append(None)
            elif key in done:
                self._copy(row_id, content_hash, done[key])
                out.append(None)
            elif key in hits:
                self._cached(row_id, content_hash, key, hits[key])
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
                input_cost_pico=zero_in if source.prompt_tokens is not None else None,
                output_cost_pico=zero_out if source.prompt_tokens is not None else None,
                attempts=0,
                latency_ms=None,
                finished_at=time.time(),
                answered_by=source.answered_by or source.row_id,
            )
        )
        self.copies += 1

    def _cached(self, row_id: str, content_hash: str, key: str, hit: Cached) -> None:
        zero_in, zero_out = self._free()
        would_in, would_out = cost(self.model.prices, hit.prompt_tokens, hit.completion_tokens)
        self.saved_pico += (would_in or 0) + (would_out or 0)
        self.hits += 1
        self.record(
            Entry(
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
        )
