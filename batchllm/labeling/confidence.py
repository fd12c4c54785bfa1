"""A labeling row's confidence: the probability the model gave the value it chose (``--confidence``).

OpenAI-compatible servers asked for ``logprobs`` return one entry per token they wrote
(``{"token", "logprob"}``). The tokens laid end to end are the reply (or hold it: ``offset``), so
the value's characters map to the tokens that wrote them; their joint probability is exp of the
sum of their logprobs:

    a label             the label's characters (in ``{"label": "x"}``: the value's, quotes left out)
    a --json-schema     each enum or boolean field's value (``confidence_<field>``)
    a pack (--pack)     the same, inside the item's own value under its key "n"

Held to a schema (``--structured``, labeling/structured.py), a server writes only what the
schema allows, but llama.cpp and vLLM report each token's logprob from the model's distribution
before the grammar narrowed it: a label the model chose among three reads 0.05 when most of the
mass was on "Positive", which the enum forbids. So a held request asks for each token's
``top_logprobs`` (``TOP``), and the value's probability is taken among the values its schema
allows (``among``): at each of its tokens (quotes included), the mass of the listed tokens that
keep it possible over the mass of those that keep any allowed value possible, a value none of the
listed tokens reaches counted at most at the list's floor (what an unlisted token can have). A
server that reports the narrowed distribution (masked tokens left out) gives the same figure; a
token without alternatives listed falls back to the joint probability above.

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

import functools
import math
from typing import Any

import orjson

from .parse import LABEL_FIELD, object_end, parse_label
from .spec import Field, Labeling

LOGPROBS = "logprobs"  # the request field, as the openai provider sends it
TOP_LOGPROBS = "top_logprobs"  # asked with response_format: each token's likeliest alternatives
TOP = 10  # alternatives a token: enough for a few values beside what the schema forbids


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


def among(tokens: list[Any], start: int, end: int, value: str, allowed: tuple[str, ...]) -> float | None:
    """The probability of ``value`` (JSON text, written at characters ``start`` to ``end``) among
    the ``allowed`` values (JSON texts), from each token's ``top_logprobs``; None where a token has
    none listed or the tokens do not write the value."""
    if value not in allowed:
        return None
    pos, total, written = 0, 0.0, ""
    try:
        for t in tokens:
            token = t["token"]
            at, pos = pos, pos + len(token)
            if pos <= start:
                continue
            share = _share(
                token, t["logprob"], t["top_logprobs"], max(0, start - at), written, value, allowed
            )
            if share is None:
                return None
            total += share
            written += token[max(0, start - at) : end - at]
            if pos >= end:
                return math.exp(total) if written == value else None
    except (KeyError, TypeError, ValueError):  # a token without its text, logprob or list
        return None
    return None


def _share(
    token: str, logprob: float, top: list[Any], cut: int, written: str, value: str, allowed: tuple[str, ...]
) -> float | None:
    """log(mass of the listed tokens keeping ``value`` possible / mass of those keeping any allowed
    value possible), at one token whose first ``cut`` characters come before the value."""
    if not top:
        return None
    possible = [v for v in allowed if v.startswith(written)]
    if possible == [value]:
        return 0.0  # no other value is left: the rest of this one is the schema's, not a choice
    head, mine, anyone, reached = token[:cut], 0.0, 0.0, set()
    listed = top if any(x["token"] == token for x in top) else [*top, {"token": token, "logprob": logprob}]
    for x in listed:  # two of one text (a server lists token ids) are two ways to write it
        alt = x["token"]
        if not alt.startswith(head):
            continue  # another way to the value's start: not this path
        so_far = written + alt[cut:]
        fits = [v for v in possible if v.startswith(so_far) or so_far.startswith(v)]
        if fits:
            p = math.exp(x["logprob"])
            anyone += p
            mine += p if value in fits else 0.0
            reached.update(fits)
    unlisted = sum(1 for v in possible if v not in reached)
    if unlisted:  # each had less than the least listed, and all of them no more than what is left
        floor = math.exp(min(x["logprob"] for x in top))
        left = 1.0 - sum(math.exp(x["logprob"]) for x in listed)
        anyone += min(unlisted * floor, max(0.0, left))
    return math.log(mine / anyone) if mine > 0 else None


@functools.lru_cache(maxsize=256)
def choices(values: tuple[Any, ...], nullable: bool = False) -> tuple[str, ...]:
    """Values as the JSON texts a schema allows (null too when the field may be left out)."""
    return tuple(orjson.dumps(v).decode() for v in values) + (("null",) if nullable else ())


def _allowed(labeling: Labeling, f: Field) -> tuple[str, ...]:
    values = (True, False) if f.type == "boolean" else f.enum or ()
    return choices(tuple(values), f.name not in labeling.required)


def _score(
    text: str, tokens: list[Any], a: int, b: int, shift: int, allowed: tuple[str, ...] | None
) -> float | None:
    """The value at ``text[a:b]`` (a string's characters, or a literal): among ``allowed`` when held
    to a schema (its quotes then part of it), else its tokens' joint probability."""
    if allowed is not None:
        qa, qb = (a - 1, b + 1) if a > 0 and b < len(text) and text[a - 1] == text[b] == '"' else (a, b)
        found = among(tokens, qa + shift, qb + shift, text[qa:qb], allowed)
        if found is not None:
            return found
    return joint(tokens, a + shift, b + shift)


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


def _label(
    text: str, label: str, tokens: list[Any], lo: int, hi: int, shift: int, allowed: tuple[str, ...] | None
) -> float | None:
    """A label's probability in ``text[lo:hi]``: under a "label" key when the reply is an object,
    else where the label stands (a bare label, or one in prose)."""
    if text.find("{", lo, hi) >= 0:
        span = value_span(text, LABEL_FIELD, lo, hi)
        if span is not None:
            return _score(text, tokens, *span, shift, allowed)
    at = text.lower().find(label.lower(), lo, hi)
    if at < 0:
        return None
    return _score(text, tokens, at, at + len(label), shift, allowed)


def _fields(
    labeling: Labeling, text: str, tokens: list[Any], lo: int, hi: int, shift: int, held: bool
) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for f in labeling.fields:
        if f.scored:
            span = value_span(text, f.name, lo, hi)
            allowed = _allowed(labeling, f) if held else None
            out[f.name] = None if span is None else _score(text, tokens, *span, shift, allowed)
    return out


def of_reply(labeling: Labeling, text: str, truncated: bool, tokens: list[Any], held: bool = False) -> Any:
    """A reply's confidence: a label's probability, or each scored field's (None where unknown).
    ``held``: the request carried a response_format (the value's probability among those allowed)."""
    shift = offset(text, tokens)
    if labeling.is_schema:
        if shift is None:
            return {f.name: None for f in labeling.fields if f.scored}
        return _fields(labeling, text, tokens, 0, len(text), shift, held)
    label, error = parse_label(text, labeling.labels, truncated)
    if label is None or shift is None:
        return None
    return _label(text, label, tokens, 0, len(text), shift, choices(labeling.labels) if held else None)


def of_pack(
    labeling: Labeling, text: str, items: list[str], tokens: list[Any], held: bool = False
) -> list[Any]:
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
            out.append(_fields(labeling, text, tokens, *span, shift, held))
            continue
        label, _ = parse_label(item, labeling.labels, False)
        allowed = choices(labeling.labels) if held else None
        out.append(None if label is None else _label(text, label, tokens, *span, shift, allowed))
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
