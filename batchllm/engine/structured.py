"""A run's structured output, given up once the server refuses it (``--structured auto``).

A structured labeling job's requests carry a ``response_format`` (labeling/structured.py). A
server that does not take it answers 400 (or a FastAPI server's 422) naming the field, for every request alike; so the first
such answer turns it off for the rest of the run, with one warning, and the request goes again at
once without it. A 400 is not billed: the request sent again is the same request as far as what
may have been billed goes (engine/inflight.py), and nothing is counted twice. Every request that
leaves afterwards leaves without the field; the rows read their replies as they always do.
"""

from __future__ import annotations

from collections.abc import Callable

import orjson

from ..errors import FatalAPIError
from ..labeling.structured import PARAM

_FIELD = PARAM.encode()


class Structured:
    """On until a server refuses ``response_format``; ``plain`` is a body without it."""

    __slots__ = ("on", "_warn", "_who")

    def __init__(self, warn: Callable[[str], None], who: str = "") -> None:
        self.on = True
        self._warn = warn
        self._who = who  # a fleet's endpoint (engine/router.py): off for it alone

    def refused(self, error: FatalAPIError, body: bytes) -> bytes | None:
        """The body to send again when ``error`` is the server refusing the body's
        ``response_format`` (the first refusal turns it off and says so); else None."""
        if error.status not in (400, 422) or PARAM not in error.message or _FIELD not in body:
            return None
        if self.on:
            self.on = False
            who = f"fleet endpoint {self._who!r}" if self._who else "the server"
            scope = f"to {self._who!r} " if self._who else ""
            self._warn(
                f"{who} refuses {PARAM} (HTTP {error.status}: {error.message}): structured output is off for the "
                f"rest of this run, and requests {scope}go without it (as with --structured off; "
                "replies are read, checked and re-asked as ever)"
            )
        return self.plain(body)

    @staticmethod
    def plain(body: bytes) -> bytes:
        """An openai provider's body without its ``response_format`` (every other byte as the
        provider encodes it: orjson keeps the fields' order)."""
        if _FIELD not in body:
            return body
        payload = orjson.loads(body)
        payload.pop(PARAM, None)
        return orjson.dumps(payload)
