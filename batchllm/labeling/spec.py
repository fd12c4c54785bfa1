"""What a labeling job asks for: a label set or a JSON schema, and how to say so to the model.

A ``Labeling`` is built once per job (from ``--labels``, ``--labels-file`` or ``--json-schema``)
and is all the rest of the package needs: the instruction appended to the system prompt (so
``estimate`` shows and counts it), the output columns it adds, and the settings the journal keeps.
The schema subset is what labeling needs and what can be checked without a dependency: an object
whose properties are strings, integers, numbers, booleans, arrays of strings, or ``enum``s.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa

from ..errors import JobError
from ..sniff import read_text

_TYPES = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    type: str  # string, integer, number, boolean, array
    enum: tuple[Any, ...] | None = None

    @property
    def arrow(self) -> pa.DataType:
        return pa.list_(pa.string()) if self.type == "array" else _TYPES[self.type]

    @property
    def scored(self) -> bool:
        """Does it get a confidence column (an enum or a boolean: a choice; labeling/confidence.py)?"""
        return self.type == "boolean" or (self.type == "string" and self.enum is not None)


@dataclass(frozen=True)
class Labeling:
    """A label set (``labels``) or a schema (``fields``), with re-ask and sampling settings."""

    labels: tuple[str, ...] = ()
    descriptions: tuple[tuple[str, str], ...] = ()
    fields: tuple[Field, ...] = ()
    required: tuple[str, ...] = ()
    schema: dict[str, Any] = field(default_factory=dict, compare=False)
    reask: int = 1
    samples: int = 1
    adaptive: bool = False
    # Rows per request (labeling/pack.py) and the most tokens a packed request (prompt + reply)
    # may take. Not request settings: a journal is resumed under any pack size.
    pack: int = 1
    pack_tokens: int | None = None
    # Where a row's confidence comes from (labeling/confidence.py): "logprobs", "votes" or "off"
    # (the job's "auto" resolved for its provider), and --vote-below: the other samples are asked
    # only for rows whose first answer is less sure than this.
    confidence: str = "off"
    vote_below: float | None = None
    # ``--confidence logprobs`` asked in so many words (not auto's choice): a server refusing
    # logprobs stops the run instead of the run going on without them (engine/refusable.py).
    logprobs_insisted: bool = False

    @property
    def is_schema(self) -> bool:
        return bool(self.fields)

    def instruction(self) -> str:
        """The text appended to the system prompt."""
        if self.is_schema:
            return (
                "Answer with one JSON object and nothing else, matching this JSON Schema:\n"
                + orjson.dumps(self.schema).decode()
            )
        text = "Answer with exactly one label from this list: " + ", ".join(self.labels) + "."
        if self.descriptions:
            text += "\n" + "\n".join(f"- {name}: {desc}" for name, desc in self.descriptions)
        return text

    def settings(self) -> dict[str, Any]:
        """What shapes the requests, for the journal (``--reparse`` may change it)."""
        out: dict[str, Any] = {"instruction": self.instruction()}
        if self.samples > 1:
            out["samples"] = self.samples
        return out

    def columns(self) -> list[pa.Field]:
        cols = (
            [pa.field(f.name, f.arrow) for f in self.fields]
            if self.is_schema
            else [pa.field("label", pa.string())]
        )
        if self.confidence != "off":
            cols += [pa.field(name, pa.float64()) for name in self.confidence_columns()]
        cols += [pa.field("parse_error", pa.string()), pa.field("reasks", pa.int64())]
        if self.samples > 1:
            cols += [
                pa.field("agreement", pa.float64()),
                pa.field("label_votes", pa.map_(pa.string(), pa.int64())),
            ]
        cols += [pa.field("reask_cost_usd", pa.float64()), pa.field("sample_cost_usd", pa.float64())]
        if self.pack > 1:
            cols += [pa.field("pack_id", pa.string()), pa.field("pack_position", pa.int64())]
        return cols

    def confidence_columns(self) -> list[str]:
        """``confidence``, or ``confidence_<field>`` for each enum or boolean field of a schema."""
        if not self.is_schema:
            return ["confidence"]
        return [f"confidence_{f.name}" for f in self.fields if f.scored]


_LABELS = re.compile(r"Answer with exactly one label from this list: (.+?)\.(?:\n|$)")
_SCHEMA = re.compile(r"matching this JSON Schema:\n(\{[^\n]*\})")


def labeling_of_instruction(instruction: str) -> Labeling | None:
    """The label set or schema an instruction (``Labeling.instruction``, as a journal keeps it)
    states: how a later command (``review``) knows a finished output's labeling."""
    labels = _LABELS.search(instruction)
    if labels is not None:
        return Labeling(labels=tuple(x.strip() for x in labels.group(1).split(", ")))
    schema = _SCHEMA.search(instruction)
    if schema is None:
        return None
    raw = orjson.loads(schema.group(1))
    fields, required = schema_fields(raw, "the journal's schema")
    return Labeling(fields=fields, required=required, schema=raw)


