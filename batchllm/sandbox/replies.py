"""What the sandbox says and which models it serves: the deterministic natural reply to a
request (the same request, the same words, whatever the run), and the models of ``batchllm models``
with the names a self-hosted server gives them."""

from __future__ import annotations

import dataclasses
import hashlib
import random
from typing import Any

import orjson

from ..pricing import Model, load_models
from .words import WORDS


def reply_text(data: Any, model: str, low: int, high: int) -> tuple[str, int]:
    """The deterministic natural reply for a request (before max_tokens): text and token count."""
    digest = hashlib.sha256(orjson.dumps([model, data], option=orjson.OPT_SORT_KEYS)).digest()
    rng = random.Random(digest)
    n = rng.randint(low, max(low, high))
    words = [rng.choice(WORDS) for _ in range(n)]
    if words:
        words[0] = words[0].capitalize()
    return " ".join(words), n


SERVED_ALIASES = {
    "meta-llama/Llama-3.1-70B-Instruct": "meta/llama-3.1-70b-instruct",
    "meta-llama/Llama-3.1-8B-Instruct": "meta/llama-3.1-8b-instruct",
}


def served_models() -> dict[str, Model]:
    """The models of ``batchllm models``, and (as a self-hosted OpenAI-compatible server serves
    the same Llama models under the names vLLM gives them, Hugging Face's) their aliases."""
    models = {m.name: m for m in load_models().values()}
    for alias, name in SERVED_ALIASES.items():
        if name in models:
            models[alias] = dataclasses.replace(models[name], name=alias)
    return models
