"""Which rows may be sent, and what each may cost at most: the same rules for run, estimate,
export-batch and a cluster's actors.

    Admission.reject   refused before sending: no prompt (prompts.py says when a row has none),
                       too long, over the window
    Admission.admit    a batch's rows that may leave: request, exact prompt tokens, worst case

Token counts are exact with the model family's tokenizer (tokens.py), loaded on first use; a row
is only counted when it must be (a budget, a tokens-per-minute limit, packing, or a prompt that
might not fit), and otherwise bounded by its bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import orjson

from ..job import Job
from ..labeling.structured import Formats
from ..pricing import Model
from ..prompts import PromptBatch, RequestMaker, template_fields
from ..providers import Provider
from ..records import Message, Request
from ..tokens import TokenCounter, counter_for

if TYPE_CHECKING:
    from .checks import Prepared


def format_bytes(job: Job) -> int:
    """The bytes of a structured job's ``response_format`` for one row (labeling/structured.py)."""
    assert job.labeling is not None
    return len(orjson.dumps(Formats(job.labeling).row))


ALONE = "no max_tokens makes room"  # a prompt over the window by itself (output.py counts them)


class Rejection(NamedTuple):
    error_class: str
    message: str


class Admission:
    """Which rows may be sent, and what each may cost at most: the same rules for run and estimate."""

    def __init__(
        self, job: Job, provider: Provider, model: Model, prefix: tuple[Message, ...], *, count_all: bool
    ) -> None:
        if job.template is not None:
            fields = template_fields(job.template)
            names = ", ".join(repr(c) for c in fields)
            self.no_prompt = (
                f"the --template's column {names} is empty in row "
                if len(fields) == 1
                else f"the --template's columns ({names}) are all empty in row "
            )
        else:
            self.no_prompt = f"column {job.prompt_column!r} is empty in row "
        self.max_tokens = job.max_tokens
        self.window = model.context_window
        self.max_chars = provider.max_content_chars
        self.prices = model.prices
        self.prefix = prefix
        self.count_all = count_all
        self.model_name = model.name
        # Template tokens without the tokenizer, an upper bound: a token is at least one UTF-8
        # byte. The prefix (system prompt, examples) is measured in bytes once; four bytes a
        # character, which rows are bounded by before they are encoded (needs_count), made a
        # labeling job's worst case, and what a timed-out request may have cost, 4x too high.
        self.bound_overhead = 14 + sum(len(m.content.encode("utf-8")) + 6 for m in self.prefix) + 2
        # What the server's own chat template may add to our count (the budget reserves it), and
        # a structured request's schema, which a server may bill as prompt (OpenAI does): at most
        # a token a byte.
        self.slack = provider.template_slack + (format_bytes(job) if job.structured_output else 0)
        self._counter: TokenCounter | None = None
        self._overhead = 0  # tokens of a request without its user text (``counter`` sets it)
        self._warned = False

    @property
    def counter(self) -> TokenCounter:
        """The model family's counter, loaded on first use (a few hundred ms for Llama 3)."""
        if self._counter is None:
            self._counter = counter_for(self.model_name)
            self._overhead = self._counter.prefix_overhead(self.prefix)
        return self._counter

    @property
    def overhead(self) -> int:
        self.counter  # noqa: B018 - loads the counter, which sets it
        return self._overhead

    @classmethod
    def of(cls, p: Prepared, *, count_all: bool) -> Admission:
        return cls(p.job, p.provider, p.model, p.maker().prefix, count_all=count_all)

    def needs_count(self, text: str | None) -> bool:
        """Count this row exactly? Always for a budget or tpm; else only if it might not fit."""
        if text is None or (self.max_chars is not None and len(text) > self.max_chars):
            return False
        if self.count_all:
            return True
        if self.window is None:
            return False
        return self.bound_overhead + 4 * len(text) + 2 + self.max_tokens > self.window

    def count(self, texts: Sequence[str]) -> list[int]:
        """Exact prompt tokens of whole requests, one per user text."""
        counts = self.counter.texts_tokens(texts)
        return [self._overhead + n for n in counts]

    def reject(
        self,
        user: str | None,
        prompt_tokens: int,
        row: int,
        whole: bool = False,
        max_tokens: int | None = None,
    ) -> Rejection | None:
        """Why a row is refused without a request (``row`` is 1-based), or None to send it.

        ``whole``: the row is a whole request from a request file, its messages checked already.
        """
        if user is None:
            if whole:
                return Rejection("NoPrompt", f"request {row}'s user messages are empty (not sent)")
            return Rejection("NoPrompt", f"{self.no_prompt}{row} (not sent)")
        if not whole and self.max_chars is not None and len(user) > self.max_chars:
            return Rejection(
                "PromptTooLong",
                f"the prompt has {len(user):,} characters, over the API's {self.max_chars:,} (not sent)",
            )
        max_tokens = max_tokens or self.max_tokens
        if self.window is not None and prompt_tokens >= self.window:
            return Rejection(
                "ContextWindowExceeded",
                f"{prompt_tokens:,} prompt tokens are over {self.model_name}'s context window of "
                f"{self.window:,} alone: {ALONE} (not sent; shorten the prompt)",
            )
        if self.window is not None and prompt_tokens + max_tokens > self.window:
            return Rejection(
                "ContextWindowExceeded",
                f"{prompt_tokens:,} prompt tokens + max_tokens {max_tokens:,} = "
                f"{prompt_tokens + max_tokens:,} exceed {self.model_name}'s context window of "
                f"{self.window:,} (not sent)",
            )
        return None

    def admit(
        self,
        pb: PromptBatch,
        send: Sequence[int],
        maker: RequestMaker,
        reject: Callable[[str, str, Rejection], None],
        warn: Callable[[str], None],
    ) -> list[tuple[int, Request, int, int]]:
        """The rows ``send`` of a batch that may leave: (index, request, exact prompt tokens or 0,
        worst-case cost); the others go to ``reject``."""
        users, requests = pb.users, pb.requests
        exact: dict[int, int] = {}
        countable = [i for i in send if self.needs_count(users[i])]
        if requests is not None:  # whole requests: count them all, exactly as sent
            exact = {i: self.counter.count_messages(requests[i].messages) for i in send}
            countable = []
        if countable:
            if not self.counter.exact and not self._warned:
                self._warned = True
                warn(f"token counts are {self.counter.label}")
            counts = self.count([users[i] or "" for i in countable])
            exact = dict(zip(countable, counts, strict=True))
        ready: list[tuple[int, Request, int, int]] = []
        for i in send:
            user = users[i]
            prompt_tokens = exact.get(i, 0)
            given = requests[i] if requests is not None else None
            max_tokens = given.max_tokens if given is not None else None
            refused = self.reject(user, prompt_tokens, pb.start + i + 1, given is not None, max_tokens)
            if refused is not None:
                reject(pb.row_ids[i], pb.hashes[i], refused)
                continue
            assert user is not None
            request = maker.make(user) if given is None else given
            # With or without a cap: a request given up on may have been billed this much.
            worst = self.worst_pico(user, prompt_tokens, max_tokens)
            ready.append((i, request, prompt_tokens, worst))
        return ready

    def prompt_bound(self, user: str, prompt_tokens: int) -> int:
        """The most prompt tokens a row's request may be billed: its exact count, or, not counted
        exactly (no tokenizer for the model, or not counted at all), its bytes, as a token is at
        least one UTF-8 byte; with the server's slack. Run reserves it; estimate's worst case."""
        counter = self._counter
        if counter is not None and counter.exact and prompt_tokens:
            tokens = prompt_tokens
        else:  # not counted exactly: an upper bound
            tokens = self.bound_overhead + len(user.encode("utf-8")) + 2
        return tokens + self.slack

    def worst_pico(self, user: str, prompt_tokens: int, max_tokens: int | None = None) -> int:
        """The most a row may cost: its prompt (exact, or a bound) and max_tokens of reply."""
        if self.prices is None:
            return 0
        return (
            self.prompt_bound(user, prompt_tokens) * self.prices.input_pico
            + (max_tokens or self.max_tokens) * self.prices.output_pico
        )
