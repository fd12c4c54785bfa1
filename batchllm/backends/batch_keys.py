"""What each row was exported as, so ``import-batch`` refuses a reply to another request.

A result line carries its ``custom_id`` and a reply, never the request it answers. Should the job
change between ``export-batch`` and ``import-batch`` (another ``--system``, template, model, label
set, ``max_tokens``...), the rows keep their ids and the old replies would be joined to the new
prompts, silently. So ``export-batch`` writes down, for each row it exports, the ``Request.key()``
(records.py: provider, model, messages, parameters; the key the response cache uses) of the
request it wrote, and ``import-batch`` refuses a row whose request, as the job builds it now, has
another key: not joined, left pending, counted in one line. A row with no record (exported before
this book existed, or from another machine) imports as it always did.

Where: one SQLite file for the user, ``$XDG_DATA_HOME/batchllm/exports.sqlite`` (else
``~/.local/share/batchllm``), keyed by the input file's resolved path and the row id. Not the
job's journal: ``export-batch`` is not told the output the replies will go to (its ``-o`` names
the request file, in place of a job file's ``output``; ``import-batch -o`` names it). Not a sidecar
next to the request file: ``import-batch`` is given the result files, downloaded anywhere, never
the request file. The input file is what both commands are given, and the file survives restarts
and re-exports. Each export is a record of its own (``exports``: the input's resolved path, when;
``exported``: row id -> key), kept ``KEEP_DAYS``. A row may thus hold several keys (a re-export
with other settings, two request files for a comparison): a reply is accepted when the job's
current request is one that was exported for its row (which file it came back from, no result
line says). Rows are written in chunks, each its own commit, so an export never holds the file
for long; a record that cannot be written is a warning, never a failed export. It holds ids and
hashes, never a prompt: about 50 bytes a row.

A refused reply was billed all the same. Its cost, as an accepted one is costed (batch_transfer.py
``_entry`` at the batch's prices; a pack's rows their shares, batch_packs.py ``split_entry``), is
kept with its row in the output's journal (``add_refused``: the row's ``carried``, once per
result line, spend.py), so the output's cost, ``report``, ``status`` and the import's ledger
record count it while the row stays pending, and its later answer adds to it. An export also
keeps the model its file asks (``exports.model``): when only the model differs (a file for a
``--fleet`` endpoint imported without ``--fleet``, or the reverse), the line says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from ..engine.journal import Journal
from ..engine.spend import Paid
from ..folders import data_dir
from ..labeling.rows import Attempt
from ..pricing import format_usd
from ..records import Entry, Request

DB_NAME = "exports.sqlite"
CHUNK = 8192  # rows per commit
KEEP_DAYS = 90  # exports older than this are forgotten (their replies then import unchecked)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS exports (
    id INTEGER PRIMARY KEY, input TEXT NOT NULL, exported_at REAL NOT NULL, model TEXT
);
CREATE INDEX IF NOT EXISTS exports_input ON exports (input);
CREATE TABLE IF NOT EXISTS exported (
    export INTEGER NOT NULL, row_id TEXT NOT NULL, request_key TEXT NOT NULL, PRIMARY KEY (export, row_id)
) WITHOUT ROWID;
"""

Row = tuple[int, str, str, Request | None]  # position, row_id, content hash, request (None: refused)


def book_path(environ: Mapping[str, str] | None = None) -> Path:
    return data_dir(environ) / DB_NAME


def request_key(request: Request | None, model: str | None) -> str | None:
    """The key a row is exported and checked under: its request's ``key()`` (its first 16 hex
    digits, as a request file's rows are hashed: openai_batch.py). ``model``: the one a fleet
    endpoint answers with (export-batch and import-batch ``--fleet``), when it names another."""
    if request is None:
        return None
    if model is not None and model != request.model:
        request = replace(request, model=model)
    return request.key()[:16]


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(_SCHEMA)
    return conn


