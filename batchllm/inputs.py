"""CSV, Parquet, JSON Lines rows and OpenAI batch request files, streamed in record batches;
never read whole (JSON Lines rows: jsonl_rows.py).

CSV columns are read as text, exactly as written (a zip code "00123" stays "00123"): a CSV carries
no types, and guessing them block by block breaks on the first odd value a million rows in. Parquet
columns keep their types. A request file (``.jsonl``, OpenAI's batch input format: one
``{"custom_id", "method", "url", "body"}`` per line) reads as three columns: ``custom_id``, the
line's raw ``request`` and its ``line`` number; only ``custom_id`` goes to the output, and the
request is validated and built by backends/openai_batch.py. Every failure to read is a
``JobError`` naming the file and, for a ragged CSV row, a bad JSON line or text that does not
decode, its line, with the ``--delimiter`` or ``--encoding`` that would read it (sniff.py).

Text files are UTF-8 unless a byte-order mark says otherwise (UTF-8, UTF-16, UTF-32) or
``--encoding`` names another encoding; Arrow reads UTF-8 natively and transcodes the others.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from . import sniff
from .errors import JobError
from .jsonl_rows import JsonlRows, is_request_file, json_lines

BATCH_ROWS = 8192
_CSV_BLOCK = 1 << 20
REQUEST_FILE_SCHEMA = pa.schema([("custom_id", pa.string()), ("request", pa.string()), ("line", pa.int64())])


class InputFile:
    """One input file: its schema, its row count, and its rows as a stream of batches."""

    def __init__(
        self,
        path: Path,
        fmt: str | None = None,
        delimiter: str = ",",
        encoding: str | None = None,
        kind: str | None = None,
    ) -> None:
        self.path = path
        # Another file than the input (--examples): --encoding is the input's, not offered for it.
        self.kind = kind
        self.format = "jsonl" if fmt == "jsonl-rows" else fmt or _format_of(path)  # which: below
        # A .tsv file is tab-separated unless another --delimiter says otherwise.
        tabbed = path.suffix.lower() in TAB_SUFFIXES and self.format == "csv"
        self.delimiter = "\t" if tabbed and delimiter == "," else delimiter
        self.encoding = sniff.encoding_of(path, encoding)  # a byte-order mark's, or the given one
        if not path.exists():
            raise JobError(f"{path}: no such file")
        if path.is_dir():
            raise JobError(
                f"{path}: is a directory, not a CSV or Parquet file (--engine ray reads directories)"
            )
        if path.stat().st_size == 0:
            raise JobError(f"{path}: the file is empty")
        self.rows: JsonlRows | None = None  # a JSON Lines file of rows, not of requests
        if self.format == "jsonl" and not is_request_file(path, self.encoding):
            self.format = "jsonl-rows"
            self.rows = JsonlRows(path, self.encoding, kind)
        self.schema = self._open_schema()

    @property
    def columns(self) -> list[str]:
        return list(self.schema.names)

    @property
    def output_columns(self) -> list[str]:
        """The input columns the output keeps: all of them, or a request file's ``custom_id``."""
        return ["custom_id"] if self.format == "jsonl" else self.columns

    def _open_schema(self) -> pa.Schema:
        if self.rows is not None:
            return self.rows.schema
        if self.format == "jsonl":
            return REQUEST_FILE_SCHEMA
        if self.format == "parquet":
            try:
                return pq.ParquetFile(self.path).schema_arrow
            except (pa.ArrowInvalid, OSError) as exc:
                raise JobError(f"{self.path}: not a readable Parquet file ({_first_line(exc)})") from None
        if sniff.is_utf8(self.encoding):
            nul = sniff.nul_hint(self.path, self.kind)
            if nul is not None:
                raise JobError(nul)
        bad_rows: list[pacsv.InvalidRow] = []
        try:
            with _quiet_undecodable_rows():
                names = self._open_csv(None, bad_rows).schema.names
        except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:
            raise self._csv_error(exc, bad_rows) from None
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise JobError(f"{self.path}: column {dup!r} appears twice in the header")
        return pa.schema([(name, pa.string()) for name in names])

    def batches(self, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Record batches of at most ``BATCH_ROWS`` rows, in file order."""
        if self.format == "parquet":
            yield from self._parquet_batches(columns)
        elif self.rows is not None:
            yield from self.rows.batches(columns, BATCH_ROWS)
        elif self.format == "jsonl":
            yield from self._jsonl_batches(columns)
        else:
            yield from self._csv_batches(columns)

    def _jsonl_batches(self, columns: list[str] | None) -> Iterator[pa.RecordBatch]:
        ids: list[str] = []
        lines: list[str] = []
        numbers: list[int] = []

        def flush() -> pa.RecordBatch:
            batch = pa.record_batch([ids, lines, numbers], schema=REQUEST_FILE_SCHEMA)
            ids.clear()
            lines.clear()
            numbers.clear()
            return batch.select(columns) if columns is not None else batch

        try:
            for number, raw, record in json_lines(self.path, self.encoding):
                custom_id = record.get("custom_id") if isinstance(record, dict) else None
                if not isinstance(custom_id, str) or not custom_id:
                    raise JobError(f"{self.path}: line {number} has no custom_id (a non-empty string)")
                ids.append(custom_id)
                lines.append(raw)
                numbers.append(number)
                if len(ids) == BATCH_ROWS:
                    yield flush()
        except UnicodeDecodeError as exc:
            problem = sniff.decode_problem(self.path, self.encoding, self.kind)
            raise JobError(
                problem or f"{self.path}: cannot read the request file ({_first_line(exc)})"
            ) from None
        except OSError as exc:
            raise JobError(f"{self.path}: cannot read the request file ({_first_line(exc)})") from None
        if ids:
            yield flush()

    def _parquet_batches(self, columns: list[str] | None) -> Iterator[pa.RecordBatch]:
        try:
            parquet = pq.ParquetFile(self.path)
            yield from parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns)
        except (pa.ArrowInvalid, OSError) as exc:
            raise JobError(f"{self.path}: cannot read Parquet data ({_first_line(exc)})") from None

    def _open_csv(
        self, columns: list[str] | None, bad_rows: list[pacsv.InvalidRow]
    ) -> pacsv.CSVStreamingReader:
        def on_invalid(row: pacsv.InvalidRow) -> str:
            bad_rows.append(row)
            return "error"

        convert = None
        if columns is not None or getattr(self, "schema", None) is not None:
            convert = pacsv.ConvertOptions(
                column_types={name: pa.string() for name in self.schema.names},
                strings_can_be_null=False,
                include_columns=columns,
            )
        # Arrow decodes UTF-8 itself (and skips its byte-order mark); other encodings are
        # transcoded through Python's codec as the file streams in.
        encoding = "utf8" if sniff.is_utf8(self.encoding) else self.encoding
        return pacsv.open_csv(
            self.path,
            # One thread: row numbers in errors are only known when parsing in order.
            read_options=pacsv.ReadOptions(block_size=_CSV_BLOCK, use_threads=False, encoding=encoding),
            parse_options=pacsv.ParseOptions(
                delimiter=self.delimiter, newlines_in_values=True, invalid_row_handler=on_invalid
            ),
            convert_options=convert,
        )

    def _csv_error(self, exc: BaseException, bad_rows: list[pacsv.InvalidRow]) -> JobError:
        if bad_rows:
            row = bad_rows[0]
            where = f"line {row.number}" if row.number is not None else "a row"
            return JobError(
                f"{self.path}: {where} has {row.actual_columns} fields but the header has "
                f"{row.expected_columns}" + self.delimiter_hint()
            )
        # A row that does not decode fails in Arrow before it reaches ``on_invalid``.
        problem = sniff.decode_problem(self.path, self.encoding, self.kind)
        if problem is not None:
            return JobError(problem)
        return JobError(f"{self.path}: not a readable CSV file ({_first_line(exc)})")

    def delimiter_hint(self, wanted: list[str] | None = None) -> str:
        """What to pass when another delimiter reads this CSV (and has the ``wanted`` columns)."""
        if self.format != "csv":
            return ""
        hint = sniff.delimiter_hint(self.path, self.encoding, self.delimiter, wanted)
        return hint or delimiter_hint(self.schema.names if hasattr(self, "schema") else [])

    def _csv_batches(self, columns: list[str] | None) -> Iterator[pa.RecordBatch]:
        bad_rows: list[pacsv.InvalidRow] = []
        try:
            reader = self._open_csv(columns or self.schema.names, bad_rows)
            while True:  # ends at the file's end (StopIteration)
                with _quiet_undecodable_rows():
                    batch = reader.read_next_batch()
                # Blocks are ~1 MiB: re-slice so memory per batch is bounded in rows too.
                for start in range(0, batch.num_rows, BATCH_ROWS):
                    yield batch.slice(start, BATCH_ROWS)
        except StopIteration:
            return
        except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:
            raise self._csv_error(exc, bad_rows) from None

    def count_rows(self) -> int:
        """Rows in the file; for CSV this reads it through once, which also validates every line."""
        if self.format == "parquet":
            try:
                return pq.ParquetFile(self.path).metadata.num_rows
            except (pa.ArrowInvalid, OSError) as exc:
                raise JobError(f"{self.path}: not a readable Parquet file ({_first_line(exc)})") from None
        if self.rows is not None:
            return self.rows.rows  # counted, every line checked, when the file was opened
        if self.format == "jsonl":
            return self._check_request_ids()
        # Every column: text that does not decode fails here, before a request is sent, and
        # not when the output is written (reading all columns costs no more than one).
        rows, last = 0, None
        for b in self.batches():
            rows += b.num_rows
            last = b.slice(b.num_rows - 1) if b.num_rows else last
        # A quote left open runs to the end of the file: the last row then holds line breaks.
        tail = [] if last is None else [v for c in last.columns for v in c.to_pylist()]
        if (
            any(isinstance(v, str) and "\n" in v for v in tail)
            and (line := sniff.unclosed_quote(self.path, self.encoding, self.delimiter)) is not None
        ):
            raise JobError(
                f'{self.path}: line {line} opens a quoted value (") that never closes: every line '
                "after it would be read as part of that value; close or remove the quote"
            )
        return rows

    def _check_request_ids(self) -> int:
        """One pass over a request file: valid JSON, a custom_id on every line, none twice."""
        seen: dict[str, int] = {}
        for batch in self.batches(["custom_id", "line"]):
            for custom_id, number in zip(
                batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True
            ):
                first = seen.setdefault(custom_id, number)
                if first != number:
                    raise JobError(
                        f"{self.path}: line {number}: custom_id {custom_id!r} is a duplicate (first on line {first})"
                    )
        return len(seen)


@contextlib.contextmanager
def _quiet_undecodable_rows() -> Iterator[None]:
    """Arrow turns a ragged row's text into ``str`` before it calls ``on_invalid``; when the text
    is not UTF-8 that fails inside Arrow's callback, which prints "Exception ignored in ...".
    The read then fails, and ``_csv_error`` says which line does not decode: keep quiet here."""
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not isinstance(unraisable.exc_value, UnicodeDecodeError):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous


def delimiter_hint(columns: list[str]) -> str:
    """A CSV read whole into one column was likely separated by something else: say what."""
    if len(columns) != 1:
        return ""
    header = columns[0]
    for sep, name in ((";", "';'"), ("\t", "tab"), ("|", "'|'")):
        if header.count(sep) >= 1:
            flag = "--delimiter tab" if name == "tab" else f"--delimiter '{sep}'"
            return f" (the header reads as one column: is the file separated by {name}? pass {flag})"
    return ""


TAB_SUFFIXES = (".tsv", ".tab")


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".csv" or suffix in TAB_SUFFIXES:
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    raise JobError(
        f"{path}: cannot tell the format from the extension; pass --input-format csv|parquet|jsonl"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
