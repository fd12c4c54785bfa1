"""The one way an output Parquet file is written or rewritten: atomically, keeping its footer.

``replacing`` writes a temporary file beside the target and renames it over the target only once
complete and fsynced, so the path holds the previous complete file or the new one, never a
partial one. ``rewrite`` makes a file anew from itself (``review import`` adding its columns):
the key-value metadata of its footer, the run's summary under ``batchllm`` above all, goes into
the new file, since pyarrow keeps it in no table read from the file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

_ARROW_SCHEMA = b"ARROW:schema"  # written by every writer from the schema itself


@contextmanager
def replacing(path: Path, schema: pa.Schema) -> Iterator[pq.ParquetWriter]:
    """A writer whose file replaces ``path`` when the block ends; on an error ``path`` is left
    as it was."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp makes the file 0600; the output is shared like any file the user writes (umask).
    os.fchmod(fd, 0o666 & ~current_umask())
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = pq.ParquetWriter(tmp, schema, compression="zstd")
        try:
            yield writer
        finally:
            writer.close()
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def rewrite(path: Path, schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> None:
    """Replace ``path`` with ``batches`` (of ``schema``, usually read from ``path`` itself),
    keeping every key-value pair its footer held."""
    held = {k: v for k, v in (pq.read_metadata(path).metadata or {}).items() if k != _ARROW_SCHEMA}
    with replacing(path, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
        if held:
            writer.add_key_value_metadata(held)


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
