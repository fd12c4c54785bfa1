"""Earning the prompt cache: one request per shared prefix first, the rest once it is answered.

A server serves a prompt's prefix from its cache only once a request with that prefix has been
answered (OpenAI: prompts of 1,024 tokens and more). A pool opens with ``--concurrency`` requests
at once, all sent before any answer, so none of them could hit the cache: at 64 workers a job of
300 rows sharing one long instruction paid the full input price on a fifth of its rows. The
warm-up lets the first row of a prefix go alone and holds the others back until it is answered:
one request's latency per distinct prefix, once a run, and nothing per row but a dict lookup.

Rows are named by their request's ``cache_key`` (prompts.py ``prompt_cache_key``): None (a
prefix too short to be cached, or a provider that reports no cached tokens) never waits. A
warm-up that fails or a run that stops releases the rows held back as well: the cache is a
saving, never a reason to hold a row.
"""

from __future__ import annotations

import asyncio

from .plan import Pack, WorkItem


def prefix_of(item: WorkItem | Pack) -> str | None:
    """The prompt-cache name of what a work item sends first (a pack: its rows' prefix)."""
    request = item.items[0].request if isinstance(item, Pack) else item.request
    return request.cache_key


class Warmup:
    def __init__(self) -> None:
        self._answered: dict[str, asyncio.Event] = {}  # prefix -> set once its first row is done
        self._first: dict[str, str] = {}  # prefix -> the row warming it up
        self.warmups = 0  # prefixes warmed up this run

    async def enter(self, item: WorkItem | Pack, stopped: asyncio.Event) -> None:
        """Return when the item may be sent: at once for the first of its prefix (or one without),
        else once that first one is done or the run stops."""
        key = prefix_of(item)
        if key is None:
            return
        answered = self._answered.get(key)
        if answered is None:
            self._answered[key] = asyncio.Event()
            self._first[key] = item.row_id
            self.warmups += 1
            return
        if answered.is_set() or stopped.is_set():
            return
        waits = {asyncio.ensure_future(answered.wait()), asyncio.ensure_future(stopped.wait())}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    def done(self, item: WorkItem | Pack) -> None:
        """The item is done (answered, failed or given up): if it warmed its prefix, open it."""
        key = prefix_of(item)
        if key is not None and self._first.get(key) == item.row_id:
            del self._first[key]
            self._answered[key].set()
