"""The sandbox's prompt cache, as OpenAI documents its own (the OpenAI face only).

A prompt's prefix is served from the cache once an earlier request with that prefix has been
answered: a request that arrives while the first with its prefix is still in flight gets none.
What is cached is counted in steps of 128 tokens from 1,024 (``prompt_tokens_details.cached_tokens``)
and billed at the cached-input price. A prefix is matched token by token, as a real server does:
the leading messages whole (a job's system prompt, examples, a pack's instructions), then the last
message's tokens up to a step, so a long instruction at the head of a template is cached as one in
a system prompt is. Every step a request reaches is remembered once it is answered; a request
finds the longest one remembered.

Only prompts that could reach 1,024 tokens are tokenized (a character is at most 4 bytes, a token
at least one): the throughput benchmark's short prompts cost nothing.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from typing import Any

import orjson

from ..tokens import TokenCounter

MINIMUM = 1024  # OpenAI caches prompts of at least this many tokens ...
STEP = 128  # ... in steps of this many
# The assistant header closing every prompt: counted with the messages, never part of a prefix.
_CLOSING = 4
_HEADER = 4  # the last message's role header, before its text
_MAX_PREFIXES = 100_000  # a long-running sandbox forgets, as a real cache evicts


class PromptCache:
    def __init__(self, counter: TokenCounter) -> None:
        self.counter = counter
        self._warm: set[bytes] = set()

    def lookup(self, model: str, messages: Sequence[dict[str, Any]]) -> tuple[list[bytes], int]:
        """(the keys of the steps this prompt reaches, to remember once it is answered; the
        tokens served from the cache: the longest step remembered)."""
        if not messages or 4 * sum(len(str(m.get("content", ""))) for m in messages) < MINIMUM:
            return [], 0  # under 1,024 tokens whatever the tokenizer: nothing to cache
        leading, last = messages[:-1], str(messages[-1].get("content", ""))
        lead = self.counter.count_messages(leading) - _CLOSING  # the tokens before the last message
        digest = hashlib.blake2b(orjson.dumps([model, leading]), digest_size=16)
        keys = [digest.digest()] if lead >= MINIMUM else []
        steps = [lead // STEP * STEP] if lead >= MINIMUM else []
        tokens = self.counter.token_ids(last)
        if tokens is not None:  # the last message's tokens, step by step
            at = lead + _HEADER
            first = max(MINIMUM, (at // STEP + 1) * STEP)
            done = 0
            for step in range(first, at + len(tokens) + 1, STEP):
                digest.update(array("I", tokens[done : step - at]).tobytes())
                done = step - at
                keys.append(digest.copy().digest())
                steps.append(step)
        cached = next((s for k, s in zip(reversed(keys), reversed(steps), strict=True) if k in self._warm), 0)
        return keys, cached

    def clear(self) -> None:
        self._warm.clear()

    def answered(self, keys: list[bytes]) -> None:
        """A request reaching these steps was answered: later ones find them cached."""
        if len(self._warm) + len(keys) > _MAX_PREFIXES:
            self._warm.clear()
        self._warm.update(keys)
