"""The sandbox answering packed labeling requests (``--pack``, labeling/pack.py).

Like a model that follows the format most of the time: per item it may leave the item out
(``pack_missing``) or wrap its answer in prose (``pack_prose``); per reply it may wrap the object
in a code fence or prose (``pack_fenced``) or break it off mid-object (``pack_broken``). Its
accuracy falls as packs grow and items sit further in: an item is answered wrong with the
unpacked rate (``label_wrong``) plus ``pack_decay`` per other row in the pack plus half that per
position after the first. A re-ask gets every item, well formed. Everything is a function of
(text, seed, size, position), so the same request always gets the same reply. Held to a
``response_format`` schema (schema.py), it leaves no item out and wraps nothing: only the wrong
answers remain.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from ..labeling.pack import PACK_MARK
from .labeler import (
    REASK_PREFIX,
    _fraction,
    _instruction,
    _object,
    expected_label,
    field_marks,
    label_mark,
    truth,
)
from .logprobs import Mark
from .schema import conform, schema_of

_ITEM = re.compile(r"(?m)^\[(\d+)\] ")


def is_packed(system: str) -> bool:
    return PACK_MARK in system


def items(user: str) -> list[str]:
    """The numbered items of a packed user turn, in order."""
    parts = _ITEM.split(user)
    return [parts[i + 1].removesuffix("\n") for i in range(1, len(parts) - 1, 2)]


def reply(
    messages: list[dict[str, Any]],
    params: dict[str, Any],
    rates: list[tuple[str, float]],
    knobs: dict[str, float],
) -> tuple[str, dict[str, int], list[Mark]] | None:
    """(reply, counts, where its answers stand: logprobs.py) for a packed labeling request; None
    for any other request."""
    system = next((m["content"] for m in messages if m.get("role") == "system"), "")
    if not is_packed(system):
        return None
    labels, schema = _instruction(system)
    if labels is None and schema is None:
        return None
    users = [m["content"] for m in messages if m.get("role") == "user"]
    held = schema_of(params.get("response_format"))
    if held is not None:  # held to a schema: every item there, in shape, in one bare object
        knobs = {**knobs, "pack_missing": 0.0, "pack_prose": 0.0, "pack_fenced": 0.0, "pack_broken": 0.0}
    text, counts, marks = answer(users, labels, schema, params.get("seed"), rates, knobs)
    if held is not None:
        text = orjson.dumps(conform(held, orjson.loads(text), users[-1:])).decode()
    return text, counts, marks


def answer(
    users: list[str],
    labels: list[str] | None,
    schema: dict[str, Any] | None,
    seed: Any,
    rates: list[tuple[str, float]],
    knobs: dict[str, float],
) -> tuple[str, dict[str, int], list[Mark]]:
    """(reply, counts of what happened, where each item's answer stands) for a packed request."""
    reask = bool(users) and users[-1].startswith(REASK_PREFIX)
    texts = items(users[-2] if reask and len(users) >= 2 else users[-1] if users else "")
    size = len(texts)
    counts = {"pack_reasks" if reask else "packs": 1, "pack_items": size}
    obj: dict[str, Any] = {}
    marks: list[Mark] = []
    wrong_base = dict(rates).get("wrong", 0.0)
    for pos, text in enumerate(texts, 1):
        if not reask and _fraction("pack-missing", text, seed, size, pos) < knobs["pack_missing"]:
            counts["pack_items_missing"] = counts.get("pack_items_missing", 0) + 1
            continue
        p_wrong = wrong_base + knobs["pack_decay"] * ((size - 1) + (pos - 1) / 2)
        wrong = not reask and _fraction("pack-wrong", text, seed, size, pos) < p_wrong
        if labels is not None:
            value: Any = (
                expected_label(text, labels, seed, rates)
                if reask
                else _wrong(text, labels, seed)
                if wrong
                else truth(text, labels)
            )
            marks.append(label_mark(text, seed, labels, value, (str(pos),)))
            if not reask and _fraction("pack-prose", text, seed, size, pos) < knobs["pack_prose"]:
                counts["pack_items_prose"] = counts.get("pack_items_prose", 0) + 1
                value = f"The label is **{value}**."
        else:
            value = _object(text, schema or {}, seed, wrong=wrong)
            marks += field_marks(text, seed, schema or {}, value, (str(pos),))
        obj[str(pos)] = value
    body = orjson.dumps(obj).decode()
    if reask:
        return body, counts, marks
    roll = _fraction("pack-reply", texts, seed)
    if roll < knobs["pack_broken"]:  # what the items had is lost with the rest
        return body[: max(1, len(body) // 2)], {"packs": 1, "pack_items": size, "pack_broken": 1}, []
    roll -= knobs["pack_broken"]
    if roll < knobs["pack_fenced"]:
        counts["pack_fenced"] = 1
        if roll < knobs["pack_fenced"] / 2:
            return f"```json\n{body}\n```", counts, marks
        return f"Here are the answers for every item:\n{body}\nLet me know if you need more.", counts, marks
    return body, counts, marks


def _wrong(text: str, labels: list[str], seed: Any) -> str:
    right = truth(text, labels)
    others = [x for x in labels if x != right]
    return others[int(_fraction("pack-other", text, seed) * len(others))]
