"""Several rows in one request (``--pack N``): the packed request's shape, reading its reply back
into one answer per row, and splitting what it cost over the rows. Pure functions; no I/O.

The shape is fixed, so any chat model and any test server can follow it (Cheng et al. 2023,
"Batch Prompting"; Lin et al. 2023, "BatchPrompt"):

    system     the job's system prompt and label or schema instruction, then PACK_INSTRUCTION
    examples   one user turn of numbered examples, one assistant turn with their JSON object
    user       the rows' prompts in order, each on its own line after its number: [1] ..., [2] ...
    reply      {"1": <answer of row 1>, "2": ..., ...}

A re-ask of the rows whose items were missing or invalid repeats their numbered prompts (numbered
anew), shows the answers they got, and says what was wrong with each (``reask_turns``).

Each row's item is kept as text (a label as given, anything else as JSON; "" when the reply left
it out) and read by labeling/parse.py exactly like a whole reply: the same free repair, the same
checks. A reply with no readable object, or cut off, is never completed by guessing: its rows
are sent again in smaller packs (engine/packed.py).
"""

from __future__ import annotations

import hashlib
import re

import orjson

from ..records import Message
from .parse import clean, find_object, parse
from .spec import Labeling

PACK_MARK = "You are given several numbered items"
_KEY = re.compile(r"^\s*\[?\s*(\d+)\s*\]?\s*$")


def instruction(labeling: Labeling) -> str:
    """Appended to the system prompt of a packed request (after the labeling instruction)."""
    each = "one JSON object matching the schema" if labeling.is_schema else "exactly one label from the list"
    return (
        f"{PACK_MARK}, each on its own line after its number in square brackets. Answer each item "
        "on its own, as instructed above. Reply with one JSON object only: keys are the item "
        f"numbers as strings, values the items' answers ({each})."
    )


def system(full_system: str | None, labeling: Labeling) -> str:
    return f"{full_system}\n\n{instruction(labeling)}" if full_system else instruction(labeling)


def numbered(texts: list[str]) -> str:
    """The rows' prompts in one user turn: ``[1] first``, ``[2] second``, ... one per line."""
    return "\n".join(f"[{n}] {text}" for n, text in enumerate(texts, 1))


def item_line(n: int, text: str) -> str:
    """One row's part of the user turn (its own tokens, counted for the cost split)."""
    return f"[{n}] {text}\n"


def examples(turns: tuple[Message, ...], labeling: Labeling) -> tuple[Message, ...]:
    """``--examples`` (user/assistant pairs, prompts.load_examples) in the packed shape."""
    if not turns:
        return ()
    users = [m.content for m in turns[0::2]]
    answers = [m.content for m in turns[1::2]]
    obj = {str(n): orjson.loads(a) if labeling.is_schema else a for n, a in enumerate(answers, 1)}
    return (Message("user", numbered(users)), Message("assistant", orjson.dumps(obj).decode()))


def read_reply(text: str, rows: int) -> tuple[list[str] | None, str | None]:
    """A packed reply -> each row's item as text ("" if left out), or (None, why) when no object
    can be read from it. Keys are repaired (``"[2]"``, ``" 2 "``); the object may sit in prose
    or a code fence; a cut-off object is not completed."""
    obj, error = find_object(text)
    if obj is None:
        return None, error
    items = [""] * rows
    for key, value in obj.items():
        m = _KEY.match(key)
        if m is None or not 1 <= (n := int(m.group(1))) <= rows or value is None:
            continue
        items[n - 1] = value if isinstance(value, str) else orjson.dumps(value).decode()
    return items, None


def _even(total: int, n: int) -> list[int]:
    """``total`` in ``n`` parts as even as integers allow, the remainder to the first parts."""
    base, extra = divmod(total, n)
    return [base + (1 if i < extra else 0) for i in range(n)]


def _by_weight(total: int, weights: list[int]) -> list[int]:
    """``total`` split in proportion to ``weights`` (floors, the remainder to the first parts)."""
    whole = sum(weights)
    if whole <= 0:
        return _even(total, len(weights))
    parts = [total * w // whole for w in weights]
    for i in range(total - sum(parts)):
        parts[i] += 1
    return parts


def prompt_shares(prompt_tokens: int, own: list[int]) -> list[int]:
    """A pack's billed prompt tokens over its rows: each row's own text (``own``, counted) to it,
    the shared rest (system prompt, instruction, examples, earlier turns) evenly, the remainder
    to the first rows. Sums to ``prompt_tokens`` exactly."""
    shared = prompt_tokens - sum(own)
    if shared < 0:  # the server counted fewer than we did: in proportion, still exact
        return _by_weight(prompt_tokens, own)
    return [o + s for o, s in zip(own, _even(shared, len(own)), strict=True)]


def cached_shares(cached_tokens: int, prompt: list[int]) -> list[int]:
    """A pack's cached prompt tokens (its shared prefix, served from the server's prompt cache)
    over its rows, evenly as the shared part is, never more than a row's prompt share."""
    return [min(c, p) for c, p in zip(_even(cached_tokens, len(prompt)), prompt, strict=True)]


def completion_shares(completion_tokens: int, items: list[str]) -> list[int]:
    """A pack's billed completion tokens over its rows, by each row's share of the answer (its
    item's length); sums to ``completion_tokens`` exactly."""
    return _by_weight(completion_tokens, [len(x) for x in items])


def pack_id(body: bytes) -> str:
    """Names a packed request (the same request, the same id, in any run)."""
    return hashlib.blake2b(body, digest_size=8).hexdigest()


def _what(labeling: Labeling, item: str, error: str) -> str:
    kind, _, detail = error.partition(":")
    if kind == "missing":
        return "was left out"
    if kind == "truncated":
        return "was cut off"
    if labeling.is_schema:
        if kind == "schema":
            return f"had field {detail!r} missing or with a wrong type or value"
        return "was not one complete JSON object"
    return f"{detail or clean(item)[:40]!r} is not one of the allowed labels"


def reask_turns(labeling: Labeling, texts: list[str], answers: list[str]) -> tuple[Message, ...]:
    """The turns of a re-ask of these rows (numbered anew): their prompts, the answers they got
    (left-out ones absent), and what was wrong with each. Starts with "Your answer", like a
    one-row re-ask (labeling/parse.py ``feedback``)."""
    got: dict[str, object] = {}
    wrong = []
    for n, item in enumerate(answers, 1):
        _, error = parse(labeling, item, False) if item else (None, "missing")
        if item:
            try:
                got[str(n)] = orjson.loads(item) if labeling.is_schema else item
            except orjson.JSONDecodeError:
                got[str(n)] = item
        wrong.append(f"[{n}] {_what(labeling, item, error or 'invalid_json')}")
    allowed = (
        "each value one JSON object matching the schema"
        if labeling.is_schema
        else f"each value exactly one of: {', '.join(labeling.labels)}"
    )
    feedback = (
        "Your answer could not be used for these items: " + "; ".join(wrong) + ". Answer again for "
        f"every item with one JSON object whose keys are the item numbers, {allowed}."
    )
    return (
        Message("user", numbered(texts)),
        Message("assistant", orjson.dumps(got).decode()),
        Message("user", feedback),
    )
