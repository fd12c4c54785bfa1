"""A first job file drawn from an input's own columns (``batchllm init``).

The input is read as a run reads it (inputs.py): the columns whose values are words become the
template, a column named like an id whose values are all distinct becomes ``id_column``, and the
model's prices and documented rate come from the models table (pricing.py). Every key is written
with one comment line saying what it does; the caller hands those lines in (the CLI takes them from
the option help), so a job file and ``--help`` say the same thing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from .engine.checks import check_labeling_clash, check_no_clash, check_unique_ids
from .engine.counts import plural
from .errors import JobError
from .inputs import InputFile
from .job import DEFAULT_MODEL
from .labeling.spec import labeling_from
from .pricing import load_models
from .providers import DEFAULT_PROVIDER

SAMPLE_ROWS = 1000  # rows looked at to tell text from codes and numbers
ID_NAMES = ("id", "uuid", "key")
_NOT_IN_A_FIELD = set("{}[]:.!")  # a column a template could not name: str.format would misread it
DEFAULT_MAX_COST = "1.00"

# The comment of a key no option describes (``notes`` from the caller win).
NOTES = {
    "input": "The rows to send (CSV, Parquet or JSONL).",
    "output": "Where the results go (Parquet); its journal beside it makes a re-run resume.",
}


@dataclass(frozen=True, slots=True)
class Columns:
    """What ``init`` found in an input: its columns, rows, text columns and id column."""

    names: list[str]
    rows: int
    text: list[str]
    id_column: str | None
    request_file: bool = False  # a JSONL request file: its lines carry their own messages


def look_at(path: Path, encoding: str | None = None) -> Columns:
    """Read the input's columns, and sample its rows for the text and id columns."""
    source = InputFile(path, encoding=encoding)
    rows = source.count_rows()
    if source.format == "jsonl":  # a request file carries its own bodies and ids
        return Columns(source.columns, rows, [], None, request_file=True)
    sample = _sample(source)
    ids = [n for n in sample.column_names if _named_like_an_id(n)]
    id_column = next((n for n in ids if _all_distinct(source, n)), None)
    text = [
        n
        for n in sample.column_names
        if n != id_column and not _NOT_IN_A_FIELD & set(n) and _is_words(sample.column(n))
    ]
    return Columns(source.columns, rows, text, id_column)


def _sample(source: InputFile) -> pa.Table:
    batches = []
    taken = 0
    for batch in source.batches():
        batches.append(batch.slice(0, SAMPLE_ROWS - taken))
        taken += batches[-1].num_rows
        if taken >= SAMPLE_ROWS:
            break
    return pa.Table.from_batches(batches, schema=source.schema)


def _named_like_an_id(name: str) -> bool:
    lower = name.lower()
    joined = tuple(f"{sep}{n}" for sep in "_- " for n in ID_NAMES)
    return lower in ID_NAMES or lower.endswith(joined) or name.endswith("Id")  # review_id, reviewId


def _all_distinct(source: InputFile, name: str) -> bool:
    """No two rows share a value: the check a run makes of its --id-column (engine/checks.py)."""
    try:
        check_unique_ids(source, name)
    except JobError:
        return False
    return True


