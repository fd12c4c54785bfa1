"""The sandbox as a labeling model: it answers from the label set or schema the request states.

It reads the instruction batchllm appends to the system prompt (labeling/spec.py), picks the
"true" answer for the row's text deterministically (``truth``: a keyword sentiment reading for
sentiment label sets, a hash otherwise), and then, per (text, seed), may answer wrong, wrap the
answer in prose, answer outside the set, send broken JSON, or ramble past max_tokens, at the rates
``SandboxConfig`` gives. A re-ask (a conversation whose last user turn is batchllm's feedback)
gets a well-formed answer. A request with a ``response_format`` schema gets its answer in that
schema (schema.py): only the wrong answers remain. Tests compute the expected outcome with the
same functions.
"""

from __future__ import annotations

import functools
import hashlib
import re
from typing import Any

import orjson

from .logprobs import Mark
from .schema import conform, schema_of

_LABELS = re.compile(r"Answer with exactly one label from this list: (.+?)\.(?:\n|$)")
_SCHEMA = re.compile(r"matching this JSON Schema:\n(\{[^\n]*\})")  # one line, as orjson writes it
REASK_PREFIX = "Your answer"
# A reader of tone: strong phrases weigh 2, details 1; a hedging phrase reads as neutral.
_POSITIVE = {"love": 2, "best": 2, "exceeded": 2, "five stars": 2, "really good": 2, "works well": 2,
             "solid value": 2, "great": 1, "recommande": 2, "sehr gut": 2, "良い": 2, "happy": 1, "👍": 2,
             "sturdy": 1, "answered within": 1, "fast": 1}  # fmt: skip
_NEGATIVE = {"disappointed": 2, "not what i hoped": 2, "problems": 2, "broke": 2, "do not buy": 2,
             "returned": 2, "leaks": 1, "scratch": 1, "confusing": 1, "louder than": 1, "shorter than": 1,
             "price went up": 1}  # fmt: skip
_NEUTRAL = ("okay", "mixed feelings", "does the job", "nothing more", "small gripe")
RAMBLE = (
    "Let me think about this carefully before I give my final answer, weighing every detail of "
    "the text and the tone of the writer in each sentence that they wrote here today"
)


def _fraction(*parts: Any) -> float:
    digest = hashlib.sha256(orjson.dumps(parts)).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def truth(text: str, labels: list[str]) -> str:
    """The answer the emulated model believes is right for this text."""
    lower = [x.lower() for x in labels]
    if "positive" in lower and "negative" in lower:
        t = text.lower()
        if "neutral" in lower and any(w in t for w in _NEUTRAL):
            return labels[lower.index("neutral")]
        score = sum(v for w, v in _POSITIVE.items() if w in t) - sum(
            v for w, v in _NEGATIVE.items() if w in t
        )
        if score > 0:
            return labels[lower.index("positive")]
        if score < 0:
            return labels[lower.index("negative")]
        return labels[lower.index("neutral")] if "neutral" in lower else labels[lower.index("negative")]
    return labels[int(_fraction("truth", text) * len(labels))]


def fault(text: str, seed: Any, rates: list[tuple[str, float]]) -> str | None:
    """Which fault (if any) the first answer to (text, seed) has: ``rates`` in a fixed order."""
    if not any(rate for _, rate in rates):
        return None  # no roll to make (a hash a request, at zero latency)
    roll = _fraction("fault", text, seed)
    for name, rate in rates:
        if roll < rate:
            return name
        roll -= rate
    return None


def expected_label(text: str, labels: list[str], seed: Any, rates: list[tuple[str, float]]) -> str:
    """The label a run ends with for this text (every fault but "wrong" is repaired or re-asked)."""
    right = truth(text, labels)
    if fault(text, seed, rates) == "wrong":
        others = [x for x in labels if x != right]
        return others[int(_fraction("wrong", text, seed) * len(others))]
    return right


