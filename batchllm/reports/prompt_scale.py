"""What a pilot's server said of the prompts, where batchllm could only guess their tokens.

Without the model's tokenizer (``tokens.py``: about 4 bytes a token) an estimate's prompt tokens
are a guess, and a long shared system prompt makes the guess wrong by the same share on every
row, so its "expected" missed by 20% with an interval of zero width. The rows a pilot sent carry
the server's own count (``usage.prompt_tokens``): the ratio of that count to the guess, row by
row, scales the guess for the rows not sent, and its spread widens the interval. Only rows
answered in one request, by the server (not the cache, not an identical row), are compared: a
re-ask's prompt holds more than the row.

The same rows say whether the server caches prompts at all: the estimate projects a shared
prefix as cached (OpenAI does), and a server that cached none of a pilot's rows (a vLLM without
prefix caching) billed twice the expected cost; its expected cost then assumes no hit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple


class PromptScale(NamedTuple):
    ratio: float  # the server's prompt tokens over batchllm's guess, over the rows compared
    sd: float  # of the rows' own ratios
    rows: int

    def as_dict(self) -> dict[str, Any]:
        return {"ratio": round(self.ratio, 4), "sd": round(self.sd, 4), "rows": self.rows}


def _by_server(e: Any) -> bool:
    """A row the server answered (not batchllm's response cache, not an identical row)."""
    return e.status in ("ok", "invalid") and e.answered_by is None and not e.cached


def pilot_pairs(entries: Mapping[str, Any], guesses: Mapping[str, int]) -> list[tuple[int, int]]:
    """(guessed, billed) prompt tokens of the rows a server answered in one request."""
    return [
        (guesses[row_id], int(e.prompt_tokens))
        for row_id, e in entries.items()
        if _by_server(e) and e.attempts == 1 and e.prompt_tokens and guesses.get(row_id, 0) > 0
    ]


def prompt_scale(pairs: list[tuple[int, int]]) -> PromptScale | None:
    if not pairs:
        return None
    ratio = sum(b for _, b in pairs) / sum(g for g, _ in pairs)
    own = [b / g for g, b in pairs]
    mean = sum(own) / len(own)
    sd = math.sqrt(sum((x - mean) ** 2 for x in own) / (len(own) - 1)) if len(own) > 1 else 0.0
    return PromptScale(ratio, sd, len(pairs))


def server_cached(entries: Mapping[str, Any]) -> tuple[int, int]:
    """(rows the server answered, their cached prompt tokens)."""
    answered = [e for e in entries.values() if _by_server(e)]
    return len(answered), sum(e.cached_tokens or 0 for e in answered)
