"""The journal's storage: the SQLite schema, its migrations, the rescue file, and how settings
are compared.

journal.py holds the behaviour (group commit, resume lookups, rescue); this module holds what the
file looks like on disk, so that a schema change is one edit here and one migration step.

Schema 2 added ``truncated`` and ``tokens_counted``; a schema-1 journal (every row Dataoorts')
is migrated when opened, its ``truncated`` filled from the Dataoorts rule (completion_tokens equal
to max_tokens), so it resumes. Schema 3 added ``extra`` (a labeling row's result) and the
``attempts`` table: every request of a labeling row (first answer, re-ask, sample) is committed as
it comes back, with the rows, so a crash between a row's requests never pays for one twice.
Schema 4 added ``request_key``, ``answered_by`` and ``cached``: a row whose request another row
(or the cache) answered. Schema 5 gave rows an integer ``seq`` and moved the request-key index
into ``keyed``, built in bulk: indexed row by row, it rewrote an index page per row at every
commit, half of a row's journal cost (make bench). Older journals are rebuilt once when opened. Schema 6 added the ``carried`` table (what rows
sent again had cost before); it is created in any older journal when opened. Schema 7 added
``pack_id`` and ``pack_position`` to ``attempts`` (a row answered in a packed request,
labeling/pack.py), added to an older journal when opened; the ``reviews`` table (people's
verdicts, review/verdicts.py) is created in any journal when opened. Schema 8 added
``endpoint`` to ``rows`` (the fleet endpoint that answered, engine/router.py), and schema 9 to
``attempts`` (each request of a labeling row may go to another endpoint). Schema 10 added
``cached_tokens`` to ``rows`` (prompt tokens the server served from its prompt cache), NULL in
the rows of an older journal, and ``served_model`` to both (the model a reply named), added to an
older journal when opened. Schema 11 added ``confidence`` to ``attempts`` (a reply's confidence,
labeling/confidence.py ``stored``: a row resumed or read again by ``--reparse`` keeps it; a row's
entry has it in ``extra``), NULL in an older journal's attempts. Schema 12 added ``cached_tokens``
to ``attempts`` (a row resumed from its attempts counted 0 for them; their costs were exact), NULL
in an older journal's attempts. Schema 13 added ``cached_saved_pico`` to ``rows`` (what a row's
cached tokens saved at the prices it was answered at), NULL in an older journal's rows. The ``refused`` table (the
result lines whose cost ``import-batch`` carried for a row it refused, spend.py ``add_refused``)
is created in any journal when opened.
"""

from __future__ import annotations

import operator
import os
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson

from ..records import Entry

SCHEMA_VERSION = 13
DB_NAME = "journal.sqlite"
RESCUE_NAME = "rescued-rows.jsonl"