def _begin_export(conn: sqlite3.Connection, source: Path, model: str | None) -> int:
    """A new export of ``source`` (for ``model``); the exports older than ``KEEP_DAYS`` go."""
    now = time.time()
    conn.execute("BEGIN")
    old = [
        r[0] for r in conn.execute("SELECT id FROM exports WHERE exported_at < ?", (now - KEEP_DAYS * 86400,))
    ]
    for export in old:
        conn.execute("DELETE FROM exported WHERE export = ?", (export,))
        conn.execute("DELETE FROM exports WHERE id = ?", (export,))
    cur = conn.execute(
        "INSERT INTO exports (input, exported_at, model) VALUES (?, ?, ?)",
        (str(source.resolve()), now, model),
    )
    conn.execute("COMMIT")
    return int(cur.lastrowid or 0)


class ExportBook:
    """Writes down the rows an export writes (``noting`` wraps its rows); ``problem`` says why
    nothing more can be written, once. ``model``: a fleet endpoint's (``request_key``); ``made_for``:
    the model the file asks, kept to tell an import with another --fleet or --model."""

    def __init__(
        self, source: Path, model: str | None, path: Path | None = None, made_for: str | None = None
    ) -> None:
        self.model = model
        self.problem: str | None = None
        self._pending: list[tuple[int, str, str]] = []
        self._conn: sqlite3.Connection | None = None
        self._export = 0
        try:
            self._conn = _connect(path or book_path())
            self._export = _begin_export(self._conn, source, made_for)
        except (OSError, sqlite3.Error) as exc:
            self._failed(exc)

    def noting(self, rows: Iterator[Row]) -> Iterator[Row]:
        for row in rows:
            key = request_key(row[3], self.model)
            if key is not None and self._conn is not None:
                self._pending.append((self._export, row[1], key))
                if len(self._pending) >= CHUNK:
                    self.flush()
            yield row

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        if self._conn is None or not pending:
            return
        conn = self._conn
        try:
            conn.execute("BEGIN")
            conn.executemany("INSERT OR IGNORE INTO exported VALUES (?, ?, ?)", pending)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            self._failed(exc)

    def close(self) -> None:
        self.flush()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _failed(self, exc: Exception) -> None:
        self.problem = (
            f"{book_path()}: cannot write down what was exported ({exc}): import-batch will not notice "
            "a job changed since this export"
        )
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None


def exported_keys(
    source: Path, row_ids: Sequence[str], path: Path | None = None, models: dict[str, set[str]] | None = None
) -> dict[str, set[str]]:
    """The keys each of these rows of ``source`` was exported with (rows with no record left out);
    ``models`` gets the models each was exported for (those known)."""
    path = path or book_path()
    if not row_ids or not path.exists():
        return {}
    try:
        conn = _connect(path)
    except (OSError, sqlite3.Error):
        return {}
    try:
        out: dict[str, set[str]] = {}
        cur = conn.execute(
            "SELECT e.row_id, e.request_key, x.model FROM exports AS x JOIN exported AS e ON e.export = x.id "
            "WHERE x.input = ? AND e.row_id IN (SELECT value FROM json_each(?))",
            (str(source.resolve()), orjson.dumps(list(row_ids))),
        )
        for row_id, key, model in cur:
            out.setdefault(row_id, set()).add(key)
            if models is not None and model is not None:
                models.setdefault(row_id, set()).add(model)
        return out
    finally:
        conn.close()


class Refused(NamedTuple):
    """What an import refused: the rows (in the order of the result lines), and what each of
    their replies cost (row, the line's ``line_id``, tokens and picodollars), counted all the same."""

    rows: list[str]
    paid: list[tuple[str, str, Paid]]
    unpriced: bool  # some reply had no price (no batch or live price, none given)
    by_model: bool  # the rows were exported for another model (--fleet/--model): not the job

    @property
    def cost_pico(self) -> int:
        return sum(p[2] + p[3] for _, _, p in self.paid)


