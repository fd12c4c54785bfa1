"""``export-batch``: the requests a run would send, as OpenAI batch request files.

    input + job [+ an output's journal] -> request file(s), one line per row (or pack) still to do

It goes through the same seams as a run: ``plan.prepare`` checks the job, ``Admission`` refuses
what a run would refuse, and each line holds exactly the ``Request`` a run would send.
``import-batch`` (batch_transfer.py) brings the replies home; the key of each row's request is
written down as it is exported (batch_keys.py), so a reply to a request the job no longer sends
is refused there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ..engine.admission import Admission
from ..engine.checks import Prepared, prepare
from ..engine.journal import Journal
from ..engine.packed import packs_for
from ..fleet import FleetEndpoint
from ..folders import make_folders
from ..job import Job
from ..reports.status import find_journal
from .batch_keys import ExportBook, Row
from .batch_packs import packed_lines
from .openai_batch import batch_line

MAX_LINES = 50_000  # the OpenAI Batch API's limits per file
MAX_BYTES = 200 * 1024 * 1024


@dataclass
class Exported:
    files: list[Path] = field(default_factory=list)
    lines: int = 0
    skipped_done: int = 0
    refused: int = 0
    made_folder: Path | None = None  # the folder made for the file (folders.py)
    note: str | None = None  # why the rows exported could not be written down (batch_keys.py)


def request_rows(p: Prepared, journal: Journal | None) -> Any:
    """(position, row_id, content_hash, Request | None) for every input row a run would send, in
    order (None: a run would refuse it)."""
    admission = Admission.of(p, count_all=False)
    maker = p.maker()
    position = 0
    for batch in p.source.batches(p.builder.read_columns):
        pb = p.builder.build(batch, position)
        position += batch.num_rows
        keep: range | list[int] = range(len(pb.row_ids))
        if journal is not None:
            hashes = None if p.builder.ids_embed_hash else pb.hashes
            keep = [i for i, status, _ in journal.unfinished(pb.row_ids, hashes) if status is None]
        for i in keep:
            request = pb.requests[i] if pb.requests is not None else None
            user = pb.users[i]
            if request is None and user is not None:
                request = maker.make(user)
            tokens = 0
            if request is not None and admission.window is not None:
                tokens = admission.counter.count_messages(request.messages)
            max_tokens = request.max_tokens if request is not None else None
            refused = admission.reject(user, tokens, pb.start + i + 1, pb.requests is not None, max_tokens)
            yield pb.start + i, pb.row_ids[i], pb.hashes[i], None if refused else request


def export_batch(
    job: Job,
    path: Path,
    *,
    skip_done: Path | None,
    max_lines: int,
    max_bytes: int,
    via: FleetEndpoint | None = None,
) -> Exported:
    """Write the requests a run would send as OpenAI batch request lines, split to fit the limits.
    ``via``: a fleet's endpoint the file is for (its model's name in every line)."""
    p = prepare(job)
    journal = Journal.open_readonly(find_journal(skip_done)) if skip_done is not None else None
    result = Exported()
    parts: list[Path] = []
    result.made_folder = make_folders(path, "--output")
    out = None
    lines = size = 0
    # What each row is exported as: import-batch refuses replies to requests since changed.
    asked = via.model.name if via is not None else None
    book = ExportBook(job.input, asked, made_for=asked or p.model.name)
    try:
        for line in _lines(p, book.noting(request_rows(p, journal)), result):
            if via is not None and via.model.name != p.model.name:
                record = orjson.loads(line)
                record["body"]["model"] = via.model.name
                line = orjson.dumps(record) + b"\n"
            if out is None or lines + 1 > max_lines or size + len(line) > max_bytes:
                if out is not None:
                    out.close()
                parts.append(path.with_name(f".{path.name}.part{len(parts) + 1}.tmp"))
                out = open(parts[-1], "wb")  # noqa: SIM115 - closed as parts roll over
                lines = size = 0
            out.write(line)
            lines += 1
            size += len(line)
            result.lines += 1
    finally:
        book.close()
        result.note = book.problem
        if out is not None:
            out.close()
        if journal is not None:
            result.skipped_done = sum(journal.status_counts().values())
            journal.conn.close()
    if len(parts) == 1:
        result.files = [path]
    else:
        result.files = [path.with_name(f"{path.stem}.{k:03d}{path.suffix}") for k in range(1, len(parts) + 1)]
    for tmp, final in zip(parts, result.files, strict=True):
        os.replace(tmp, final)
    if not parts:  # nothing left to do: an empty file says so
        path.write_bytes(b"")
        result.files = [path]
    return result


def _lines(p: Prepared, rows: Iterator[Row], result: Exported) -> Iterator[bytes]:
    """The request lines: one per row, or one per pack of rows (``--pack``, batch_packs.py)."""

    def refused() -> None:
        result.refused += 1

    packs = packs_for(p)
    if packs is not None:
        yield from packed_lines(rows, packs, refused)
        return
    for _, row_id, _, request in rows:
        if request is None:
            refused()
            continue
        yield batch_line(row_id, request)
