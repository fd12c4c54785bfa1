"""The sandbox's prompt cache, as OpenAI documents its own (the OpenAI face only).

A prompt's prefix is served from the cache once an earlier request with that prefix has been
answered: a request that arrives while the first with its prefix is still in flight gets none.
What is cached is counted in steps of 128 tokens from 1,024 (``prompt_tokens_details.cached_tokens``)
and billed at the cached-input price. The emulated prefix is the prompt's leading messages (all
but the last: a job's system prompt, examples, a pack's instructions), which is where batchllm's
requests share one; a real server matches token by token, which this never exceeds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import orjson

from ..tokens import TokenCounter

MINIMUM = 1024  # OpenAI caches prompts of at least this many tokens ...
STEP = 128  # ... in steps of this many
# The assistant header closing every prompt: counted with the messages, never part of a prefix.
_CLOSING = 4
_MAX_PREFIXES = 100_000  # a long-running sandbox forgets, as a real cache evicts


class PromptCache:
    def __init__(self, counter: TokenCounter) -> None:
        self.counter = counter
        self._warm: set[bytes] = set()

    def lookup(self, model: str, messages: Sequence[dict[str, Any]]) -> tuple[bytes | None, int]:
        """(the prefix's key, or None when it is too short to cache; tokens served from the cache)."""
        if len(messages) < 2:
            return None, 0
        leading = messages[:-1]
        tokens = self.counter.count_messages(leading) - _CLOSING
        if tokens < MINIMUM:
            return None, 0
        key = hashlib.blake2b(orjson.dumps([model, leading]), digest_size=16).digest()
        return key, (tokens // STEP * STEP if key in self._warm else 0)

    def clear(self) -> None:
        self._warm.clear()

    def answered(self, key: bytes | None) -> None:
        """A request with this prefix was answered: later ones find it cached."""
        if key is None:
            return
        if len(self._warm) >= _MAX_PREFIXES:
            self._warm.clear()
        self._warm.add(key)
