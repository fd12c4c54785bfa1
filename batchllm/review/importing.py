"""``batchllm review import``: reviewers' verdicts onto the output's rows.

Every verdict is checked before anything is written: one for a row the output does not hold is
a usage error naming it, and nothing is imported. Verdicts go to the journal (verdicts.py), then
the output file gets its review columns again, rewritten atomically from itself by the writer
every output file shares (engine/parquet_file.py), so its summary stays.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..engine.journal import Journal
from ..engine.lock import RunLock
from ..engine.parquet_file import rewrite
from ..errors import JobError
from ..labeling.spec import Labeling
from ..reports.status import find_journal
from .export import job_of, output_file
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
    output_file(output)
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
    """The output with its review columns made anew from the journal, batch by batch, keeping
    what its footer held (the run's summary). How many rows are reviewed."""
    columns = _ReviewColumns(journal, labeling)
    with pq.ParquetFile(output) as source:
        kept = [f for f in source.schema_arrow if f.name not in columns.names]
        schema = pa.schema([*kept, *columns.fields])
        rewrite(output, schema, (columns.onto(batch, schema) for batch in source.iter_batches()))
    return columns.reviewed


class _ReviewColumns:
    """A batch of an output with its review columns from the journal (any old ones dropped)."""

    def __init__(self, journal: Journal, labeling: Labeling) -> None:
        self.journal, self.labeling = journal, labeling
        self.fields = review_fields(labeling)
        self.names = {f.name for f in self.fields}
        self.answers = [f.name for f in labeling.fields] or [LABEL]
        self.reviewed = 0  # rows with a verdict, over the batches seen

    def onto(self, batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
        row_ids = batch.column("row_id").to_pylist()
        model = {name: batch.column(name).to_pylist() for name in self.answers}
        verdicts = reviews_for(self.journal.conn, row_ids)
        self.reviewed += sum(1 for r in row_ids if r in verdicts)
        added = review_columns(row_ids, model, verdicts, self.labeling)
        kept = [batch.column(name) for name in schema.names[: len(schema) - len(self.fields)]]
        return pa.RecordBatch.from_arrays(kept + added, schema=schema)
