"""What a job will send: the checks before anything leaves, and the work, a batch at a time.

    prepare(job)  -> Prepared   provider, model and prices, input, columns, ids (JobError if bad)
    Admission                   per row: refused before sending, and its worst case (admission.py)
    Plan.items(journal)         rows not done yet -> WorkItems, lazily, one input batch at a time

The plan is pulled by the dispatcher's workers, so memory holds one input batch however long the
input is, and rows the journal already has cost one SQLite join per batch, not Python per row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import JobError
from ..inputs import InputFile
from ..job import Job
from ..labeling.rows import Attempt
from ..pricing import Model, resolve_model
from ..prompts import Builder, PromptBatch, PromptBuilder, RequestMaker, load_examples
from ..providers import Provider, get_provider
from ..records import Message, Request
from .admission import Admission, Rejection
from .journal import CARRY_ENTRY, RESUME_ATTEMPTS, Journal
from .output import check_no_clash
from .reuse import Reuse

# Rows made ready at a time. The workers wait while a chunk is prepared (about 5 us a row), so a
# chunk is kept well under what the requests in flight take to come back; 1,024 ran as fast as
# 8,192 at zero latency (make bench), with an eighth of the pause.
CHUNK = 1024


class WorkItem(NamedTuple):
    row_id: str
    content_hash: str
    request: Request
    body: bytes
    prompt_tokens: int  # exact estimate, or 0 when not counted
    worst_pico: int  # the most this row may cost; 0 when no budget
    prior: tuple[Attempt, ...] = ()  # a labeling row's requests journaled by an earlier run
    retry: bool = False  # sent again after it ended invalid (--retry-errors): fresh re-asks
    key: str = ""  # Request.key(): identical rows share one request (reuse.py)


class Pack(NamedTuple):
    """Rows a worker labels together, several per request (``--pack``, engine/packed.py)."""

    items: tuple[WorkItem, ...]
    row_id: str  # its first row's: the pool names work by a row
    key: str = ""  # the rows' own keys are in ``items``


class Setup(Protocol):
    """What a summary needs of a run's preparation (``Prepared``, or a cluster run's)."""

    job: Job
    provider: Provider
    model: Model


@dataclass
class Prepared:
    """Everything checked before a request may leave."""

    job: Job
    provider: Provider
    model: Model
    source: InputFile
    builder: Builder
    rows: int
    examples: tuple[Message, ...] = ()

    def maker(self) -> RequestMaker:
        return RequestMaker(self.job, self.examples)


def prepare(job: Job) -> Prepared:
    """Check the job against its provider and input: model, prices, file, columns, ids."""
    provider = get_provider(job.provider)
    source = InputFile(job.input, job.input_format, job.delimiter, job.encoding)
    builder: Builder
    if source.format == "jsonl":
        from ..backends.openai_batch import RequestFileBuilder

        rows = source.count_rows()  # valid JSON, custom_ids present and unique
        if rows == 0:
            raise JobError(f"{job.input}: the request file has no lines")
        request_builder = RequestFileBuilder(job, provider, source)
        model_name = request_builder.check(source)
        if model_name != job.model:
            job = replace(job, model=model_name)
        builder = request_builder
    else:
        builder = PromptBuilder(job, source.columns, str(job.input), source.delimiter_hint)
        check_no_clash(source.columns, str(job.input))
        rows = source.count_rows()
        if rows == 0:
            raise JobError(f"{job.input}: the file has a header but no rows")
        builder.check_some_prompt(source.batches(builder.read_columns), rows)
        if job.id_column is not None:
            _check_unique_ids(source, job.id_column)
    model = check_model(job, provider)
    check_labeling_clash(job, source.output_columns, str(job.input))
    return Prepared(job, provider, model, source, builder, rows, load_examples(job))


def check_model(job: Job, provider: Provider) -> Model:
    """The job's model and prices, checked against its max_tokens and budget."""
    model = resolve_model(provider.name, job.model, prices=job.prices, unlisted_ok=provider.unlisted_models)
    if model.context_window is not None and job.max_tokens >= model.context_window:
        raise JobError(
            f"--max-tokens {job.max_tokens} leaves no room in {model.name}'s window of "
            f"{model.context_window:,} tokens"
        )
    if job.budgeted and model.prices is None:
        raise JobError(
            f"--max-cost needs prices: {model.name!r} is not in the {provider.name} model table, so "
            "give --input-price and --output-price (USD per million tokens)"
        )
    return model


def check_labeling_clash(job: Job, columns: Sequence[str], source: str) -> None:
    if job.labeling is not None:
        clash = [c.name for c in job.labeling.columns() if c.name in columns]
        if clash:
            raise JobError(
                f"{source}: input column {clash[0]!r} has the name of a labeling output column; rename it"
            )


def _check_unique_ids(source: InputFile, column: str) -> None:
    chunks = [b.column(0).cast(pa.string()) for b in source.batches([column])]
    ids = pa.chunked_array(chunks, type=pa.string())
    if pc.count_distinct(ids, mode="all").as_py() == len(ids):
        return
    counts = pc.value_counts(ids)
    dup = next(v["values"] for v in counts.to_pylist() if v["counts"] > 1)
    first = pc.index(ids, dup).as_py()
    raise JobError(
        f"{source.path}: the --id-column {column!r} value {dup!r} appears more than once "
        f"(first at row {first + 1}); ids must be unique"
    )