# ``seq`` orders rows as written (a REPLACE gets a new one, and rows are never deleted, so it only
# grows): what the bulk-built request-key index has covered is one number (journal.py).
ROWS_TABLE = """CREATE TABLE IF NOT EXISTS rows (
    seq INTEGER PRIMARY KEY,
    row_id TEXT NOT NULL UNIQUE,
    content_hash TEXT NOT NULL,
    status TEXT NOT NULL,
    response TEXT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    input_cost_pico INTEGER,
    output_cost_pico INTEGER,
    error TEXT,
    error_class TEXT,
    attempts INTEGER NOT NULL,
    latency_ms REAL,
    finished_at REAL NOT NULL,
    model TEXT,
    truncated INTEGER,
    tokens_counted INTEGER,
    extra TEXT,
    request_key TEXT,
    answered_by TEXT,
    cached INTEGER,
    endpoint TEXT,
    cached_tokens INTEGER,
    served_model TEXT,
    cached_saved_pico INTEGER
)"""
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
{ROWS_TABLE};
CREATE TABLE IF NOT EXISTS keyed (key TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (key, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS attempts (
    row_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    sample INTEGER NOT NULL,
    kind TEXT NOT NULL,
    text TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    input_cost_pico INTEGER,
    output_cost_pico INTEGER,
    truncated INTEGER NOT NULL,
    pack_id TEXT,
    pack_position INTEGER,
    endpoint TEXT,
    served_model TEXT,
    confidence TEXT,
    cached_tokens INTEGER,
    PRIMARY KEY (row_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reviews (
    row_id TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    reviewer TEXT,
    reviewed_at REAL NOT NULL,
    pick TEXT
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS carried (
    row_id TEXT PRIMARY KEY,
    requests INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    input_cost_pico INTEGER NOT NULL,
    output_cost_pico INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS refused (row_id TEXT NOT NULL, line TEXT NOT NULL, PRIMARY KEY (row_id, line))
    WITHOUT ROWID;
"""
# A row sent again (--retry-errors, --refresh-changed) keeps what its earlier answers cost
# (journal.py, ``supersede``): ``carried`` adds the entry's tokens and costs up per row, then the
# entry goes (the row is pending until its new answer). A labeling row that resumes from its
# attempts keeps them instead: its one-request entry becomes attempt 0 first.
_ADD_UP = (
    " ON CONFLICT (row_id) DO UPDATE SET "
    "requests = requests + excluded.requests, prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
    "completion_tokens = completion_tokens + excluded.completion_tokens, "
    "input_cost_pico = input_cost_pico + excluded.input_cost_pico, "
    "output_cost_pico = output_cost_pico + excluded.output_cost_pico"
)
CARRY = (
    "INSERT INTO carried SELECT row_id, attempts, COALESCE(prompt_tokens, 0), "
    "COALESCE(completion_tokens, 0), COALESCE(input_cost_pico, 0), COALESCE(output_cost_pico, 0) "
    "FROM rows WHERE row_id = ?1 AND true" + _ADD_UP
)
# A row with no entry answered by an import (backends/batch_transfer.py): the requests it paid
# for before (an unreadable pack's shares) stay its cost, carried, as the new entry has only its own.
CARRY_PRIOR = (
    "INSERT INTO carried SELECT row_id, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), "
    "COALESCE(SUM(input_cost_pico), 0), COALESCE(SUM(output_cost_pico), 0) FROM attempts "
    "WHERE row_id = ?1 AND row_id NOT IN (SELECT row_id FROM rows) GROUP BY row_id" + _ADD_UP
)
# A reply paid for and not kept (import-batch refused it, batch_keys.py): its row's ``carried``.
# (row_id, requests, prompt and completion tokens, input and output picodollars): -1 and less
# take a line back (an import that keeps what one before it refused).
CARRY_PAID = "INSERT INTO carried VALUES (?, ?, ?, ?, ?, ?)" + _ADD_UP
AS_ATTEMPT = (
    "INSERT INTO attempts (row_id, seq, sample, kind, text, prompt_tokens, completion_tokens, "
    "input_cost_pico, output_cost_pico, truncated, pack_id, pack_position, endpoint, served_model, "
    "confidence, cached_tokens) SELECT row_id, 0, 0, 'first', response, COALESCE(prompt_tokens, 0), "
    "COALESCE(completion_tokens, 0), input_cost_pico, output_cost_pico, COALESCE(truncated, 0), "
    "json_extract(extra, '$.pack_id'), json_extract(extra, '$.pack_position'), endpoint, served_model, "
    # A label's confidence kept with the label it measured (labeling/confidence.py ``stored``), as
    # written: ``->`` gives the number's own text (json_array would round it to 15 digits).
    "CASE WHEN json_type(extra, '$.confidence') IN ('real', 'integer') "
    "AND json_type(extra, '$.value') = 'text' "
    "THEN '[' || (extra -> '$.value') || ',' || (extra -> '$.confidence') || ']' "
    "ELSE extra -> '$.confidence' END, cached_tokens "
    "FROM rows WHERE row_id = ?1 AND response IS NOT NULL "
    "AND NOT EXISTS (SELECT 1 FROM attempts WHERE row_id = ?1)"
)
COLUMNS = Entry._fields
# A row that failed for the server's reasons (5xx, timeouts, no connection, 429s past their
# retries) failed for no fault of its own: the next run sends it again, --retry-errors or not.
SANDBOX_ANSWERS = "sandbox_answers"  # meta: are the answers batchllm's sandbox's (reopen.py)?
TRANSIENT = "transient"
TRANSIENT_CLASSES = ("RetryableAPIError", "RequestTimeout")  # errors.py: the server's failures
TRANSIENT_SQL = f"error_class IN ({', '.join(repr(c) for c in TRANSIENT_CLASSES)})"  # of ``rows``
STATUS = f"CASE WHEN r.status = 'error' AND r.{TRANSIENT_SQL} THEN '{TRANSIENT}' ELSE r.status END"


def _insert(columns: Sequence[str]) -> str:
    return f"INSERT OR REPLACE INTO rows ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


INSERT_ROW = _insert(COLUMNS)
# Most rows are answers of their own: no error, not answered by another row or the cache. Written
# all alike, a flush's rows leave out the columns they all leave empty (NULL by default): sqlite3
# binds each None through an adapter lookup, and those five made a third of a row's insert.
_E, _K, _A, _C, _X, _N = (
    COLUMNS.index(c) for c in ("error", "error_class", "answered_by", "cached", "extra", "endpoint")
)
_LABELED = [c for c in COLUMNS if c not in ("error", "error_class", "answered_by", "cached", "endpoint")]
_PLAIN = [c for c in _LABELED if c != "extra"]
_INSERT_PLAIN = _insert(_PLAIN), operator.itemgetter(*(COLUMNS.index(c) for c in _PLAIN))
_INSERT_LABELED = _insert(_LABELED), operator.itemgetter(*(COLUMNS.index(c) for c in _LABELED))
_ADDED = {
    "truncated": "INTEGER",
    "tokens_counted": "INTEGER",
    "extra": "TEXT",
    "request_key": "TEXT",
    "answered_by": "TEXT",
    "cached": "INTEGER",
    "endpoint": "TEXT",
    "cached_tokens": "INTEGER",
    "served_model": "TEXT",
    "cached_saved_pico": "INTEGER",
}
# Columns named: a journal migrated from an older schema has them in the order they were added.
INSERT_ATTEMPT = (
    "INSERT OR REPLACE INTO attempts (row_id, seq, sample, kind, text, prompt_tokens, completion_tokens, "
    "input_cost_pico, output_cost_pico, truncated, pack_id, pack_position, endpoint, served_model, "
    "confidence, cached_tokens) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def insert_rows(entries: list[Entry]) -> tuple[str, Iterable[Sequence[Any]]]:
    """The INSERT for a flush's entries, and its values (one statement for all: rows stay in order)."""
    if all(
        r[_E] is None and r[_K] is None and r[_A] is None and r[_C] is None and r[_N] is None for r in entries
    ):
        if all(r[_X] is None for r in entries):
            return _INSERT_PLAIN[0], map(_INSERT_PLAIN[1], entries)
        if all(r[_X] is not None for r in entries):  # labeling rows
            return _INSERT_LABELED[0], map(_INSERT_LABELED[1], entries)
    return INSERT_ROW, entries


def db_path(journal_dir: Path) -> Path:
    return journal_dir / DB_NAME


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    # Checkpoint the WAL into the database every 64 MB rather than every 4 MB: at thousands of
    # replies a second the default made checkpoints a measurable share of a run (make bench).
    conn.execute("PRAGMA wal_autocheckpoint=16384")
    return conn


def entry_of(values: list[Any]) -> Entry:
    """A rescued row; one written by schema 1 lacks the columns added since."""
    return Entry(*values, *([None] * (len(COLUMNS) - len(values))))


def write_rescued(path: Path, records: list[Entry], attempts: list[tuple[Any, ...]]) -> None:
    """Append rows (JSON arrays) and attempts (``{"attempt": [...]}``) the journal could not take
    to the rescue file, synced to disk; raises OSError when even that fails."""
    lines = [orjson.dumps(list(r)) for r in records]
    lines += [orjson.dumps({"attempt": list(a)}) for a in attempts]
    with open(path, "ab") as fh:
        fh.write(b"".join(line + b"\n" for line in lines))
        fh.flush()
        os.fsync(fh.fileno())


def read_rescued(path: Path) -> tuple[list[Entry], list[tuple[Any, ...]]]:
    loaded = [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
    records = [entry_of(x) for x in loaded if isinstance(x, list)]
    attempts = [x["attempt"] for x in loaded if isinstance(x, dict)]
    # Schema 10: 14 values, 9: 13, 7: 12, before: 10.
    return records, [tuple(a + [None] * (15 - len(a))) for a in attempts]


# Columns of ``attempts`` added since schema 6, in order.
_ADDED_ATTEMPTS = {
    "pack_id": "TEXT",
    "pack_position": "INTEGER",
    "endpoint": "TEXT",
    "served_model": "TEXT",
    "confidence": "TEXT",
    "cached_tokens": "INTEGER",
}


def migrate(conn: sqlite3.Connection) -> None:
    """Bring an older journal up to date: schema 1 gets the columns added since (``truncated``
    filled from the Dataoorts rule), and a journal before schema 5 its rows rebuilt with ``seq``
    (their request-key index is then built in bulk like any other, journal.py)."""
    packed = {r[1] for r in conn.execute("PRAGMA table_info(attempts)")}
    added = [c for c in _ADDED_ATTEMPTS if c not in packed]
    for column in added:
        conn.execute(f"ALTER TABLE attempts ADD COLUMN {column} {_ADDED_ATTEMPTS[column]}")
    if added:
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
        )
    have = {r[1] for r in conn.execute("PRAGMA table_info(rows)")}
    missing = [c for c in _ADDED if c not in have]
    if not missing and "seq" in have:
        return
    conn.execute("BEGIN")
    for column in missing:
        conn.execute(f"ALTER TABLE rows ADD COLUMN {column} {_ADDED[column]}")
    row = conn.execute("SELECT value FROM meta WHERE key = 'settings'").fetchone()
    max_tokens = (orjson.loads(row[0]).get("params") or {}).get("max_tokens") if row else None
    if isinstance(max_tokens, int) and "truncated" in missing:
        conn.execute(
            "UPDATE rows SET truncated = (completion_tokens >= ?), tokens_counted = 0 WHERE status = 'ok'",
            (max_tokens,),
        )
    if "seq" not in have:
        # Schema 4 and before: a WITHOUT ROWID table whose key index was kept row by row.
        columns = ", ".join(COLUMNS)
        conn.execute("ALTER TABLE rows RENAME TO rows_before_5")
        conn.execute(ROWS_TABLE)
        conn.execute(f"INSERT INTO rows ({columns}) SELECT {columns} FROM rows_before_5 ORDER BY finished_at")
        conn.execute("DROP TABLE rows_before_5")
    conn.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
    )
    conn.execute("COMMIT")


def length_change(stored: dict[str, Any], current: dict[str, Any]) -> tuple[int, int] | None:
    """(old, new) ``max_tokens`` when that is all two request settings differ by, else None.

    A reply made with another ``max_tokens`` still answers its prompt (``truncated`` says when
    the limit cut it): a journal resumes across that change and keeps what it paid for, where
    any other setting makes other requests (``--restart``)."""
    old_params, new_params = dict(stored.get("params") or {}), dict(current.get("params") or {})
    old, new = old_params.pop("max_tokens", None), new_params.pop("max_tokens", None)
    if old == new or not isinstance(old, int) or not isinstance(new, int):
        return None
    if {**stored, "params": old_params} != {**current, "params": new_params}:
        return None
    return old, new


def mismatch(directory: Path, stored: dict[str, Any], current: dict[str, Any], diffs: list[str]) -> str:
    """Why a journal is refused, and the ways on: the same settings, ``--restart`` (paid again),
    or, when only the label set or schema changed, ``--reparse`` (the replies read again, free)."""
    ways = "run with --restart to discard it, or with the same settings to resume"
    if {k for k in stored.keys() | current.keys() if stored.get(k) != current.get(k)} == {"labeling"}:
        ways = (
            "--reparse reads its replies again under these labels or schema, sending nothing; "
            "or --restart to discard it and pay for every row again"
        )
    return f"{directory} was written with other settings ({'; '.join(diffs)}): {ways}"


def settings_diff(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human lines naming each request setting that differs: ``template: 'a' -> 'b'``."""
    flat_old, flat_new = _flatten(stored), _flatten(current)
    diffs = []
    for key in sorted(set(flat_old) | set(flat_new)):
        old, new = flat_old.get(key), flat_new.get(key)
        if old == new:
            continue
        if key == "sandbox":  # a mark, not a value: said in words
            diffs.append(
                "this run uses the sandbox; the journal was written without it"
                if new
                else "the journal was written against the sandbox; this run is a real one"
            )
        elif isinstance(old, str) and isinstance(new, str):
            a, b = _where_they_differ(old, new)
            diffs.append(f"{key}: journal has {a}, this run has {b}")
        else:
            diffs.append(f"{key}: journal has {_show(old)}, this run has {_show(new)}")
    return diffs


def _where_they_differ(old: str, new: str, context: int = 20, width: int = 60) -> tuple[str, str]:
    """Two long texts shown where they first differ (a common start is elided), so a message
    never shows the same prefix for both sides."""
    if len(old) <= width and len(new) <= width:
        return repr(old), repr(new)
    start = 0
    while start < min(len(old), len(new)) and old[start] == new[start]:
        start += 1
    begin = max(0, start - context)

    def piece(text: str) -> str:
        part = text[begin : begin + width]
        shown = repr(part)
        return ("..." if begin else "") + shown + ("..." if begin + width < len(text) else "")

    return piece(old), piece(new)


def _flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out.update(_flatten(value, ""))
        elif value is not None:
            out[prefix + key] = value
    return out


def _show(value: Any) -> str:
    if value is None:
        return "none"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "...'"
