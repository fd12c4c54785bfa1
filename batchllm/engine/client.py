"""The HTTP boundary: one aiohttp session, and the only place where transport failures become
batchllm's exceptions (errors.py). What a response means is the provider's business
(``Provider.parse``); the client posts bodies, hands the provider each response, and passes any
rate-limit hints from the headers to whoever listens (the limiter).

The key lives in the session's default headers only; no message or exception built here
includes headers, so it cannot leak into a row's ``error`` or a log line.

``--timeout`` is kept by one timer for the whole session, not by aiohttp's per request: a timer is
a heap entry made and cancelled per request, about a twentieth of a request's CPU at thousands a
second. Every request has the same timeout, so the requests in flight, in the order they left,
are also in the order they expire: the one timer is set for the oldest's deadline, and when it
fires it cancels what is due (to the loop's turn, as aiohttp's would) and is set for the next.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

import aiohttp
import orjson

from ..errors import APIError, RequestTimeout, RetryableAPIError
from ..providers import Provider
from ..records import SANDBOX_HEADER, Completion, RateHints


class Client:
    """One session, a connector sized to the concurrency, the key in its default headers."""

    def __init__(
        self,
        provider: Provider,
        endpoint: str,
        api_key: str | None,
        *,
        concurrency: int,
        timeout: float,
        on_hints: Callable[[RateHints], None] | None = None,
    ) -> None:
        self.provider = provider
        self.url = provider.url(endpoint)
        self._api_key = api_key
        self._concurrency = concurrency
        self._timeout = timeout
        self._on_hints = on_hints
        self._session: aiohttp.ClientSession | None = None
        self._deadlines: dict[asyncio.Task, float] = {}  # in flight, oldest first
        self._expired: set[asyncio.Task] = set()  # cancelled at their deadline, not by a stop
        self._timer: asyncio.TimerHandle | None = None
        # Did the server answer as batchllm's sandbox does (records.SANDBOX_HEADER)? Read from
        # the first answer only: None until then; ``on_played`` is told then (``watch_played``).
        self.played: bool | None = None
        self._asked = False  # identify: the server was asked already
        self.on_played: Callable[[], None] | None = None

    async def __aenter__(self) -> Client:
        connector = aiohttp.TCPConnector(
            limit=self._concurrency, limit_per_host=0, ttl_dns_cache=300, enable_cleanup_closed=False
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=self.provider.headers(self._api_key),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=None),  # the watchdog's
            skip_auto_headers=("User-Agent",),
            raise_for_status=False,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def complete(self, body: bytes) -> Completion:
        """POST one request body; return its completion or raise an ``APIError``."""
        assert self._session is not None, "use `async with Client(...)`"
        provider = self.provider
        task = asyncio.current_task()
        assert task is not None
        deadlines = self._deadlines
        loop = task.get_loop()
        deadlines[task] = loop.time() + self._timeout
        if self._timer is None:
            self._timer = loop.call_at(deadlines[task], self._expire)
        try:
            async with self._session.post(self.url, data=body) as resp:
                raw = await resp.read()
                if self.played is None:
                    self.played = SANDBOX_HEADER in resp.headers
                    if self.on_played is not None:
                        self.on_played()
                if self._on_hints is not None:
                    hints = provider.rate_hints(resp.headers)
                    if hints is not None:
                        self._on_hints(hints)
                return provider.parse(resp.status, resp.headers, raw)
        except APIError:
            raise
        except asyncio.CancelledError:
            if task in self._expired:
                self._expired.discard(task)
                if task.uncancel() == 0:  # the deadline's alone, not a stop's too
                    raise RequestTimeout(f"no response within {self._timeout:g} s (timeout)") from None
            raise
        except TimeoutError:
            raise RequestTimeout(f"no response within {self._timeout:g} s (timeout)") from None
        except aiohttp.ClientResponseError as exc:
            raise RetryableAPIError(f"bad HTTP response: {exc.message}", exc.status) from None
        except aiohttp.ClientConnectorError as exc:
            raise RetryableAPIError(cannot_connect(exc), unsent=True) from None
        except (aiohttp.ClientError, OSError) as exc:
            detail = str(exc) or type(exc).__name__
            raise RetryableAPIError(f"connection failed: {detail}") from None
        finally:
            deadlines.pop(task, None)

    def _expire(self) -> None:
        """Cancel the requests past their deadline (each then raises RequestTimeout), and set
        the timer for the next one's."""
        self._timer = None
        deadlines, expired = self._deadlines, self._expired
        if not deadlines:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        while deadlines:
            task = next(iter(deadlines))
            when = deadlines[task]
            if when > now:
                self._timer = loop.call_at(when, self._expire)
                return
            del deadlines[task]
            expired.add(task)
            task.cancel()

    @property
    def local(self) -> bool:
        """Is the server on this machine or its network (where a served sandbox may be)?"""
        return _local(urlsplit(self.url).hostname or "")

    async def identify(self, timeout: float = 2.0) -> None:
        """Ask a server on this machine or its network whether it is batchllm's sandbox before
        an answer says so: every request may time out, or the run be killed first, and its money
        would count as real. One HEAD of the server's root, which no server bills. A public host
        is never asked: a paid API is not the sandbox."""
        assert self._session is not None, "use `async with Client(...)`"
        parts = urlsplit(self.url)
        if self.played is not None or self._asked or not self.local:
            return
        self._asked = True  # once: a server that does not answer is not asked again (is_sandbox)
        try:
            root = f"{parts.scheme}://{parts.netloc}/"
            async with self._session.head(root, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                if self.played is None:
                    self.played = SANDBOX_HEADER in resp.headers
                    if self.on_played is not None:
                        self.on_played()
        except (aiohttp.ClientError, OSError, TimeoutError):
            return

    async def is_sandbox(self) -> bool:
        """Is the server batchllm's sandbox? Asked now when it is on this machine or its network
        (``identify``): its replies are play money, cached apart from a real server's at the same
        address (a sandbox served on a port a real server takes later)."""
        await self.identify()
        return bool(self.played)

    async def server_slots(self, url: str, timeout: float = 2.0) -> int | None:
        """The slots a server states at ``url`` (llama.cpp's ``/props``: ``total_slots``), or None
        when it states none, in whatever way: a hint, never a reason to fail."""
        assert self._session is not None, "use `async with Client(...)`"
        try:
            async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                if resp.status != 200:
                    return None
                slots = orjson.loads(await resp.read()).get("total_slots")
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError, AttributeError):
            return None
        return slots if isinstance(slots, int) and not isinstance(slots, bool) and slots > 0 else None