class Plan:
    """The rows one run sends, decided against the journal as the dispatcher pulls them."""

    def __init__(self, p: Prepared, warn: Callable[[str], None], only: frozenset[int] | None = None) -> None:
        self.p = p
        self.job = p.job
        self.warn = warn
        self.only = only  # a pilot runs only these input positions (reports/estimate.py)
        # Packing rows (--pack) fills requests by tokens: every row is counted.
        packing = p.job.labeling is not None and p.job.labeling.pack > 1
        self.admission = Admission.of(p, count_all=p.job.budgeted or p.job.tpm is not None or packing)

    def _decide(
        self, journal: Journal, quiet: bool = False
    ) -> Iterator[tuple[PromptBatch, Sequence[int], set[int], dict[int, int]]]:
        """Per chunk of input: the chunk made ready, the indexes of its rows to send, which of
        those are sent again after their answers never validated, and the rows sent again while
        the journal holds an entry for them (index -> how the entry's cost is kept, journal.py)."""
        job, builder = self.job, self.p.builder
        shared = changed_kept = 0
        resuming = journal.rows_before > 0
        labeling = job.labeling is not None
        for pb in self._built():
            if not resuming:
                every: Sequence[int] = range(len(pb.row_ids))
                if self.only is not None:
                    every = [i for i in every if pb.start + i in self.only]
                yield pb, every, set(), {}
                continue
            unfinished = journal.unfinished(pb.row_ids, None if builder.ids_embed_hash else pb.hashes)
            send: list[int] = []
            invalid: set[int] = set()
            replaces: dict[int, int] = {}
            new = 0
            for i, status, same in unfinished:
                if status is None:
                    new += 1
                elif status == "ok":  # same id, other content
                    if not job.refresh_changed:
                        changed_kept += 1
                        continue
                    replaces[i] = CARRY_ENTRY
                elif not job.retry_errors:
                    continue
                else:
                    if status == "invalid":
                        invalid.add(i)
                    # A labeling row with the same content goes on from its replies (a re-ask);
                    # any other row starts over, its earlier cost carried.
                    replaces[i] = RESUME_ATTEMPTS if labeling and same else CARRY_ENTRY
                send.append(i)
            shared += len(pb.row_ids) - new
            if self.only is not None:
                send = [i for i in send if pb.start + i in self.only]
            yield pb, send, invalid, replaces
        if quiet:
            return
        if resuming and shared == 0:
            self.warn(
                f"the input shares no rows with the journal in {journal.directory} "
                "(did the input or --id-column change?): every row is sent as new"
            )
        if changed_kept:
            self.warn(
                f"{changed_kept:,} rows changed under the same --id-column value and kept their "
                "earlier results; pass --refresh-changed to send them again"
            )

    def _built(self) -> Iterator[PromptBatch]:
        """The input made ready, a ``CHUNK`` of rows at a time (see ``CHUNK``)."""
        builder, position = self.p.builder, 0
        for batch in self.p.source.batches(builder.read_columns):
            for offset in range(0, batch.num_rows, CHUNK):
                piece = batch.slice(offset, CHUNK)
                yield builder.build(piece, position)
                position += piece.num_rows

    def todo(self, journal: Journal) -> int:
        """Rows left to send, for the progress bar: from the journal's counts, without a second
        pass over the input, except with --refresh-changed (which rows changed, only a pass says)."""
        if self.job.reparse:
            return 0  # replies are read again; nothing is sent
        if self.only is not None:
            return len(self.only)
        if journal.rows_before == 0:
            return self.p.rows
        if self.job.refresh_changed:
            return sum(len(send) for _, send, _, _ in self._decide(journal, quiet=True))
        counts = journal.counts_before
        done = counts.get("ok", 0) + (
            0 if self.job.retry_errors else counts.get("error", 0) + counts.get("invalid", 0)
        )
        return max(0, self.p.rows - done)

    def items(
        self, journal: Journal, reject: Callable[[str, str, Rejection], None], reuse: Reuse | None = None
    ) -> Iterator[WorkItem]:
        """WorkItems for the rows to send; rows refused before sending go to ``reject``, and rows
        another row or the cache answers are recorded by ``reuse`` instead of being sent."""
        admission, provider = self.admission, self.p.provider
        maker = self.p.maker()
        budget = self.job.budgeted
        labeling = self.job.labeling is not None
        for pb, send, invalid, replaces in self._decide(journal):
            row_ids, hashes = pb.row_ids, pb.hashes
            prior: dict[str, list[Attempt]] = {}
            if labeling and (journal.has_attempts or replaces):
                resumed = [row_ids[i] for i in send if replaces.get(i, RESUME_ATTEMPTS) == RESUME_ATTEMPTS]
                prior = journal.attempts_for(resumed)
                prior.update(journal.first_attempts([r for r in resumed if r not in prior]))
            for i, how in replaces.items():
                journal.replacing[row_ids[i]] = how
            ready = admission.admit(pb, send, maker, reject, budget, self.warn)
            keys: Sequence[str | None] = [""] * len(ready)
            if reuse is not None and ready:
                keys = reuse.screen([(row_ids[i], hashes[i], r) for i, r, _, _ in ready])
            for (i, request, prompt_tokens, worst), key in zip(ready, keys, strict=True):
                if key is None:
                    continue  # answered by another row, or by the cache
                yield WorkItem(
                    row_ids[i],
                    hashes[i],
                    request,
                    provider.encode(request),
                    prompt_tokens,
                    worst,
                    tuple(prior.get(row_ids[i], ())),
                    i in invalid,
                    key,
                )