def parse_labels(text: str, where: str) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """``"a,b,c"`` or a file's lines (``label`` or ``label: description``) -> labels, descriptions."""
    labels: list[str] = []
    descriptions: list[tuple[str, str]] = []
    lines = text.splitlines() if "\n" in text.strip() else text.split(",")
    if "\n" not in text.strip() and any(not x.strip() for x in lines):  # "a,,b": one left out?
        raise JobError(f"{where}: an empty label in {text!r}: give each label between the commas")
    for raw in lines:
        name, _, desc = raw.partition(":") if "\n" in text.strip() else (raw, "", "")
        name = name.strip()
        if not name or name.startswith("#"):
            continue
        if name.lower() in (x.lower() for x in labels):
            raise JobError(f"{where}: label {name!r} appears twice")
        labels.append(name)
        if desc.strip():
            descriptions.append((name, desc.strip()))
    if len(labels) < 2:
        raise JobError(f"{where}: give at least two labels, e.g. positive,negative,neutral")
    return tuple(labels), tuple(descriptions)


def load_schema(path: Path) -> tuple[dict[str, Any], tuple[Field, ...], tuple[str, ...]]:
    """A JSON Schema object file -> (schema, fields, required); a usage error names what is wrong."""
    try:
        schema = orjson.loads(read_text(path, "JSON schema"))
    except OSError as exc:
        raise JobError(f"--json-schema {path}: {exc.strerror}") from None
    except orjson.JSONDecodeError as exc:
        raise JobError(f"--json-schema {path}: not valid JSON ({exc.msg})") from None
    fields, required = schema_fields(schema, f"--json-schema {path}")
    return schema, fields, required


def schema_fields(schema: Any, where: str) -> tuple[tuple[Field, ...], tuple[str, ...]]:
    """A JSON Schema object's fields and required names; a usage error names what is wrong."""
    props = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(props, dict) or not props:
        raise JobError(f"{where}: needs an object schema with 'properties'")
    fields = []
    for name, spec in props.items():
        kind = spec.get("type") if isinstance(spec, dict) else None
        enum = spec.get("enum") if isinstance(spec, dict) else None
        if kind is None and isinstance(enum, list):
            kind = "string"
        if kind == "array":
            items = spec.get("items") or {}
            if items.get("type") != "string":
                raise JobError(f"{where}: property {name!r}: arrays must be of strings")
            enum = items.get("enum")  # an array's choices are its items'
        elif kind not in _TYPES:
            raise JobError(
                f"{where}: property {name!r} has type {kind!r}; supported: string, integer, "
                "number, boolean, array of strings, enum"
            )
        fields.append(Field(name, kind, tuple(enum) if isinstance(enum, list) else None))
    required = schema.get("required") or []
    unknown = [r for r in required if r not in props]
    if unknown:
        raise JobError(f"{where}: required {unknown[0]!r} is not a property")
    return tuple(fields), tuple(required)


def labeling_from(kwargs: dict[str, Any], where: Callable[[str], str]) -> Labeling | None:
    """The job's labeling from its raw settings (popped from ``kwargs``); ``where`` names a key."""
    labels, labels_file, schema = (
        kwargs.pop("labels", None),
        kwargs.pop("labels_file", None),
        kwargs.pop("json_schema", None),
    )
    options = {
        k: kwargs.pop(k)
        for k in ("reask", "samples", "adaptive", "pack", "pack_tokens", "confidence", "vote_below")
        if k in kwargs
    }
    given = [
        k
        for k, x in (("labels", labels), ("labels_file", labels_file), ("json_schema", schema))
        if x is not None
    ]
    if len(given) > 1:
        raise JobError(f"{where(given[1])}: give one of --labels, --labels-file and --json-schema")
    if not given:
        if options.get("pack", 1) > 1 or "pack_tokens" in options:
            key = "pack" if "pack" in options else "pack_tokens"
            raise JobError(
                f"{where(key)}: packing rows needs --labels, --labels-file or --json-schema (each "
                "row's answer is read and checked from one JSON object)"
            )
        options.pop("pack", None)
        if options:
            raise JobError(f"{where(next(iter(options)))}: goes with --labels or --json-schema")
        return None
    if options.get("adaptive") and options.get("samples", 1) < 3:
        raise JobError(f"{where('adaptive')}: needs --samples 3 or more")
    if options.get("vote_below") is not None and options.get("samples", 1) < 2:
        raise JobError(f"{where('vote_below')}: needs --samples 2 or more (the samples asked of unsure rows)")
    options.setdefault("confidence", "auto")  # resolved for the provider by the job (job.py)
    if labels is not None:
        names, descriptions = parse_labels(labels, where("labels"))
        return Labeling(labels=names, descriptions=descriptions, **options)
    if labels_file is not None:
        try:
            text = read_text(labels_file, "labels file")
        except OSError as exc:
            raise JobError(f"{where('labels_file')} {labels_file}: {exc.strerror}") from None
        names, descriptions = parse_labels(text if "\n" in text.strip() else text + "\n", str(labels_file))
        return Labeling(labels=names, descriptions=descriptions, **options)
    raw, fields, required = load_schema(schema)
    return Labeling(fields=fields, required=required, schema=raw, **options)
