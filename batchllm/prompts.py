"""Rows -> prompts -> ``Request`` values. Pure functions of the job and the data; no I/O.

A prompt is either one column's text (``--prompt-column``) or a template filled from columns
(``--template "Classify: {review}"``). Templates are compiled once to positional ``str.format``
strings, so filling a row is one C-level call.

A row has no prompt, and is never sent (admission.py refuses it, in every input format), when
its prompt column is null, empty or only whitespace; with a template, when every column the
template names is: the template's own words alone ask nothing of the row. One filled column is
enough to send the row.

Every row gets a ``row_id`` that is stable across runs: the ``--id-column`` value when given, or
else ``<position>-<hash of the prompt>``, so rows appended to an input keep the ids of those before
them and an edited row gets a new id (and is sent again). ``content_hash`` is the prompt's hash
alone, kept by the journal to notice an edited row under an unchanged ``--id-column`` value.

``RequestMaker`` turns a prompt into a provider-neutral ``Request`` (records.py): the system
message and the parameters are built once per run and shared by every row; the provider encodes
it into its body (providers/).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from .errors import JobError
from .inputs import delimiter_hint
from .job import Job
from .labeling.confidence import LOGPROBS, TOP, TOP_LOGPROBS
from .labeling.structured import PARAM, Formats
from .providers import get_provider
from .records import Message, Request
from .tokens import counter_for


@dataclass(frozen=True, slots=True)
class PromptBatch:
    """One input batch made ready to send: per row its id, content hash and user text.

    ``users[i]`` is None when the row has no prompt (its prompt column, or every column of
    its template, null, empty or only whitespace; see the module's docstring).
    ``requests`` is set when the input carries whole requests (a request file): then
    ``users[i]`` is all of the request's message text, for size bounds.
    """

    start: int
    row_ids: list[str]
    hashes: list[str]
    users: list[str | None]
    requests: list[Request] | None = None


# A "column" a template names with quotes, a colon or spaces in it is most likely literal text
# in braces (JSON in the prompt): the hint says how to write a brace.
_NOT_A_NAME = re.compile(r"[\"':\s]")
_BRACES = "; to write a literal brace, double it: {{ and }}"


def _case_hint(missing: str, columns: Sequence[str]) -> str:
    """A column named with other capitals ({Review} for review): the one meant, said."""
    same = [c for c in columns if c.lower() == missing.lower()]
    return f" (did you mean {same[0]!r}? names match case for case)" if same else ""


def template_fields(template: str) -> list[str]:
    """Column names a template refers to, in order of first use."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise JobError(f"--template: {exc} (write a literal brace as {{{{ or }}}})") from None
    names: list[str] = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise JobError("--template: every {} must name a column, e.g. {review}")
        if name not in names:
            names.append(name)
    return names


def template_head(template: str | None) -> str:
    """The template's text before its first column: the same in every row's prompt."""
    if not template:
        return ""
    for literal, _, _, _ in string.Formatter().parse(template):
        return literal
    return ""


def _positional(template: str, names: list[str]) -> str:
    out = []
    for literal, name, spec, conversion in string.Formatter().parse(template):
        out.append(literal.replace("{", "{{").replace("}", "}}"))
        if name is not None:
            out.append("{" + str(names.index(name)))
            if conversion:
                out.append("!" + conversion)
            if spec:
                out.append(":" + spec)
            out.append("}")
    return "".join(out)


def content_hash(text: str | None) -> str:
    if text is None:
        return "null"
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


class Builder(Protocol):
    """Turns input batches into ``PromptBatch``es: ``prompts.PromptBuilder`` for CSV and Parquet
    rows, ``backends.openai_batch.RequestFileBuilder`` for request files."""

    ids_embed_hash: bool

    @property
    def read_columns(self) -> list[str]: ...

    def build(self, batch: pa.RecordBatch, start: int) -> PromptBatch: ...


class PromptBuilder:
    """Turns record batches into ``PromptBatch``es for one job."""

    def __init__(
        self, job: Job, columns: list[str], source: str, hint: Callable[[list[str]], str] | None = None
    ) -> None:
        # Position-derived ids embed the content hash; --id-column values do not, so resume
        # compares the hash too (an edited row under the same id).
        self.ids_embed_hash = job.id_column is None
        self.template = job.template
        self.id_column = job.id_column
        if job.template is not None:
            self.columns = template_fields(job.template)
            if not self.columns:
                raise JobError("--template names no column: every row would get the same prompt")
            self._format = _positional(job.template, self.columns).format
            what = "named in --template"
        else:
            self.columns = [job.prompt_column]
            what = "the --prompt-column"
        # ``hint``: the input's own guess at a delimiter that would have these columns.
        hint = hint or (lambda _: delimiter_hint(columns))
        missing = [c for c in self.columns if c not in columns]
        if missing:
            raise JobError(
                f"{source}: no column {missing[0]!r} ({what}); the columns are: "
                + ", ".join(repr(c) for c in columns)
                + (_BRACES if job.template is not None and _NOT_A_NAME.search(missing[0]) else hint(missing))
                + _case_hint(missing[0], columns)
            )
        if job.id_column is not None and job.id_column not in columns:
            raise JobError(
                f"{source}: no column {job.id_column!r} (the --id-column); the columns are: "
                + ", ".join(repr(c) for c in columns)
                + hint([job.id_column])
            )
        self.source = source

    @property
    def read_columns(self) -> list[str]:
        """The input columns needed to build prompts and ids."""
        cols = list(self.columns)
        if self.id_column is not None and self.id_column not in cols:
            cols.append(self.id_column)
        return cols

    def _filled(self, columns: list[pa.Array]) -> pa.Array:
        """Per row: does it have a prompt (the module's docstring)?"""
        filled = _has_text(columns[0])
        for column in columns[1:]:
            filled = pc.or_(filled, _has_text(column))
        return filled

    def check_some_prompt(self, batches: Iterable[pa.RecordBatch], rows: int) -> None:
        """A ``JobError`` when no row has a prompt (a wrong --prompt-column, say), rather than a
        run that sends nothing and succeeds; stops reading at the first row that has one."""
        for batch in batches:
            if pc.any(self._filled([batch.column(name) for name in self.columns])).as_py():
                return
        what = (
            f"column {self.columns[0]!r} is"
            if self.template is None
            else "every column the --template names (" + ", ".join(map(repr, self.columns)) + ") is"
        )
        raise JobError(
            f"{self.source}: {what} empty (null or only whitespace) in all {rows:,} rows: nothing to send"
        )

    def users(self, batch: pa.RecordBatch) -> list[str | None]:
        """Each row's user text, or None when it has no prompt (the module's docstring)."""
        columns = [batch.column(name) for name in self.columns]
        keep = self._filled(columns).to_pylist()
        if self.template is None:
            values = columns[0].to_pylist()
            return [
                (v if isinstance(v, str) else str(v)) if k else None
                for v, k in zip(values, keep, strict=True)
            ]
        cols = [_text_column(column) for column in columns]
        fmt = self._format
        return [fmt(*vals) if k else None for k, *vals in zip(keep, *cols, strict=True)]

    def build(self, batch: pa.RecordBatch, start: int) -> PromptBatch:
        users = self.users(batch)
        hashes = [content_hash(u) for u in users]
        if self.id_column is None:
            ids = [f"{start + i}-{h}" for i, h in enumerate(hashes)]
        else:
            raw = batch.column(self.id_column).to_pylist()
            for i, value in enumerate(raw):
                if value is None or value == "":
                    raise JobError(
                        f"{self.source}: row {start + i + 1} has no value in the --id-column "
                        f"{self.id_column!r}"
                    )
            ids = [v if isinstance(v, str) else str(v) for v in raw]
        return PromptBatch(start, ids, hashes, users)


def _has_text(column: pa.Array) -> pa.Array:
    """Per row: is there something in this cell besides whitespace? (False for a null.)"""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return pc.fill_null(pc.not_equal(pc.utf8_trim_whitespace(column), ""), False)
    return column.is_valid()


def _text_column(column: pa.Array) -> list[str]:
    """A column as template values: text as is, nulls as "", other types via str()."""
    values = column.to_pylist()
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return ["" if v is None else v for v in values]
    return ["" if v is None else str(v) for v in values]


class RequestMaker:
    """Makes the ``Request`` for one prompt: ``[system], [examples], user`` with the job's parameters.

    The system prompt carries the labeling instruction (``Job.full_system``); few-shot examples
    are prior user/assistant turns (``load_examples``); a structured labeling job's parameters end
    with its ``response_format`` (labeling/structured.py).
    """

    def __init__(self, job: Job, examples: tuple[Message, ...] = ()) -> None:
        self.provider = job.provider
        self.model = job.model
        self.params = job.params()
        if job.structured_output:  # the same format for every row: built once, shared
            assert job.labeling is not None
            self.params = {**self.params, PARAM: Formats(job.labeling).row}
        if job.logprobs:  # a labeling row's confidence (labeling/confidence.py)
            self.params = {**self.params, LOGPROBS: True}
            if job.structured_output:  # its alternatives: the value among those the schema allows
                self.params = {**self.params, TOP_LOGPROBS: TOP}
        system = job.full_system
        self.prefix: tuple[Message, ...] = (() if system is None else (Message("system", system),)) + examples
        # What every row's prompt opens with, as the server's cache matches it (token by token):
        # the messages before the row's, and the template's text before its first column.
        head = template_head(job.template)
        self.cache_prefix = self.prefix + ((Message("user", head),) if head else ())
        self.cache_key = prompt_cache_key(job, self.cache_prefix)

    def make(self, user: str) -> Request:
        return Request(
            self.provider, self.model, (*self.prefix, Message("user", user)), self.params, self.cache_key
        )


def prompt_cache_key(job: Job, prefix: tuple[Message, ...], model: str | None = None) -> str | None:
    """The name of a job's shared prefix for the server's prompt cache, when it is long enough to
    be cached (the provider's ``prompt_cache_min``), else None: a short hash of the job's name,
    the model and the prefix, the same in every run (never anything secret)."""
    minimum = get_provider(job.provider).prompt_cache_min
    if minimum is None or not prefix:
        return None
    model = model or job.model
    if counter_for(model).count_messages(prefix) < minimum:
        return None
    digest = hashlib.blake2b(orjson.dumps([job.name, model, prefix]), digest_size=8)
    return "batchllm-" + digest.hexdigest()


def load_examples(job: Job) -> tuple[Message, ...]:
    """Few-shot turns from ``--examples``: each row's prompt (the job's template or prompt column)
    as a user turn, its ``label`` column (or the schema's fields, as JSON) as the answer."""
    from .inputs import InputFile

    if job.examples is None or job.labeling is None:
        return ()
    source = InputFile(job.examples, kind="examples file")  # UTF-8 (or marked): --encoding is the input's
    builder = PromptBuilder(dataclasses.replace(job, id_column=None), source.columns, str(job.examples))
    labeling = job.labeling
    wanted = [f.name for f in labeling.fields] if labeling.is_schema else ["label"]
    missing = [c for c in wanted if c not in source.columns]
    if missing:
        raise JobError(f"{job.examples}: no column {missing[0]!r} (the examples' answers)")
    turns: list[Message] = []
    for batch in source.batches():
        users = builder.users(batch.select(builder.read_columns))
        answers = batch.select(wanted).to_pylist()
        for n, (user, answer) in enumerate(zip(users, answers, strict=True), 1):
            if user is None:
                raise JobError(f"{job.examples}: example {n} has no prompt")
            if labeling.is_schema:
                text = orjson.dumps({k: answer[k] for k in wanted}).decode()
            else:
                text = str(answer["label"])
                if text not in labeling.labels:
                    raise JobError(f"{job.examples}: example {n}'s label {text!r} is not in the label set")
            turns += [Message("user", user), Message("assistant", text)]
    return tuple(turns)
