"""OpenAI batch files, in and out: the common currency of batch LLM work.

Request file (input), one line per request, as OpenAI's Batch API and vLLM's ``run_batch`` take
it::

    {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "...", "messages": [...], "max_tokens": 16, "temperature": 0}}

``RequestFileBuilder`` turns such lines into ``Request`` values with the same seams a CSV row
goes through: the ``custom_id`` is the row id, a line's own parameters win, the job's options fill
what a line leaves out, ``--model`` overrides, and a field the provider cannot send is a usage
error naming the line, before anything is sent (``check`` reads the whole file once).

``export_lines`` writes the requests a job would send, in this format; ``read_results`` reads
result files (OpenAI's output and error files, or vLLM's single file) into journal entries, so a
job can move between the live and the batch path without losing track of a row or a cent.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa

from ..errors import JobError
from ..inputs import InputFile
from ..job import Job
from ..prompts import PromptBatch, prompt_cache_key
from ..providers import Provider
from ..records import Message, Request

CHAT_URL = "/v1/chat/completions"
# Fields a batch line may carry that are not sampling parameters, and aliases we accept.
_ALIASES = {"max_completion_tokens": "max_tokens"}
_NEVER = {"stream": "batchllm does not stream", "n": "batchllm keeps one choice per request"}


@dataclass(frozen=True, slots=True)
class Line:
    custom_id: str
    number: int
    request: Request


class RequestFileBuilder:
    """The builder for a request file: the same interface as ``prompts.PromptBuilder``."""

    ids_embed_hash = False
    read_columns = ["custom_id", "request", "line"]

    def __init__(self, job: Job, provider: Provider, source: InputFile) -> None:
        self.job = job
        self.provider = provider
        self.path = source.path
        self.defaults = job.params()
        self.order = list(provider.params)
        self.model: str | None = job.model if job.model_given else None
        # A line's leading messages (its own prefix) -> their prompt-cache name: lines may share
        # several prefixes, each counted once (a bounded memo).
        self._prefixes: dict[tuple[str, tuple[tuple[str, str], ...]], str | None] = {}

    def parse(self, raw: str, number: int) -> Line:
        """One line into a ``Request``; a ``JobError`` naming the line and the field if it cannot be sent."""
        where = f"{self.path}: line {number}"
        record = orjson.loads(raw)
        for key in ("method", "url"):
            expected = "POST" if key == "method" else CHAT_URL
            if key in record and record[key] not in (expected, expected.removeprefix("/v1")):
                raise JobError(f"{where}: {key} {record[key]!r}: batchllm sends {expected} requests only")
        body = record.get("body")
        if not isinstance(body, dict):
            raise JobError(f"{where}: no body object")
        messages = _messages(body.get("messages"), where, self.provider.max_content_chars)
        params: dict[str, Any] = {}
        for key, value in body.items():
            if key in ("model", "messages"):
                continue
            name = _ALIASES.get(key) or key
            if (
                name in _NEVER
                and not (name == "n" and value == 1)
                and not (name == "stream" and value is False)
            ):
                raise JobError(f"{where}: body field {key!r}: {_NEVER[name]}")
            parse = self.provider.params.get(name)
            if parse is None:
                if not self.provider.unlisted_models:  # a provider with a closed parameter list
                    raise JobError(
                        f"{where}: body field {key!r} is not a parameter the {self.provider.name} provider "
                        f"can send (it takes {', '.join(self.order)})"
                    )
                params[name] = value  # passed through, as [extra_body] is
                continue
            try:
                params[name] = parse(value)
            except ValueError as exc:
                raise JobError(f"{where}: body field {key!r} {exc}") from None
        model = self.model or body.get("model") or self.job.model
        if not isinstance(model, str):
            raise JobError(f"{where}: body field 'model' must be a string")
        merged = {**self.defaults, **params}
        ordered = {k: merged[k] for k in self.order if k in merged}
        ordered.update((k, v) for k, v in merged.items() if k not in ordered)
        request = Request(self.provider.name, model, messages, ordered, self._cache_key(model, messages))
        return Line(record["custom_id"], number, request)

    def _cache_key(self, model: str, messages: tuple[Message, ...]) -> str | None:
        """The prompt-cache name of a line's leading messages (all but its last)."""
        if len(messages) < 2:
            return None
        lead = messages[:-1]
        memo = (model, tuple((m.role, m.content) for m in lead))
        if memo not in self._prefixes:
            if len(self._prefixes) >= 4096:
                self._prefixes.clear()
            self._prefixes[memo] = prompt_cache_key(self.job, lead, model)
        return self._prefixes[memo]

    def lines(self, batch: pa.RecordBatch) -> list[Line]:
        raws, numbers = batch.column("request").to_pylist(), batch.column("line").to_pylist()
        return [self.parse(raw, number) for raw, number in zip(raws, numbers, strict=True)]

    def check(self, source: InputFile) -> str:
        """Read every line once before anything is sent; returns the file's one model."""
        first: Line | None = None
        for batch in source.batches(self.read_columns):
            for line in self.lines(batch):
                if first is None:
                    first = line
                elif line.request.model != first.request.model:
                    raise JobError(
                        f"{self.path}: line {line.number}: model {line.request.model!r} differs from line "
                        f"{first.number}'s {first.request.model!r}: run one model per file, or pass --model"
                    )
        assert first is not None
        return first.request.model

    def build(self, batch: pa.RecordBatch, start: int) -> PromptBatch:
        lines = self.lines(batch)
        requests = [line.request for line in lines]
        return PromptBatch(
            start,
            [line.custom_id for line in lines],
            [_hash(r) for r in requests],
            [_text(r) for r in requests],
            requests,
        )


