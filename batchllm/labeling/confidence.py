"""A labeling row's confidence: the probability the model gave the value it chose (``--confidence``).

OpenAI-compatible servers asked for ``logprobs`` return one entry per token they wrote
(``{"token", "logprob"}``). The tokens laid end to end are the reply (or hold it: ``offset``), so
the value's characters map to the tokens that wrote them; their joint probability is exp of the
sum of their logprobs:

    a label             the label's characters (in ``{"label": "x"}``: the value's, quotes left out)
    a --json-schema     each enum or boolean field's value (``confidence_<field>``)
    a pack (--pack)     the same, inside the item's own value under its key "n"

Only the tokens up to the value's end are walked, so a row costs a few dict lookups. With samples
the row's confidence is the mean, over its voting answers, of the probability each gave the
winning value (0 for an answer that chose another); where an answer has none (no logprobs:
Dataoorts, a server that refused them), the winning value's share of the votes.

A reply's confidence is kept with it (the response cache, the journal's attempts), never its
logprobs: a row served from the cache, resumed or read again (``--reparse``) has the figure of the
answer that was paid for. The journal keeps a label's figure with the label it measured
(``stored``): read again under another label set, a reply whose label changed has none
(``measured``), since its figure was of other characters. A field's figure is of the characters
under its key, whatever the schema. Pure functions; no I/O.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from .parse import LABEL_FIELD, object_end, parse_label
from .spec import Labeling

LOGPROBS = "logprobs"  # the request field, as the openai provider sends it


def joint(tokens: list[Any], start: int, end: int) -> float | None:
    """The joint probability of the tokens that wrote characters ``start`` to ``end``."""
    pos, total, hit = 0, 0.0, False
    try:
        for t in tokens:
            pos += len(t["token"])
            if pos > start:
                total += t["logprob"]
                hit = True
                if pos >= end:
                    break
        return math.exp(total) if hit else None
    except (KeyError, TypeError):  # a token without its text or logprob: no confidence
        return None


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def value_span(text: str, key: str, lo: int = 0, hi: int | None = None) -> tuple[int, int] | None:
    """Where the value under ``"key":`` is in ``text[lo:hi]``: a string's characters (quotes left
    out), an object with its braces, or a bare literal (true, false, a number)."""
    hi = len(text) if hi is None else hi
    at = text.find(f'"{key}"', lo, hi)
    if at < 0:
        return None
    i = _skip(text, at + len(key) + 2)
    if i >= hi or text[i] != ":":
        return None
    i = _skip(text, i + 1)
    if i >= hi:
        return None
    c = text[i]
    if c == '"':
        j = text.find('"', i + 1, hi)
        while j > 0 and text[j - 1] == "\\":  # an escaped quote (a label seldom has one)
            j = text.find('"', j + 1, hi)
        return (i + 1, j) if j > 0 else None
    if c == "{":
        end = object_end(text, i, hi)
        return None if end is None else (i, end)
    j = i
    while j < hi and text[j] not in ",}] \t\r\n":
        j += 1
    return (i, j) if j > i else None


def offset(text: str, tokens: list[Any]) -> int | None:
    """Where the reply starts in its tokens laid end to end: 0 when they write it from the first
    character (most servers); llama.cpp holding a reply to a schema writes it in a code fence
    (```json ... ```) and returns the object alone. None when the reply is not in them."""
    try:
        if tokens and text.startswith(tokens[0]["token"]) and (tokens[0]["token"] or len(tokens) == 1):
            return 0
        written = "".join(t["token"] for t in tokens)
    except (KeyError, TypeError):
        return None
    at = written.find(text)
    return at if at >= 0 else None


def _label(text: str, label: str, tokens: list[Any], lo: int, hi: int, shift: int) -> float | None:
    """A label's probability in ``text[lo:hi]``: under a "label" key when the reply is an object,
    else where the label stands (a bare label, or one in prose)."""
    if text.find("{", lo, hi) >= 0:
        span = value_span(text, LABEL_FIELD, lo, hi)
        if span is not None:
            return joint(tokens, span[0] + shift, span[1] + shift)
    at = text.lower().find(label.lower(), lo, hi)
    if at < 0:
        return None
    return joint(tokens, at + shift, at + len(label) + shift)


def _fields(
    labeling: Labeling, text: str, tokens: list[Any], lo: int, hi: int, shift: int
) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for f in labeling.fields:
        if f.scored:
            span = value_span(text, f.name, lo, hi)
            out[f.name] = None if span is None else joint(tokens, span[0] + shift, span[1] + shift)
    return out


def of_reply(labeling: Labeling, text: str, truncated: bool, tokens: list[Any]) -> Any:
    """A reply's confidence: a label's probability, or each scored field's (None where unknown)."""
    shift = offset(text, tokens)
    if labeling.is_schema:
        if shift is None:
            return {f.name: None for f in labeling.fields if f.scored}
        return _fields(labeling, text, tokens, 0, len(text), shift)
    label, error = parse_label(text, labeling.labels, truncated)
    return None if label is None or shift is None else _label(text, label, tokens, 0, len(text), shift)


