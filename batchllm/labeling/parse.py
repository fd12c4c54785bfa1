"""Reading a reply into a label or a typed object: free deterministic repair, then validation.

Labels: a structured reply (``{"label": ...}``, labeling/structured.py) is read for its label
field; the reply is cleaned (whitespace, case, markdown emphasis, code fences, quotes, trailing
punctuation) and matched against the set; failing that, a single allowed label standing as a
whole word inside prose ("Sure! The label is: positive.") is taken. Anything else is an error
code, never a guess. JSON: the first JSON object in the reply (in prose or a code fence) is cut
out by bracket matching, never completed: a reply cut off mid-object is ``invalid_json``.

Error codes are stable strings: ``not_in_set:<value>``, ``no_json``, ``invalid_json``,
``schema:<field>``, ``truncated``, ``missing`` (a packed reply left the row's item out,
labeling/pack.py) and ``no_majority`` (votes.py).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import orjson

from .spec import Field, Labeling

LABEL_FIELD = "label"  # a structured reply's (labeling/structured.py)

_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")
_STRIP = " \t\r\n*_`'\".,;:!?()[]{}<>"


def clean(text: str) -> str:
    return _FENCE.sub("", text.strip()).strip(_STRIP)


@lru_cache(maxsize=16)
def _matcher(labels: tuple[str, ...]) -> tuple[dict[str, str], re.Pattern[str]]:
    """A label set's lookup by lower case (its structured replies too), and the pattern finding
    one of its labels in prose."""
    by_lower = {label.lower(): label for label in labels}
    for label in labels:  # a structured reply as servers write it: read as fast as a bare label
        value = orjson.dumps(label).decode()
        for sep in (":", ": "):
            by_lower[f'{{"{LABEL_FIELD}"{sep}{value}}}'.lower()] = label
    pattern = "|".join(re.escape(x) for x in sorted(labels, key=len, reverse=True))
    return by_lower, re.compile(rf"(?<![\w-])(?:{pattern})(?![\w-])", re.IGNORECASE)


def parse_label(text: str, labels: tuple[str, ...], truncated: bool) -> tuple[str | None, str | None]:
    """(label, None) or (None, error code)."""
    by_lower, inside = _matcher(labels)
    exact = by_lower.get(text.lower())  # the reply as it should be: nothing to repair
    if exact is not None:
        return exact, None
    if "{" in text:  # a structured reply, {"label": ...} (labeling/structured.py), maybe in prose
        obj, _ = find_object(text)
        value = obj.get(LABEL_FIELD) if obj is not None else None
        if isinstance(value, str):
            text = value
            exact = by_lower.get(text.lower())
            if exact is not None:
                return exact, None
    cleaned = clean(text)
    exact = by_lower.get(" ".join(cleaned.split()).lower())
    if exact is not None:
        return exact, None
    found = {m.group(0).lower() for m in inside.finditer(text)}
    if len(found) == 1:
        return by_lower[found.pop()], None
    if truncated:
        return None, "truncated"
    value = " ".join(cleaned.split())[:40] or "(empty)"
    return None, f"not_in_set:{value}"


def first_object(text: str) -> tuple[str | None, str | None]:
    """The first balanced ``{...}`` in ``text`` (strings respected), or an error code."""
    start = text.find("{")
    if start < 0:
        return None, "no_json"
    end = object_end(text, start)
    if end is None:
        return None, "invalid_json"  # cut off mid-object: never completed by guessing
    return text[start:end], None


def object_end(text: str, start: int, hi: int | None = None) -> int | None:
    """Just past the ``}`` that closes the object opening at ``text[start]`` (braces inside
    strings, and escaped quotes, not counted); None when it is not closed before ``hi``."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text) if hi is None else hi):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def find_object(text: str) -> tuple[dict[str, Any] | None, str | None]:
    """The reply's JSON object: the whole reply, or else the first one in prose or a fence."""
    obj: Any = None
    whole = text.strip()
    if whole[:1] == "{" and whole[-1:] == "}":
        try:  # the reply as it should be, one object and nothing else: no need to look for it
            obj = orjson.loads(whole)
        except orjson.JSONDecodeError:
            obj = None  # looked for below, as in prose
    if not isinstance(obj, dict):
        raw, error = first_object(text)
        if raw is None:
            return None, error
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None, "invalid_json"
    if not isinstance(obj, dict):
        return None, "invalid_json"
    return obj, None


def _valid(f: Field, value: Any) -> bool:
    if f.type == "string":
        ok = isinstance(value, str)
    elif f.type == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif f.type == "number":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif f.type == "boolean":
        ok = isinstance(value, bool)
    else:  # an array of strings: its enum is its items' (spec.py)
        ok = isinstance(value, list) and all(isinstance(x, str) for x in value)
        return ok and (f.enum is None or all(x in f.enum for x in value))
    return ok and (f.enum is None or value in f.enum)


def parse_object(
    text: str, fields: tuple[Field, ...], required: tuple[str, ...]
) -> tuple[dict[str, Any] | None, str | None]:
    obj, error = find_object(text)
    if obj is None:
        return None, error
    out: dict[str, Any] = {}
    for f in fields:
        if f.name not in obj or obj[f.name] is None:
            if f.name in required:
                return None, f"schema:{f.name}"
            out[f.name] = None
            continue
        if not _valid(f, obj[f.name]):
            return None, f"schema:{f.name}"
        out[f.name] = float(obj[f.name]) if f.type == "number" else obj[f.name]
    return out, None


def parse(labeling: Labeling, text: str, truncated: bool) -> tuple[Any, str | None]:
    """A reply under a job's labeling: (label or object, None) or (None, error code)."""
    if labeling.is_schema:
        value, error = parse_object(text, labeling.fields, labeling.required)
        return (value, error) if error is None or not truncated else (None, "truncated")
    return parse_label(text, labeling.labels, truncated)


def feedback_kinds(labeling: Labeling) -> list[str]:
    """Every shape of re-ask feedback, with the model's answer left out (``estimate`` bounds a
    re-ask's prompt with the longest)."""
    if labeling.is_schema:
        return [feedback(labeling, k) for k in ("no_json", "invalid_json", "schema:", "other")]
    return [feedback(labeling, k) for k in ("truncated", "not_in_set:")]


def feedback(labeling: Labeling, error: str) -> str:
    """Why an answer was rejected, and what to answer instead: the re-ask's user turn."""
    kind, _, detail = error.partition(":")
    if kind == "missing":
        what = "Your answer left this item out."
        return what + (
            " Answer again with one JSON object only, matching the schema."
            if labeling.is_schema
            else f" Answer again with exactly one of: {', '.join(labeling.labels)}."
        )
    if labeling.is_schema:
        what = {
            "no_json": "Your answer contained no JSON object.",
            "invalid_json": "Your answer was not one complete, valid JSON object.",
            "schema": f"In your answer, field {detail!r} was missing or had a wrong type or value.",
        }.get(kind, "Your answer could not be read.")
        return what + " Answer again with one JSON object only, matching the schema."
    if kind == "truncated":
        what = "Your answer was cut off."
    else:
        what = f"Your answer {detail!r} is not one of the allowed labels."
    return f"{what} Answer again with exactly one of: {', '.join(labeling.labels)}."