def _text(request: Request) -> str | None:
    """All of a request's message text (for size bounds), or None when its user messages are
    empty or only whitespace: such a request is not sent, as an empty CSV prompt is not."""
    if not any(m.content.strip() for m in request.messages if m.role == "user"):
        return None
    return "\n".join(m.content for m in request.messages)


def _hash(request: Request) -> str:
    return request.key()[:16]


def _messages(raw: Any, where: str, max_chars: int | None) -> tuple[Message, ...]:
    if not isinstance(raw, list) or not raw:
        raise JobError(f"{where}: body field 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise JobError(f"{where}: messages[{i}] needs a role")
        content = m.get("content")
        if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" for p in content
        ):
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise JobError(f"{where}: messages[{i}].content must be text")
        if max_chars is not None and len(content) > max_chars:
            raise JobError(
                f"{where}: messages[{i}].content has {len(content):,} characters, over the API's {max_chars:,}"
            )
        out.append(Message(m["role"], content))
    return tuple(out)


def batch_line(custom_id: str, request: Request) -> bytes:
    """One request file line with exactly the messages and parameters ``run`` sends."""
    body = {"model": request.model, "messages": request.messages, **request.params}
    if request.cache_key is not None:  # one prefix's requests on one cache, as a live run sends
        body["prompt_cache_key"] = request.cache_key
    return orjson.dumps({"custom_id": custom_id, "method": "POST", "url": CHAT_URL, "body": body}) + b"\n"


def iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            if raw.strip():
                yield number, raw


def is_results_file(path: Path) -> bool:
    """Is the file's first line a batch result (a ``custom_id`` with a ``response`` or an
    ``error``, no ``body``)? A CSV, Parquet, rows or request file is not; a JSON Lines file that
    cannot be read or parsed is (the results reader names what is wrong)."""
    if path.suffix.lower() in (".csv", ".parquet", ".pq"):
        return False
    try:
        with open(path, "rb") as fh:
            raw = b""
            while not raw.strip():
                raw = fh.readline(1 << 24)  # a bound for a file that is no JSON Lines at all
                if not raw:
                    return True
            record = orjson.loads(raw)
    except (OSError, orjson.JSONDecodeError):
        return True
    if not isinstance(record, dict):
        return False
    return "custom_id" in record and ("response" in record or "error" in record) and "body" not in record


def result_body(record: Mapping[str, Any]) -> tuple[int | None, Any]:
    """(status, body) of a result line: OpenAI's envelope, or vLLM's flat ``response``."""
    response = record.get("response")
    if not isinstance(response, dict):
        return None, None
    if "choices" in response:  # vLLM's README: the completion itself, no envelope
        return 200, response
    status = response.get("status_code")
    return (status if isinstance(status, int) else None), response.get("body")


def result_logprobs(record: dict[str, Any]) -> list[Any] | None:
    """A result line's ``choices[0].logprobs.content``, when the request asked for them."""
    body = result_body(record)[1]
    choices = body.get("choices") if isinstance(body, dict) else None
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    logprobs = choice.get("logprobs")
    tokens = logprobs.get("content") if isinstance(logprobs, dict) else None
    return tokens if isinstance(tokens, list) else None


def result_message(body: Any, error: Any) -> str | None:
    if isinstance(body, dict):
        inner = body.get("error")
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if isinstance(inner, str):
            return inner
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    if isinstance(error, str) and error:
        return error
    return None