def line_id(record: Mapping[str, Any]) -> str:
    """A result line's own id, whatever the file it is read from: importing it twice counts it once."""
    return hashlib.blake2b(orjson.dumps(record, option=orjson.OPT_SORT_KEYS), digest_size=8).hexdigest()


def drop_changed(
    entries: dict[str, Entry],
    splits: list[tuple[str, Attempt]],
    wanted: Mapping[str, tuple[str, Request | None]],
    source: Path,
    model: str | None,
    lines: Mapping[str, str],
    models: Sequence[str] = (),
) -> tuple[dict[str, Entry], list[tuple[str, Attempt]], Refused | None]:
    """The replies read from result files, less those of rows whose request changed since they
    were exported; and those rows with what their replies cost (``lines``: each row's result
    line's ``line_id``; ``"<row> <pack>"``: a pack's unreadable line's). ``models``: others the
    job could have been exported for (its own, its fleet's), with those the exports were made for,
    tell when only the model differs (then every row differs)."""
    rows = list(dict.fromkeys([*entries, *(r for r, _ in splits)]))
    made_for: dict[str, set[str]] = {}
    exported = exported_keys(source, rows, models=made_for)
    changed = [r for r in rows if r in exported and request_key(wanted[r][1], model) not in exported[r]]
    if not changed:
        return entries, splits, None
    gone = set(changed)
    kept: list[tuple[str, str, Entry | Attempt]] = [
        (row_id, lines[row_id], e)
        for row_id, e in entries.items()
        if row_id in gone and e.prompt_tokens is not None  # an error line is not billed
    ]
    # An unreadable pack's share of a refused row.
    kept += [(row_id, lines[f"{row_id} {a.pack_id}"], a) for row_id, a in splits if row_id in gone]
    paid = [(row_id, line, _paid(x)) for row_id, line, x in kept]
    unpriced = any(x.input_cost_pico is None or x.output_cost_pico is None for _, _, x in kept)
    first = wanted[changed[0]][1]
    asked = model if model is not None else first.model if first is not None else None
    others = {*models, *made_for.get(changed[0], ())} - {asked}
    by_model = any(request_key(first, m) in exported[changed[0]] for m in others)
    return (
        {k: e for k, e in entries.items() if k not in gone},
        [(r, a) for r, a in splits if r not in gone],
        Refused(changed, paid, unpriced, by_model),
    )


def _paid(x: Entry | Attempt) -> Paid:
    return x.prompt_tokens or 0, x.completion_tokens or 0, x.input_cost_pico or 0, x.output_cost_pico or 0


def changed_line(refused: Refused) -> str:
    """The one line that says an import refused replies to requests the job no longer sends, and
    what they cost."""
    changed = refused.rows
    n = len(changed)
    if not refused.paid:
        cost = ""
    elif refused.unpriced:
        cost = " (their cost is unknown: no price; their tokens are counted in the output's)"
    else:
        they = "they" if len(refused.paid) != 1 else "it"
        cost = f" ({they} cost {format_usd(refused.cost_pico)}, counted in the output's cost)"
    advice = "import with the same --fleet/--model as the export" if refused.by_model else "export again"
    return (
        f"{n:,} result{'s were' if n != 1 else ' was'} for requests that differ from the job's now (the "
        f"--system, template, model, labels or parameters changed since export-batch; first: row "
        f"{changed[0]!r}); not imported{cost}: {advice}"
    )


def add_refused(journal: Journal, refused: Refused | None) -> tuple[int, int, int]:
    """What refused replies cost, kept with their rows (each line once: spend.py ``add_refused``);
    returns what those not kept before add: prompt and completion tokens, picodollars."""
    pt = ct = pico = 0
    for row_id, line, paid in refused.paid if refused is not None else ():
        if journal.add_refused(row_id, line, paid):
            pt, ct, pico = pt + paid[0], ct + paid[1], pico + paid[2] + paid[3]
    return pt, ct, pico
