"""``batchllm review import``: reviewers' verdicts onto the output's rows.

Every verdict is checked before anything is written: one for a row the output does not hold is
a usage error naming it, and nothing is imported. Verdicts go to the journal (verdicts.py), then
the output file gets its review columns again, rewritten atomically from itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from ..engine.journal import Journal
from ..engine.lock import RunLock
from ..errors import JobError
from ..labeling.spec import Labeling
from ..reports.status import find_journal
from .export import job_of
from .studio import LABEL
from .studio_api import Studio, studio_key
from .verdicts import read_export, review_columns, review_fields, reviews_for, store, verdicts_of


@dataclass
class Imported:
    verdicts: int  # in the export
    changed: int  # new or different from what the journal held
    outside: list[str]  # reviewed labels outside the label set (kept: reviewers add labels)
    reviewed: int  # rows of the output with a verdict, after this import


def import_verdicts(
    output: Path, source: str, project: str | None = None, command: str = "batchllm review import"
) -> Imported:
    """Verdicts from ``source``: a Label Studio JSON export file, or a Label Studio URL (with
    ``project``, the key in ``LABEL_STUDIO_API_KEY``)."""
    labeling, _, settings = job_of(output)
    export = source
    if source.startswith(("http://", "https://")):
        if project is None:
            raise JobError("--from URL needs --project NAME: the project the tasks went to")
        studio = Studio(source, studio_key())
        found = studio.project(project)
        if found is None:
            raise JobError(f"Label Studio at {studio.base} has no project {project!r}")
        where = f"{studio.base} project {project!r}"
        verdicts = verdicts_of(studio.export(found), labeling, where, studio.people())
        export = f"{studio.base} project {project!r}"
    else:
        verdicts = read_export(Path(source), labeling)
    directory = find_journal(output)
    lock = RunLock(directory)
    lock.acquire(command)
    try:
        journal = Journal.open(directory, settings)
        try:
            known = journal.fetch([v.row_id for v in verdicts])
            unknown = next((v.row_id for v in verdicts if v.row_id not in known), None)
            if unknown is not None:
                raise JobError(
                    f"{export}: a verdict for row_id {unknown!r}, which {output} does not hold (nothing imported)"
                )
            changed = store(journal.conn, verdicts)
            outside = sorted(
                {
                    str(v.value[LABEL])
                    for v in verdicts
                    if LABEL in v.value and v.value[LABEL] not in labeling.labels
                }
            )
            reviewed = _rewrite(output, journal, labeling)
        finally:
            journal.close()
    finally:
        lock.release()
    return Imported(len(verdicts), changed, outside, reviewed)


def _rewrite(output: Path, journal: Journal, labeling: Labeling) -> int:
    """The output with its review columns made anew from the journal; rows reviewed."""
    table = pq.read_table(output)
    fields = review_fields(labeling)
    table = table.drop_columns([f.name for f in fields if f.name in table.column_names])
    row_ids = table.column("row_id").to_pylist()
    names = [f.name for f in labeling.fields] or [LABEL]
    model = {name: table.column(name).to_pylist() for name in names}
    verdicts = reviews_for(journal.conn, row_ids)
    for field, column in zip(fields, review_columns(row_ids, model, verdicts, labeling), strict=True):
        table = table.append_column(field, column)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.review.tmp")
    pq.write_table(table, tmp, compression="zstd")  # the schema keeps the run summary
    os.replace(tmp, output)
    return sum(1 for r in row_ids if r in verdicts)
