"""A JSON Lines file of rows (``.jsonl``, ``.ndjson``): one JSON object a line, its keys the
columns, as datasets are often shared. inputs.py reads it as it reads a CSV.

A ``.jsonl`` file is either this or an OpenAI batch request file; its first object says which
(``is_request_file``: a request line has a ``custom_id`` and a ``body`` object, as the OpenAI
batch format has; a row may have a ``custom_id`` column of its own). Nothing else decides.

Values are read as text, as a CSV's are, so that no type is guessed block by block: a string as it
is, a number or ``true``/``false`` as the file wrote it, ``null`` (or a key a line leaves out) as an
empty cell, an object or array as its JSON text. The columns are every key of the file, in the
order first seen; finding them takes one pass, which also counts the rows and checks every line,
so that a bad line a million rows in stops the run before anything is sent, naming its line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa

from . import sniff
from .errors import JobError


def is_request_file(path: Path, encoding: str) -> bool:
    """Is the file's first object a batch request line (a ``custom_id`` and a ``body`` object; a
    ``custom_id`` alone is a row's column)? A first line that is not a JSON object is not: the
    rows' reader names it ("line 1 is a JSON array"). A file that cannot be read counts as one:
    the request file's reader names what is wrong."""
    try:
        with open(path, encoding=_text(encoding), newline="\n") as fh:
            for raw in fh:
                if raw.strip():
                    first = orjson.loads(raw)
                    if not isinstance(first, dict):
                        return False
                    return "custom_id" in first and isinstance(first.get("body"), dict)
    except orjson.JSONDecodeError:
        return False
    except (OSError, UnicodeDecodeError):
        return True
    return False  # blank lines only: no requests either (JsonlRows says so)


def json_lines(path: Path, encoding: str) -> Iterator[tuple[int, str, Any]]:
    """Each line of a JSON Lines file that is not blank: (its number, its text, its value). A line
    that is not JSON is a JobError naming it; text that does not decode is the caller's to say."""
    with open(path, encoding=_text(encoding), newline="\n") as fh:
        for number, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                value = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise JobError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None
            yield number, raw, value


def _text(encoding: str) -> str:
    return "utf-8-sig" if sniff.is_utf8(encoding) else encoding


_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


class _Number(str):
    """A JSON number's own text (``1.50``, ``1e3``, 23 digits), as the line wrote it."""


_AS_WRITTEN = json.JSONDecoder(parse_float=_Number, parse_int=_Number)


def _has_float(value: Any) -> bool:
    if isinstance(value, float):
        return True
    if isinstance(value, dict):
        return any(_has_float(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_float(v) for v in value)
    return False


def as_written(raw: str, record: dict[str, Any]) -> dict[str, Any]:
    """The record with its numbers as the line wrote them. orjson's floats (a decimal point, an
    exponent, an integer past 64 bits) are not: such a line is read again, numbers kept as text;
    a line without one (most) is taken as orjson read it, whose integers are exact."""
    return _AS_WRITTEN.decode(raw) if _has_float(record) else record


def _json(value: Any) -> str:
    """JSON text of a value read by ``as_written``: its numbers unquoted, as written."""
    if isinstance(value, _Number):
        return str.__str__(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{_json(k)}:{_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_json(v) for v in value) + "]"
    return orjson.dumps(value).decode()


def _cell(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and not isinstance(value, _Number)):
        return value
    if isinstance(value, _Number):
        return str.__str__(value)
    return _json(value)


class JsonlRows:
    """The rows of one JSON Lines file: ``columns`` and ``rows`` from one checking pass."""

    def __init__(self, path: Path, encoding: str, kind: str | None = None) -> None:
        self.path, self.encoding, self.kind = path, encoding, kind
        seen: dict[str, None] = {}
        rows = 0
        for _, record in self._objects():
            seen.update(dict.fromkeys(record))
            rows += 1
        if not rows:
            raise JobError(f"{path}: the file has only blank lines")
        if not seen:
            raise JobError(f"{path}: its lines are empty objects: no columns")
        self.columns = list(seen)
        self.rows = rows
        self.schema = pa.schema([(name, pa.string()) for name in self.columns])

    def _objects(self) -> Iterator[tuple[str, dict[str, Any]]]:
        try:
            for number, raw, record in json_lines(self.path, self.encoding):
                if not isinstance(record, dict):
                    raise JobError(
                        f"{self.path}: line {number} is a JSON {_JSON_TYPES.get(type(record), 'value')}, "
                        "not an object of columns"
                    )
                yield raw, record
        except UnicodeDecodeError as exc:
            problem = sniff.decode_problem(self.path, self.encoding, self.kind)
            raise JobError(problem or f"{self.path}: cannot read the file ({exc.reason})") from None
        except OSError as exc:
            raise JobError(f"{self.path}: cannot read the file ({exc.strerror or exc})") from None

    def batches(self, columns: list[str] | None, size: int) -> Iterator[pa.RecordBatch]:
        """Record batches of at most ``size`` rows, of ``columns`` (all when None), all text."""
        names = self.columns if columns is None else columns
        schema = pa.schema([(name, pa.string()) for name in names])
        cells: list[list[str | None]] = [[] for _ in names]
        for raw, record in self._objects():
            record = as_written(raw, record)
            for cell, name in zip(cells, names, strict=True):
                cell.append(_cell(record.get(name)))
            if cells and len(cells[0]) == size:
                yield pa.record_batch(cells, schema=schema)
                cells = [[] for _ in names]
        if cells and cells[0]:
            yield pa.record_batch(cells, schema=schema)