def answer(
    messages: list[dict[str, Any]], params: dict[str, Any], rates: list[tuple[str, float]]
) -> tuple[str, str | None, bool, list[Mark]] | None:
    """(reply, fault, is a re-ask, where its answers stand: logprobs.py) for a labeling request;
    None when it states no label set or schema."""
    system = next((m["content"] for m in messages if m.get("role") == "system"), "")
    labels, schema = _instruction(system)
    if labels is None and schema is None:
        return None
    users = [m["content"] for m in messages if m.get("role") == "user"]
    reask = bool(users) and users[-1].startswith(REASK_PREFIX)
    text = next((u for u in reversed(users) if not u.startswith(REASK_PREFIX)), "")
    seed = params.get("seed")
    which = None if reask else fault(text, seed, rates)
    held = schema_of(params.get("response_format"))
    if held is not None:
        # Held to a schema, the messy model still means what it means (a wrong answer stays
        # wrong), but its prose, values out of the set, broken JSON and rambling cannot get out.
        which = "wrong" if which == "wrong" else None
        meant: Any = (
            expected_label(text, labels, seed, rates)
            if labels is not None
            else _object(text, schema or {}, seed, wrong=which == "wrong")
        )
        held_value = conform(held, meant, text)
        if labels is not None:
            value = held_value.get("label") if isinstance(held_value, dict) else None
            marks = [] if not isinstance(value, str) else [label_mark(text, seed, labels, value, ("label",))]
        else:
            marks = field_marks(text, seed, schema or {}, held_value, ())
        return orjson.dumps(held_value).decode(), which, reask, marks
    if labels is not None:
        reply = _label_reply(text, labels, seed, rates, which, reask)
        answered = (
            expected_label(text, labels, seed, rates) if reask or which == "wrong" else truth(text, labels)
        )
        kept = which in (None, "wrong", "prose")
        return reply, which, reask, [label_mark(text, seed, labels, answered, ())] if kept else []
    reply = _object_reply(text, schema or {}, seed, which)
    kept = which in (None, "wrong", "prose")
    obj = _object(text, schema or {}, seed, wrong=which == "wrong")
    return reply, which, reask, field_marks(text, seed, schema or {}, obj, ()) if kept else []


def _roll(text: str, seed: Any, keys: tuple[str, ...]) -> tuple[float, float]:
    return _fraction("sure", text, seed, keys, 0), _fraction("sure", text, seed, keys, 1)


def label_mark(text: str, seed: Any, labels: list[str], value: str, keys: tuple[str, ...]) -> Mark:
    """Where a label answer stands in the reply, and whether it is right (logprobs.py)."""
    others = tuple(x for x in labels if x != value)
    return Mark(keys, value, value == truth(text, labels), _roll(text, seed, keys), others)


def field_marks(text: str, seed: Any, schema: dict[str, Any], obj: Any, keys: tuple[str, ...]) -> list[Mark]:
    """An object's enum and boolean fields: where each stands, and whether it is right."""
    if not isinstance(obj, dict):
        return []
    right = _object(text, schema, seed, wrong=False)
    marks = []
    for name, spec in (schema.get("properties") or {}).items():
        value = obj.get(name)
        if isinstance(value, bool) or ("enum" in spec and isinstance(value, str)):
            shown = ("true" if value else "false") if isinstance(value, bool) else value
            choices = ("true", "false") if isinstance(value, bool) else spec["enum"]
            others = tuple(str(x) for x in choices if x != shown)
            roll = _roll(text, seed, (*keys, name))
            marks.append(Mark((*keys, name), shown, value == right.get(name), roll, others))
    return marks


@functools.lru_cache(maxsize=64)
def _instruction(system: str) -> tuple[list[str] | None, dict[str, Any] | None]:
    """The label set or schema a system prompt states (read once per prompt, not per request)."""
    labels_match, schema_match = _LABELS.search(system), _SCHEMA.search(system)
    labels = [x.strip() for x in labels_match.group(1).split(",")] if labels_match else None
    return labels, orjson.loads(schema_match.group(1)) if schema_match else None


def _label_reply(
    text: str, labels: list[str], seed: Any, rates: list[tuple[str, float]], which: str | None, reask: bool
) -> str:
    label = expected_label(text, labels, seed, rates) if reask or which == "wrong" else truth(text, labels)
    return {
        None: label,
        "wrong": label,
        "prose": f"Sure! After reading the review, the label is: **{label}**.",
        "out_of_set": "mixed",
        "invalid_json": "unsure",
        "truncated": RAMBLE,
    }[which]


def _object_reply(text: str, schema: dict[str, Any], seed: Any, which: str | None) -> str:
    obj = _object(text, schema, seed, wrong=which == "wrong")
    body = orjson.dumps(obj).decode()
    if which == "prose":
        return f"Here is the JSON you asked for:\n```json\n{body}\n```"
    if which == "out_of_set" and obj:
        first = next(iter(obj))
        obj[first] = [1, 2] if isinstance(obj[first], str) else "not a valid value"
        return orjson.dumps(obj).decode()
    if which == "invalid_json":
        return body[: len(body) // 2]
    if which == "truncated":
        return RAMBLE
    return body


def _object(text: str, schema: dict[str, Any], seed: Any, wrong: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, spec in (schema.get("properties") or {}).items():
        f = _fraction("field", text, name, seed if wrong else None)
        kind = spec.get("type", "string")
        if "enum" in spec:
            out[name] = spec["enum"][int(f * len(spec["enum"]))]
        elif kind == "integer":
            out[name] = int(f * 5) + 1
        elif kind == "number":
            out[name] = round(f * 10, 2)
        elif kind == "boolean":
            out[name] = f < 0.5
        elif kind == "array":
            out[name] = ["quality", "price"][: 1 + int(f * 2)]
        else:
            out[name] = "summary of the text"
    return out