def _is_words(column: pa.ChunkedArray) -> bool:
    """Text a model should read: strings, most of them more than one word, not all alike."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return False
    values = [v for v in column.to_pylist() if v and v.strip()]
    if not values or len(set(values)) == 1:
        return False
    return sum(" " in v.strip() for v in values) * 2 >= len(values)


def draft_job(
    input_path: Path,
    job_path: Path,
    *,
    labels: str | None = None,
    json_schema: Path | None = None,
    provider: str | None = None,
    model: str | None = None,
    encoding: str | None = None,
    notes: Mapping[str, str] | None = None,
) -> str:
    """The text of a commented job file for ``input_path``, to be written at ``job_path``."""
    found = look_at(input_path, encoding)
    _no_clash(input_path, found, labels, json_schema)
    provider = provider or DEFAULT_PROVIDER
    table = load_models(provider)
    if model is None:
        model = DEFAULT_MODEL if DEFAULT_MODEL in table else next(iter(table))
    listed = table.get(model)
    notes = {**NOTES, **(notes or {})}
    here = job_path.parent
    job = job_path.name
    lines = [
        f"# A job drawn by `batchllm init` from {input_path} ({plural(found.rows, 'row')}; columns: "
        f"{', '.join(found.names)}).",
        "# Paths are relative to this file. Read it, change what you like, then:",
        f"#   batchllm validate {job}",
        f"#   batchllm estimate --job {job}",
        f"#   batchllm run --job {job} --sandbox      (the built-in emulator: no key, nothing spent)",
        f"#   batchllm run --job {job}                (for real; the key in the provider's variable)",
        "",
    ]

    def key(name: str, value: Any, note: str | None = None) -> None:
        lines.append(f"# {note or notes.get(name, '')}".rstrip())
        lines.append(f"{name} = {_toml(value)}")

    key("input", _relative(input_path, here))
    key("output", f"out/{job_path.stem}.parquet")
    if found.id_column is not None:
        key("id_column", found.id_column)
    if encoding is not None:
        key("encoding", encoding)
    if "prompt" in found.names:  # a column of ready prompts: sent as they are
        key("prompt_column", "prompt")
    elif found.text:
        key("template", "\n".join(f"{name}: {{{name}}}" for name in found.text))
    elif not found.request_file:
        raise JobError(
            f"{input_path}: no column of text to put in a prompt (columns: {', '.join(found.names)}): "
            "init looks for a column of words, or one named prompt"
        )
    if labels is not None:
        key("system", "Read the record and answer with its label.", notes.get("system"))
        key("labels", labels)
    elif json_schema is not None:
        key("system", "Read the record and fill in the fields.", notes.get("system"))
        key("json_schema", _relative(json_schema, here))
    elif not found.request_file:
        key("system", "Answer briefly.", notes.get("system"))
    key("provider", provider)
    key("model", model)
    priced = listed is not None and listed.prices is not None
    if listed is None or listed.prices is None:  # written out, to fill in: a cost cap needs them
        lines.append(f"# {model!r} has no price in the {provider} models table: give the prices you pay")
        lines += ["# (USD per million tokens) for costs, and a cost cap:", '# input_price = "0.00"']
        lines.append('# output_price = "0.00"')
    else:
        pinned = "the models table's price today; delete the line to follow the table"
        key("input_price", str(listed.prices.input_per_million), f"USD per million input tokens: {pinned}.")
        key(
            "output_price", str(listed.prices.output_per_million), f"USD per million output tokens: {pinned}."
        )
        if listed.prices.cached_input_per_million is not None:  # given prices replace the table's whole
            key(
                "cached_input_price",
                str(listed.prices.cached_input_per_million),
                f"USD per million prompt tokens served from the server's prompt cache: {pinned}.",
            )
    if not found.request_file:  # a request file's bodies say these themselves
        key("max_tokens", 16 if labels is not None else 256)
        randomness = "How random replies are; 0: the same each time (and cached)."
        key("temperature", 0.0, f"{randomness} {notes.get('temperature', '')}")
    key("rpm", listed.rpm if listed is not None and listed.rpm else "auto")
    if priced:
        key("max_cost", DEFAULT_MAX_COST)
    else:
        lines += [
            f"# {notes.get('max_cost', '')} It needs the prices above.",
            f"# max_cost = {_toml(DEFAULT_MAX_COST)}",
        ]
    return "\n".join(lines) + "\n"


def _no_clash(input_path: Path, found: Columns, labels: str | None, json_schema: Path | None) -> None:
    """Refuse, as a run would, an input column or a schema field named as a column batchllm
    writes: ``validate`` would refuse the file init wrote. A gold column (a labeler's ``label``)
    is told what to be renamed to."""
    check_no_clash(found.names, str(input_path))
    settings = {"labels": labels} if labels is not None else {"json_schema": json_schema}
    labeling = labeling_from(
        {k: v for k, v in settings.items() if v is not None}, lambda k: f"--{k.replace('_', '-')}"
    )
    if labeling is None:
        return
    check_labeling_clash(labeling, [], str(input_path))  # the schema's own fields
    own = set(labeling.confidence_columns())  # written only where the provider gives logprobs
    clash = [c.name for c in labeling.columns() if c.name in found.names and c.name not in own]
    if not clash:
        return
    name = clash[0]
    gold = f"(a gold column: to gold_{name}, say; `batchllm eval --gold gold_{name}` scores against it)"
    if labeling.is_schema and name in {f.name for f in labeling.fields}:
        raise JobError(
            f"{input_path}: column {name!r} has the name of a field of {json_schema}: rename the field, "
            f"or the column {gold}, then run init again"
        )
    if name == "label":
        raise JobError(
            f"{input_path}: column 'label' has the name of the column batchllm writes its labels to: "
            f"rename it in the input {gold}, then run init again"
        )
    raise JobError(f"{input_path}: column {name!r} has the name of a column batchllm writes; rename it")


def _relative(path: Path, start: Path) -> str:
    """``path`` as seen from ``start``; absolute when the two share no folder but the root."""
    path, start = path.resolve(), start.resolve()
    if len(Path(os.path.commonpath([path, start])).parts) <= 1:
        return path.as_posix()
    return Path(os.path.relpath(path, start)).as_posix()


def _toml(value: Any) -> str:
    """A TOML value: a number, or a string (multi-line ones as a readable \"\"\" block)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value)
    text = str(value)
    if "\n" in text and '"""' not in text and "\\" not in text:
        return f'"""\n{text}"""'
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'
