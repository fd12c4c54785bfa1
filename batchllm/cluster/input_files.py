"""INPUT for ``--engine ray``: its files (a file, a directory of files, or a glob), all of one
format and columns, read as one Ray Dataset, and their row count."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ..errors import JobError
from ..inputs import InputFile


def input_files(path: Path, fmt: str | None, delimiter: str = ",") -> tuple[list[str], InputFile]:
    """The files of INPUT (a file, a directory of files, or a glob) and the first, opened."""
    text = str(path)
    if any(c in text for c in "*?["):
        files = sorted(p for p in glob.glob(text) if os.path.isfile(p))
    elif path.is_dir():
        files = sorted(
            str(p)
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in (".parquet", ".csv")
            and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)
        )
    else:
        files = [text]
    if not files:
        raise JobError(f"{path}: no CSV or Parquet files there")
    first = InputFile(Path(files[0]), fmt, delimiter)
    if first.format == "jsonl":
        raise JobError(f"{path}: request files run on the local engine (leave out --engine ray)")
    if first.format == "jsonl-rows":
        raise JobError(
            f"{path}: JSON Lines rows run on the local engine (leave out --engine ray, or use Parquet)"
        )
    for name in files[1:]:
        other = InputFile(Path(name), fmt, delimiter)
        if other.format != first.format or other.columns != first.columns:
            raise JobError(f"{name}: its columns or format differ from {files[0]}'s")
    return files, first


def read_dataset(ray: Any, files: list[str], source: InputFile) -> Any:
    """The files as one Ray Dataset."""
    if source.format == "parquet":
        return ray.data.read_parquet(files)
    # As on one machine, CSV columns are text exactly as written (inputs.py).
    types = {name: pa.string() for name in source.columns}
    return ray.data.read_csv(
        files,
        convert_options=pacsv.ConvertOptions(column_types=types),
        parse_options=pacsv.ParseOptions(delimiter=source.delimiter, newlines_in_values=True),
    )


def count_rows(files: list[str], source: InputFile) -> int:
    """Rows in all the files."""
    if source.format != "parquet":
        return sum(InputFile(Path(f), source.format, source.delimiter).count_rows() for f in files)
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)  # footers only