def all_played(clients: Sequence[Client]) -> bool:
    """Have the servers that answered (one at least) all answered as batchllm's sandbox?"""
    answered = [c.played for c in clients if c.played is not None]
    return bool(answered) and all(answered)


def watch_played(clients: Sequence[Client], mark: Callable[[bool], None]) -> list[asyncio.Task[None]]:
    """Tell ``mark`` whether the run is play money (``all_played``) each time one of its servers
    answers for the first time: once per server, never per request. A run killed before its
    end is then marked already (the ledger: a served sandbox's run counts in no monthly cap).
    Returns the servers' ``identify`` tasks, which ``stop_asking`` ends."""

    def played() -> None:
        mark(all_played(clients))

    for client in clients:
        client.on_played = played
    if any(c.played is not None for c in clients):  # asked already (reopen.py)
        played()
    return [asyncio.create_task(c.identify()) for c in clients]


async def stop_asking(asking: list[asyncio.Task[None]]) -> None:
    """End ``identify`` tasks still out, after half a second: a run that sent nothing (every row
    refused before sending) ends before its server's answer to them."""
    if not all(t.done() for t in asking):
        await asyncio.wait(asking, timeout=0.5)
    for t in asking:
        t.cancel()


def _local(host: str) -> bool:
    """A loopback or private-network host (where a served sandbox may be), by name or address."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_private


def cannot_connect(exc: aiohttp.ClientConnectorError) -> str:
    """A connection that could not be made, in words: host:port and the OS's reason (aiohttp's
    own text, "Cannot connect to host ... ssl:default [Connect call failed ...]", says neither
    plainly)."""
    err = exc.os_error
    if isinstance(err, socket.gaierror):  # its errno is the resolver's, which strerror reads wrong
        return f"cannot connect to {exc.host}:{exc.port}: the name does not resolve ({err.strerror})"
    reason = os.strerror(err.errno) if err.errno else str(err) or type(err).__name__
    return f"cannot connect to {exc.host}:{exc.port}: {reason[:1].lower()}{reason[1:]}"
