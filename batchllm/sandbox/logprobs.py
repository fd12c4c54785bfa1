"""The sandbox's logprobs: a probability for each token it wrote, as an OpenAI-compatible server
returns them when asked (``"logprobs": true``: ``choices[0].logprobs.content``).

The emulated model knows whether each answer it gives is right (labeler.py: its ``truth``), so
the probability it gives the answer's tokens tracks that, and is calibrated: answers fall in a
sure band (0.9 to 1) or an unsure one (0.3 to 0.7), in shares such that the answers given a
probability p are right a share p of the time, whatever the wrong-answer rate. ``overconfident``
takes that share of the doubt away (p + (1 - p) x): the same answers, surer than they should be.
The other tokens (keys, quotes, prose) are near certain. A reply is cut into tokens at word and
punctuation boundaries, and its tokens laid end to end are the reply, as a server's are. An
answer's first token carries its probability; the rest of it is then near certain.

Held to a response_format, the sandbox reports what llama.cpp and vLLM report: each token's
probability before the grammar narrowed the choice, a share ``STRAY`` of the answer's first token
on a form the schema forbids (the answer capitalized, as small models write it), so the answer
reads (1 - STRAY) p. Asked for ``top_logprobs`` (n), each token lists the n likeliest: at an
answer's first token, itself, the forbidden form and the other allowed values (``Mark.others``,
their first tokens) sharing 1 - p of the allowed mass; elsewhere the token alone (near certain).

A ``Mark`` says where an answer stands: the keys leading to it (``("label",)``, ``("3",)`` in a
pack, ``("3", "sentiment")`` for a field of a packed object; none for a bare label), its text,
and whether it is right. Everything is a function of the reply and its marks.
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple

_TOKEN = re.compile(r"\w+|\s+|[^\w\s]")
SURE, UNSURE = (0.9, 1.0), (0.3, 0.7)
_OTHER = -1e-4  # a token beside the answer: near certain
STRAY = 0.4  # held to a schema: the first token's share on a form the schema forbids


class Mark(NamedTuple):
    keys: tuple[str, ...]
    value: str
    right: bool
    roll: tuple[float, float]  # two uniform draws in [0, 1) fixed by the request (labeler._fraction)
    others: tuple[str, ...] = ()  # the other values allowed in its place (a label set, an enum)


def probability(right: bool, wrong_rate: float, roll: tuple[float, float], overconfident: float) -> float:
    """A calibrated probability for an answer known right or wrong (see the module docstring)."""
    sure = min(1.0, max(0.0, (0.5 - wrong_rate) / 0.45))  # share of all answers in the sure band
    mean_sure, mean_unsure = sum(SURE) / 2, sum(UNSURE) / 2
    if right:
        w_sure, w_unsure = sure * mean_sure, (1 - sure) * mean_unsure
    else:
        w_sure, w_unsure = sure * (1 - mean_sure), (1 - sure) * (1 - mean_unsure)
    total = w_sure + w_unsure
    lo, hi = SURE if total and roll[0] * total < w_sure else UNSURE
    u = roll[1]
    if right:  # density p in the band
        p = math.sqrt(lo * lo + u * (hi * hi - lo * lo))
    else:  # density 1 - p in the band
        p = 1 - math.sqrt((1 - lo) ** 2 - u * ((1 - lo) ** 2 - (1 - hi) ** 2))
    return min(1.0, p + (1 - p) * overconfident)


def _find(text: str, mark: Mark, start: int) -> int:
    """Where the mark's value starts, after its keys, from ``start`` (-1 when not there)."""
    at = start
    for key in mark.keys:
        at = text.find(f'"{key}"', at)
        if at < 0:
            return -1
        at += len(key) + 2
    return text.find(mark.value, at)


def content(
    text: str, marks: list[Mark], wrong_rate: float, overconfident: float, top: int = 0, held: bool = False
) -> list[dict[str, Any]]:
    """``choices[0].logprobs.content`` for a reply: its tokens, each marked answer's first token at
    its probability (see the module docstring), with ``top`` alternatives each."""
    tokens = [(m.start(), m.group(0)) for m in _TOKEN.finditer(text)]
    logprobs = [_OTHER] * len(tokens)
    tops: dict[int, dict[str, float]] = {}
    start, n = 0, 0
    for mark in marks:
        at = _find(text, mark, start)
        if at < 0:
            continue
        start = at + len(mark.value)
        while n < len(tokens) and tokens[n][0] + len(tokens[n][1]) <= at:
            n += 1
        if n == len(tokens):
            break
        p = probability(mark.right, wrong_rate, mark.roll, overconfident)
        allowed = 1 - STRAY if held else 1.0
        first = tokens[n][1]
        logprobs[n] = math.log(max(p * allowed, 1e-12))
        if top:
            mass = {first: p * allowed}
            if held:
                stray = first.capitalize() if first.capitalize() != first else first.lower() + "_"
                mass[stray] = STRAY
            for other in mark.others:
                head = _TOKEN.match(other)
                if head is not None and head.group(0) != first:
                    share = (1 - p) * allowed / len(mark.others)
                    mass[head.group(0)] = mass.get(head.group(0), 0.0) + share
            tops[n] = {tok: math.log(max(q, 1e-12)) for tok, q in mass.items()}
    out = []
    for i, ((_, tok), lp) in enumerate(zip(tokens, logprobs, strict=True)):
        listed = sorted((tops.get(i) or {tok: lp}).items(), key=lambda x: -x[1])[:top]
        alternatives = [{"token": t, "logprob": x, "bytes": list(t.encode())} for t, x in listed]
        out.append({"token": tok, "logprob": lp, "bytes": list(tok.encode()), "top_logprobs": alternatives})
    return out
