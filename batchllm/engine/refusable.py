"""Optional request fields a run gives up once the server refuses them.

A labeling job's requests may carry fields a server need not take: ``response_format``
(``--structured auto``, labeling/structured.py) and ``logprobs`` (``--confidence auto``,
labeling/confidence.py). A server that does not take one answers 400 (or a FastAPI server's 422)
naming it, for every request alike; so the first such answer turns that field off for the rest of
the run, with one warning, and the request goes again at once without it. A 400 is not billed:
the request sent again is the same request as far as what may have been billed goes
(engine/inflight.py), and nothing is counted twice. Every request that leaves afterwards leaves
without the field; the rows read their replies as they always do.

A field the job insists on (``--structured on``: the user asked for constrained output;
``--confidence logprobs``: the user asked for a confidence from them, not auto's best effort) is
never given up: its refusal stops the run (``insisted``: a ``RunStopError``, exit 4) with the rows
not yet answered pending, or takes a fleet's endpoint out for the run (router.py).
"""

from __future__ import annotations

from collections.abc import Callable

import orjson

from ..errors import FatalAPIError, RunStopError
from ..labeling.confidence import LOGPROBS, TOP_LOGPROBS
from ..labeling.structured import PARAM
from ..providers import Provider

# What the run goes on without, said once when the server refuses the field.
WITHOUT = {
    PARAM: "structured output is off for the rest of this run, and requests go without it (as with "
    "--structured off; replies are read, checked and re-asked as ever)",
    LOGPROBS: "confidence from logprobs is off for the rest of this run, and requests go without them "
    "(as with --confidence off; with --samples, a row's confidence is its label's share of the votes, "
    "and --vote-below, which needs a first answer's confidence, asks every row's samples)",
}

# The stop's reason (errors.RunStopError) when a field the job insists on is refused.
STOP_REASON = {PARAM: "structured", LOGPROBS: "confidence"}


class Refusable:
    """The optional fields a run's requests carry, each on until a server refuses it."""

    __slots__ = ("fields", "required", "refused_fields", "_keys", "_warn", "_who")

    def __init__(
        self,
        fields: tuple[str, ...],
        warn: Callable[[str], None],
        who: str = "",
        required: tuple[str, ...] = (),
    ) -> None:
        self.fields = fields
        self.required = tuple(f for f in required if f in fields)  # never given up (``insisted``)
        self.refused_fields: tuple[str, ...] = ()
        self._keys = {f: f'"{f}":'.encode() for f in fields}  # as orjson writes the body's keys
        self._warn = warn
        self._who = who  # a fleet's endpoint (member.py): the field is off for it alone

    @property
    def on(self) -> bool:
        """Is every field still sent (no refusal yet: bodies go as encoded)?"""
        return not self.refused_fields

    def insisted(self, error: FatalAPIError) -> FatalAPIError:
        """``error``, or a stop when it is the server refusing a field the job insists on."""
        if error.status in (400, 422):
            for name in self.required:
                if name in error.message:
                    return RunStopError(error.message, error.status, error.code, reason=STOP_REASON[name])
        return error

    def refused(self, error: FatalAPIError, body: bytes) -> bytes | None:
        """The body to send again when ``error`` is the server refusing one of the body's optional
        fields (the first refusal of each turns it off and says so); else None."""
        if error.status not in (400, 422):
            return None
        for name in self.fields:
            if name in error.message and self._keys[name] in body:
                if name not in self.refused_fields:
                    self.refused_fields = (*self.refused_fields, name)
                    who = f"fleet endpoint {self._who!r}" if self._who else "the server"
                    without = WITHOUT[name]
                    if self._who:
                        without = without.replace(
                            "requests go without", f"requests to {self._who!r} go without"
                        )
                    self._warn(f"{who} refuses {name} (HTTP {error.status}: {error.message}): {without}")
                return self.plain(body)
        return None

    def plain(self, body: bytes) -> bytes:
        """An openai provider's body without the refused fields (every other byte as the provider
        encodes it: orjson keeps the fields' order)."""
        if not any(self._keys[name] in body for name in self.refused_fields):
            return body
        payload = orjson.loads(body)
        for name in dropped(self.refused_fields):
            payload.pop(name, None)
        return orjson.dumps(payload)


def dropped(fields: tuple[str, ...]) -> tuple[str, ...]:
    """The body's fields that go with ``fields``: ``top_logprobs`` with either (it is asked only
    of requests held to a schema, and a server takes it only with ``logprobs``)."""
    if TOP_LOGPROBS not in fields and (PARAM in fields or LOGPROBS in fields):
        return (*fields, TOP_LOGPROBS)
    return fields


def optional_fields(structured: bool, logprobs: bool) -> tuple[str, ...]:
    """A run's optional fields: ``response_format`` when structured, ``logprobs`` when asked."""
    return tuple(name for name, on in ((PARAM, structured), (LOGPROBS, logprobs)) if on)


def taken_by(provider: Provider, fields: tuple[str, ...]) -> tuple[str, ...]:
    """Those of ``fields`` the provider takes (a fleet's dataoorts endpoint takes neither)."""
    takes = {PARAM: provider.takes_response_format, LOGPROBS: provider.returns_logprobs}
    return tuple(f for f in fields if takes[f])


def insisted_fields(structured: str, logprobs: bool = False) -> tuple[str, ...]:
    """The fields a job insists on: ``response_format`` under ``--structured on``, ``logprobs``
    under ``--confidence logprobs`` (``logprobs``: asked in so many words, not auto's choice)."""
    return optional_fields(structured == "on", logprobs)


def refusable(
    structured: bool, logprobs: bool, warn: Callable[[str], None], required: tuple[str, ...] = ()
) -> Refusable | None:
    """The run's optional fields, each on until the server refuses it (None: there are none);
    ``required``, those never given up."""
    fields = optional_fields(structured, logprobs)
    return Refusable(fields, warn, required=required) if fields else None
