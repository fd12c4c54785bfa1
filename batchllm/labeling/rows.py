"""One row's labeling, as a pure state machine over its journaled attempts.

    attempts so far -> next() -> a Request to send (first answer, re-ask, or sample),
                               or, when none is left, the row's outcome: its label (or object),
                               agreement and error

Because the next step is a function of the attempts alone, a row interrupted by a crash resumes
exactly where it was: every attempt is journaled as it comes back, so none is paid for twice.
Sample k asks with its own seed; each sample is re-asked (the model's answer and why it was
rejected, then the question again) until it parses or ``reask`` re-asks are spent; ``adaptive``
stops sampling once the remaining samples cannot change the majority, and ``vote_below`` asks the
other samples only when the first answer's confidence (labeling/confidence.py) is below it. The
outcome's confidence is the kept answer's, or the vote's.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import orjson

from ..records import Message, Request
from .confidence import lowest, measured, of_votes, stored
from .pack import read_reply
from .parse import feedback, parse
from .spec import Labeling
from .votes import majority, settled


class Attempt(NamedTuple):
    """One request of a row and its reply, as the journal keeps it."""

    sample: int
    kind: str  # "first", "reask" or "sample"
    text: str
    prompt_tokens: int
    completion_tokens: int
    input_cost_pico: int | None
    output_cost_pico: int | None
    truncated: bool
    # A packed request's (labeling/pack.py): which pack answered, and this row's number in it.
    # Then ``text`` is the row's item of the reply ("" when the reply left it out); position 0:
    # a one-row pack whose reply could not be read, kept whole.
    pack_id: str | None = None
    pack_position: int | None = None
    endpoint: str | None = None  # a fleet's endpoint that answered (engine/router.py)
    # Of prompt_tokens, served from the server's prompt cache.
    cached_tokens: int = 0
    served_model: str | None = None  # the model the reply named (records.Completion)
    # The probability the model gave its answer (labeling/confidence.py: a label's, or a schema's
    # fields'), from the reply's logprobs; read back from the journal, a label's is ``[label, p]``
    # (``RowLabeler.confidence`` reads either).
    confidence: Any = None


# A packed reply that could not be read as a whole (not JSON, or cut off): the row's share of
# its cost, and the row is sent again in a smaller pack; not an answer, so not in any chain.
SPLIT = "split"


class Step(NamedTuple):
    request: Request
    sample: int
    kind: str


class Outcome(NamedTuple):
    status: str  # "ok" or "invalid"
    value: Any  # the label, or the object's fields
    error: str | None
    text: str  # the reply the value was read from (or the last one)
    reasks: int
    agreement: float | None
    votes: dict[str, int] | None
    confidence: Any = None  # of the answer kept, or of the vote (labeling/confidence.py)


class RowLabeler:
    def __init__(self, labeling: Labeling, base: Request, extra_reasks: int = 0) -> None:
        self.labeling = labeling
        self.base = base
        # A later run re-asking invalid rows (--retry-errors) gets a fresh allowance.
        self.extra_reasks = extra_reasks
        # Each reply is read once (a JSON schema's validation is most of a row's labeling cost),
        # however often deciding the next request and the outcome ask about it.
        self._read_cache: dict[int, tuple[Attempt, tuple[Any, str | None]]] = {}

    def _chains(self, attempts: list[Attempt]) -> list[list[Attempt]]:
        """Each sample's requests, in order."""
        chains: list[list[Attempt]] = [[] for _ in range(self.labeling.samples)]
        for a in attempts:
            if a.sample < len(chains) and a.kind != SPLIT:
                chains[a.sample].append(a)
        return chains

    def _read(self, a: Attempt) -> tuple[Any, str | None]:
        hit = self._read_cache.get(id(a))
        if hit is not None and hit[0] is a:
            return hit[1]
        if a.pack_position == 0:  # a packed reply unreadable as a whole (labeling/pack.py)
            why = read_reply(a.text, 1)[1]
            result: tuple[Any, str | None] = (None, "truncated" if a.truncated else why or "invalid_json")
        elif not a.text and a.pack_position is not None:
            result = (None, "missing")
        else:
            result = parse(self.labeling, a.text, a.truncated)
        self._read_cache[id(a)] = (a, result)  # the attempt is kept: its id stays its own
        return result

    def _done(self, chain: list[Attempt]) -> bool:
        if not chain:
            return False
        error = self._read(chain[-1])[1]
        # An object cut at max_tokens is not re-asked: at the same limit it would be cut again
        # (a label cut short is: the model said more than the label). --retry-errors asks again.
        if error is None or (error == "truncated" and self.labeling.is_schema and not self.extra_reasks):
            return True
        return len(chain) - 1 >= self.labeling.reask + self.extra_reasks

    def _values(self, chains: list[list[Attempt]]) -> list[str]:
        return [v for c in chains if c and (v := self._vote(c[-1])) is not None]

    def next(self, attempts: list[Attempt]) -> Step | Outcome:
        """The next request to send, or the row's outcome once no request is left."""
        if self.labeling.samples == 1 and len(attempts) <= 1:
            # Most rows: one sample, asked once, and its answer reads (what the general path
            # below decides too, without building the chains; this runs at thousands of rows/s).
            if not attempts:
                return Step(self.base, 0, "first")
            first = attempts[0]
            if first.sample == 0 and first.kind != SPLIT:
                value, error = self._read(first)
                if error is None:
                    sure = first.confidence
                    if type(sure) is list:
                        sure = measured(value, sure)
                    return Outcome("ok", value, None, first.text, 0, None, None, sure)
        chains = self._chains(attempts)
        step = self._step(chains)
        return step if step is not None else self._outcome(chains, attempts)

    def confidence(self, a: Attempt) -> Any:
        """An answer's confidence, whether computed from its reply or read back from the journal."""
        sure = a.confidence
        return measured(self._read(a)[0], sure) if type(sure) is list else sure

    def journaled(self, a: Attempt) -> str | None:
        """An answer's confidence as the journal keeps it (labeling/confidence.py ``stored``)."""
        sure = a.confidence
        if sure is None:
            return None
        return orjson.dumps(sure).decode() if type(sure) is list else stored(self._read(a)[0], sure)

    def outcome(self, attempts: list[Attempt]) -> Outcome:
        """The row's outcome from the replies it has (``--reparse`` reads stored ones again)."""
        return self._outcome(self._chains(attempts), attempts)

    def _step(self, chains: list[list[Attempt]]) -> Step | None:
        for k, chain in enumerate(chains):
            if not chain:
                if k == 0:
                    return Step(self._sample_request(0), 0, "first")
                if self.labeling.adaptive and settled(self._values(chains[:k]), self.labeling.samples):
                    return None
                if k == 1 and self._sure(chains[0]):
                    return None  # --vote-below: the first answer is sure enough, no vote
                return Step(self._sample_request(k), k, "sample")
            if not self._done(chain):
                return Step(self._reask_request(k, chain), k, "reask")
        return None

    def _sure(self, chain: list[Attempt]) -> bool:
        """``--vote-below P``: is the first sample's answer valid, with a confidence of P or more?
        (One read back from the journal has none: its row had gone on to vote.)"""
        below = self.labeling.vote_below
        if below is None or self._vote(chain[-1]) is None:
            return False
        sure = lowest(self.confidence(chain[-1]))
        return sure is not None and sure >= below

    def _sample_request(self, k: int) -> Request:
        if self.labeling.samples == 1:
            return self.base
        params = dict(self.base.params)
        params["seed"] = int(params.get("seed") or 1) + k  # distinct seeds, one per sample
        return Request(self.base.provider, self.base.model, self.base.messages, params, self.base.cache_key)

    def _reask_request(self, k: int, chain: list[Attempt]) -> Request:
        first = self._sample_request(k)
        turns = list(first.messages)
        for a in chain:
            _, error = self._read(a)
            turns.append(Message("assistant", a.text))
            turns.append(Message("user", feedback(self.labeling, error or "invalid_json")))
        return Request(first.provider, first.model, tuple(turns), first.params, first.cache_key)

    def _outcome(self, chains: list[list[Attempt]], attempts: list[Attempt]) -> Outcome:
        reasks = [a.kind for a in attempts].count("reask")
        if self.labeling.samples == 1:
            answer = chains[0][-1]
            value, error = self._read(answer)
            return Outcome(
                "ok" if error is None else "invalid",
                value,
                error,
                answer.text,
                reasks,
                None,
                None,
                self.confidence(answer) if error is None else None,
            )
        chains = [c for c in chains if c]
        last = attempts[-1].text if attempts else ""
        values = self._values(chains)
        top, agreement, votes = majority(values)
        if top is None:
            errors = [self._read(c[-1])[1] for c in chains]
            error = "no_majority" if values else next((e for e in errors if e), "no_majority")
            return Outcome("invalid", None, error, last, reasks, agreement if values else None, votes)
        voted = next(c[-1].text for c in chains if self._vote(c[-1]) == top)
        winner = top if not self.labeling.is_schema else orjson.loads(top)
        confidence = None
        if self.labeling.confidence != "off":
            answers = [
                (self._read(c[-1])[0], self.confidence(c[-1]))
                for c in chains
                if self._vote(c[-1]) is not None
            ]
            confidence = of_votes(self.labeling, answers, winner, self.labeling.confidence == "logprobs")
        return Outcome("ok", winner, None, voted, reasks, agreement, votes, confidence)

    def _vote(self, a: Attempt) -> str | None:
        value, error = self._read(a)
        if error is not None:
            return None
        return value if isinstance(value, str) else orjson.dumps(value).decode()
