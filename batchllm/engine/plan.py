"""What a job will send, once checked (checks.py): the work, a batch at a time.

    prepare(job)  -> Prepared   provider, model and prices, input, columns, ids (checks.py)
    Admission                   per row: refused before sending, and its worst case (admission.py)
    Plan.items(journal)         rows not done yet -> WorkItems, lazily, one input batch at a time

The plan is pulled by the dispatcher's workers, so memory holds one input batch however long the
input is, and rows the journal already has cost one SQLite join per batch, not Python per row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple, Protocol

from ..job import Job
from ..labeling.rows import Attempt
from ..pricing import Model
from ..prompts import PromptBatch
from ..providers import Provider
from ..records import Request
from . import outside
from .admission import Admission, Rejection
from .checks import Prepared
from .counts import plural
from .journal import CARRY_ENTRY, RESUME_ATTEMPTS, TRANSIENT, Journal
from .journal_schema import TRANSIENT_SQL
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
    worst_pico: int  # the most this row may cost (0: the model has no prices)
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


class Plan:
    """The rows one run sends, decided against the journal as the dispatcher pulls them."""

    def __init__(self, p: Prepared, warn: Callable[[str], None], only: frozenset[int] | None = None) -> None:
        self.p = p
        self.job = p.job
        self.warn = warn
        self.only = only  # a pilot runs only these input positions (reports/estimate.py)
        # Packing rows (--pack) fills requests by tokens: every row is counted; so is every row
        # with prices, for its worst case (a cap's, and what a request given up on may cost).
        packing = p.job.labeling is not None and p.job.labeling.pack > 1
        priced = p.model.prices is not None
        self.admission = Admission.of(p, count_all=priced or p.job.tpm is not None or packing)

    def _decide(
        self, journal: Journal, quiet: bool = False
    ) -> Iterator[tuple[PromptBatch, Sequence[int], set[int], dict[int, int]]]:
        """Per chunk of input: the chunk made ready, the indexes of its rows to send, which of
        those are sent again after their answers never validated, and the rows sent again while
        the journal holds an entry for them (index -> how the entry's cost is kept, journal.py)."""
        job, builder = self.job, self.p.builder
        shared = changed_kept = 0
        kept_ids: list[str] = []  # the first few, named in the warning
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
                        if len(kept_ids) < 3:
                            kept_ids.append(pb.row_ids[i])
                        continue
                    replaces[i] = CARRY_ENTRY
                elif not job.retry_errors and status != TRANSIENT:  # the server's failure: sent again
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
                + (
                    "(without an --id-column a row's id is its position and text: rows removed or "
                    "inserted before it change it; an input that changes so needs an --id-column): "
                    "every row is new, and one the journal holds an identical reply for is answered "
                    "by it, not sent"
                    if builder.ids_embed_hash
                    else "(did the input or --id-column change?): every row is sent as new"
                )
            )
        if changed_kept:
            named = ", ".join(repr(r) for r in kept_ids) + (", ..." if changed_kept > len(kept_ids) else "")
            self.warn(
                f"{plural(changed_kept, 'row')} changed under the same --id-column value ({named}) and kept "
                "their earlier results, which are of the text before; pass --refresh-changed to send them again"
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
        """Rows left to send, for the header and the progress bar: from the journal's counts,
        without a second pass over the input, except with --refresh-changed (which rows changed,
        only a pass says) or when the journal was not counted against this input (outside.py)."""
        if self.job.reparse:
            return 0  # replies are read again; nothing is sent
        if self.only is not None:
            return len(self.only)
        if journal.rows_before == 0:
            return self.p.rows
        # Rows the journal holds and the input does not are not done rows of it (outside.py).
        gone = outside.known(journal, self.job.input)
        if self.job.refresh_changed or gone is None:
            return sum(len(send) for _, send, _, _ in self._decide(journal, quiet=True))
        counts = journal.counts_before
        done = counts.get("ok", 0) - gone.ok
        if not self.job.retry_errors:  # failed rows stay failed, but the server's failures go again
            transient = journal.conn.execute(
                f"SELECT COUNT(*) FROM rows WHERE status = 'error' AND {TRANSIENT_SQL}"
            )
            done += (
                counts.get("error", 0)
                - gone.error
                - transient.fetchone()[0]
                + counts.get("invalid", 0)
                - gone.invalid
            )
        return max(0, self.p.rows - done)

    def items(
        self, journal: Journal, reject: Callable[[str, str, Rejection], None], reuse: Reuse | None = None
    ) -> Iterator[WorkItem]:
        """WorkItems for the rows to send; rows refused before sending go to ``reject``, and rows
        another row or the cache answers are recorded by ``reuse`` instead of being sent."""
        admission, provider = self.admission, self.p.provider
        maker = self.p.maker()
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
            ready = admission.admit(pb, send, maker, reject, self.warn)
            if pb.requests is not None:  # lines of several prefixes: each one's together (warmup.py)
                ready.sort(key=lambda r: r[1].cache_key or "")
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
