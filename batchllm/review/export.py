"""``batchllm review export``: the rows worth a person's look, as Label Studio tasks.

Everything comes from the output and its journal: the journal's settings say which columns the
prompt uses, the label set or schema (its instruction) and the model; the output has each row's
answer, status, re-asks and agreement. Picks are seeded (picks.py), so the same command picks
the same rows.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from ..engine.journal import Journal
from ..errors import JobError
from ..labeling.spec import Labeling, labeling_of_instruction
from ..prompts import template_fields
from ..reports.status import find_journal
from .picks import Pick, check_picks, choose
from .studio import label_config, model_version, task
from .studio_api import Studio, studio_key


def job_of(output: Path) -> tuple[Labeling, list[str], dict[str, Any]]:
    """A labeling output's label set or schema, the input columns its prompt uses, its settings."""
    journal = Journal.open_readonly(find_journal(output))
    try:
        settings = journal.get_meta("settings") or {}
    finally:
        journal.conn.close()
    instruction = (settings.get("labeling") or {}).get("instruction")
    labeling = labeling_of_instruction(instruction) if instruction else None
    if labeling is None:
        raise JobError(
            f"{output}: not a labeling output (run with --labels or --json-schema): nothing to review"
        )
    template = settings.get("template")
    columns = template_fields(template) if template else [settings.get("prompt_column") or "prompt"]
    return labeling, columns, settings


def output_file(output: Path) -> Path:
    """The output file to review, or a usage error saying why there is none."""
    if output.is_dir():
        raise JobError(f"{output}: an output directory (--engine ray): review takes one output file")
    if not output.is_file():
        raise JobError(f"{output}: no output file here; run the job to the end first")
    return output


def export_tasks(
    output: Path, picks: list[Pick], seed: int = 0
) -> tuple[list[dict[str, Any]], str, list[str]]:
    """The picked rows' tasks, the labeling config that shows them, and the picks that found
    fewer rows than they asked for (in words)."""
    labeling, columns, settings = job_of(output)
    names = pq.read_schema(output_file(output)).names
    scored = any(n == "confidence" or n.startswith("confidence_") for n in names)
    check_picks(picks, dataclasses.replace(labeling, confidence="logprobs" if scored else "off"))
    answers = [f.name for f in labeling.fields] if labeling.is_schema else ["label"]
    wanted = [*columns, "row_id", "status", "parse_error", "reasks", *answers, "agreement"]
    wanted += [n for n in names if n == "confidence" or n.startswith("confidence_")]
    missing = [c for c in wanted[: len(columns)] if c not in names]
    if missing:
        raise JobError(
            f"{output}: no column {missing[0]!r} (the prompt's); was the output written by this job?"
        )
    rows = pq.read_table(output, columns=[c for c in dict.fromkeys(wanted) if c in names]).to_pylist()
    version = model_version(str(settings.get("model")), settings)
    chosen = choose(rows, picks, seed)
    tasks = [task(rows[i], columns, labeling, why, version) for i, why in chosen.rows]
    return tasks, label_config(labeling, columns), chosen.short


def send_tasks(url: str, project: str, tasks: list[dict[str, Any]], config: str) -> tuple[int, int]:
    """Tasks into a Label Studio project (created with ``config`` when missing), only those whose
    row_id it does not hold yet: (tasks sent, tasks it held already)."""
    studio = Studio(url, studio_key())
    found = studio.project(project, config)
    assert found is not None
    held = studio.row_ids(found)
    new = [t for t in tasks if t["data"]["row_id"] not in held]
    studio.import_tasks(found, new)
    return len(new), len(tasks) - len(new)
