"""The sandbox's logprobs: a probability for each token it wrote, as an OpenAI-compatible server
returns them when asked (``"logprobs": true``: ``choices[0].logprobs.content``).

The emulated model knows whether each answer it gives is right (labeler.py: its ``truth``), so
the probability it gives the answer's tokens tracks that, and is calibrated: answers fall in a
sure band (0.9 to 1) or an unsure one (0.3 to 0.7), in shares such that the answers given a
probability p are right a share p of the time, whatever the wrong-answer rate. ``overconfident``
takes that share of the doubt away (p + (1 - p) x): the same answers, surer than they should be.
The other tokens (keys, quotes, prose) are near certain. A reply is cut into tokens at word and
punctuation boundaries, and its tokens laid end to end are the reply, as a server's are.

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


class Mark(NamedTuple):
    keys: tuple[str, ...]
    value: str
    right: bool
    roll: tuple[float, float]  # two uniform draws in [0, 1) fixed by the request (labeler._fraction)


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


def content(text: str, marks: list[Mark], wrong_rate: float, overconfident: float) -> list[dict[str, Any]]:
    """``choices[0].logprobs.content`` for a reply: its tokens, each marked answer's tokens jointly
    at its probability."""
    spans: list[tuple[int, int, float]] = []
    start = 0
    for mark in marks:
        at = _find(text, mark, start)
        if at < 0:
            continue
        end = at + len(mark.value)
        spans.append((at, end, probability(mark.right, wrong_rate, mark.roll, overconfident)))
        start = end
    tokens = [(m.start(), m.group(0)) for m in _TOKEN.finditer(text)]
    logprobs = [_OTHER] * len(tokens)
    for lo, hi, p in spans:
        inside = [i for i, (at, tok) in enumerate(tokens) if at < hi and at + len(tok) > lo]
        for i in inside:
            logprobs[i] = math.log(max(p, 1e-12)) / len(inside)
    return [
        {"token": tok, "logprob": lp, "bytes": list(tok.encode()), "top_logprobs": []}
        for (_, tok), lp in zip(tokens, logprobs, strict=True)
    ]
