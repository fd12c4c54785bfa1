"""A JSON Lines file of rows (``.jsonl``, ``.ndjson``): one JSON object a line, its keys the
columns, as datasets are often shared. inputs.py reads it as it reads a CSV.

A ``.jsonl`` file is either this or an OpenAI batch request file; its first object says which
(``is_request_file``: a request line has a ``custom_id``). Nothing else about the file decides.

Values are read as text, as a CSV's are, so that no type is guessed block by block: a string as it
is, a number or ``true``/``false`` as the file wrote it, ``null`` (or a key a line leaves out) as an
empty cell, an object or array as its JSON text. The columns are every key of the file, in the
order first seen; finding them takes one pass, which also counts the rows and checks every line,
so that a bad line a million rows in stops the run before anything is sent, naming its line.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa

from . import sniff
from .errors import JobError


def is_request_file(path: Path, encoding: str) -> bool:
    """Is the file's first object a batch request line (it has a ``custom_id``)? A file that
    cannot be read or parsed counts as one: the request file's reader names what is wrong."""
    try:
        with open(path, encoding=_text(encoding), newline="\n") as fh:
            for raw in fh:
                if raw.strip():
                    first = orjson.loads(raw)
                    return not isinstance(first, dict) or "custom_id" in first
    except (OSError, UnicodeDecodeError, orjson.JSONDecodeError):
        return True
    return True


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


def _cell(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


class JsonlRows:
    """The rows of one JSON Lines file: ``columns`` and ``rows`` from one checking pass."""

    def __init__(self, path: Path, encoding: str, kind: str | None = None) -> None:
        self.path, self.encoding, self.kind = path, encoding, kind
        seen: dict[str, None] = {}
        rows = 0
        for _, record in self._objects():
            seen.update(dict.fromkeys(record))
            rows += 1
        if not seen and rows:
            raise JobError(f"{path}: its lines are empty objects: no columns")
        self.columns = list(seen)
        self.rows = rows
        self.schema = pa.schema([(name, pa.string()) for name in self.columns])

    def _objects(self) -> Iterator[tuple[int, dict[str, Any]]]:
        try:
            for number, _, record in json_lines(self.path, self.encoding):
                if not isinstance(record, dict):
                    raise JobError(
                        f"{self.path}: line {number} is a JSON {_JSON_TYPES.get(type(record), 'value')}, "
                        "not an object of columns"
                    )
                yield number, record
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
        for _, record in self._objects():
            for cell, name in zip(cells, names, strict=True):
                cell.append(_cell(record.get(name)))
            if cells and len(cells[0]) == size:
                yield pa.record_batch(cells, schema=schema)
                cells = [[] for _ in names]
        if cells and cells[0]:
            yield pa.record_batch(cells, schema=schema)