def of_pack(labeling: Labeling, text: str, items: list[str], tokens: list[Any]) -> list[Any]:
    """Each item's confidence in a packed reply ``{"1": ..., "2": ...}``, from its own tokens."""
    out: list[Any] = []
    shift = offset(text, tokens)
    if shift is None:
        return [None] * len(items)
    lo = 0
    for n, item in enumerate(items, 1):
        span = value_span(text, str(n), lo) if item else None
        if span is None:
            out.append(None)
            continue
        lo = span[1]
        if labeling.is_schema:
            out.append(_fields(labeling, text, tokens, *span, shift))
            continue
        label, _ = parse_label(item, labeling.labels, False)
        out.append(None if label is None else _label(text, label, tokens, *span, shift))
    return out


def stored(value: Any, confidence: Any) -> str | None:
    """A reply's confidence as the journal keeps it (JSON): a label's as ``[label, p]``."""
    if confidence is None:
        return None
    if isinstance(value, str) and isinstance(confidence, (int, float)):
        return orjson.dumps([value, confidence]).decode()
    return orjson.dumps(confidence).decode()


def measured(value: Any, kept: list[Any]) -> Any:
    """A label's confidence read back (``[label, p]``): p when ``value`` is still that label."""
    if isinstance(value, str) and len(kept) == 2 and str(kept[0]).casefold() == value.casefold():
        return kept[1]
    return None


def lowest(confidence: Any) -> float | None:
    """One number for a row: its label's confidence, or its least sure scored field's."""
    if isinstance(confidence, dict):
        known = [v for v in confidence.values() if v is not None]
        return min(known) if known else None
    return confidence if isinstance(confidence, (int, float)) else None


def of_votes(labeling: Labeling, answers: list[tuple[Any, Any]], winner: Any, logprobs: bool) -> Any:
    """A voted row's confidence from its answers' (value, confidence): the mean probability the
    answers gave the winner (with ``logprobs``, when every answer has one), else its vote share."""
    if labeling.is_schema:
        out: dict[str, float | None] = {}
        for f in labeling.fields:
            if f.scored:
                pairs = [
                    (v.get(f.name) == winner.get(f.name), None if not isinstance(c, dict) else c.get(f.name))
                    for v, c in answers
                ]
                out[f.name] = _mean(pairs, logprobs)
        return out
    return _mean([(v == winner, c) for v, c in answers], logprobs)


def _mean(pairs: list[tuple[bool, Any]], logprobs: bool) -> float | None:
    if not pairs:
        return None
    if logprobs and all(isinstance(c, (int, float)) for _, c in pairs):
        return sum(c if agrees else 0.0 for agrees, c in pairs) / len(pairs)
    return sum(1 for agrees, _ in pairs if agrees) / len(pairs)
