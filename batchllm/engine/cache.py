"""The response cache: one SQLite file shared by every run and output of this user.

Where: ``--cache DIR``, else ``$XDG_CACHE_HOME/batchllm``, else ``~/.cache/batchllm``. What: the
reply to a request, keyed by a hash of the endpoint it came from and the request's canonical key
(records.py: provider, model, messages, parameters), so a reply from the sandbox, or from another
server, is never served to a run against a different endpoint. It stores the reply's text,
usage and truncation, and a labeling reply's confidence (labeling/confidence.py: the figure, as
JSON, not the logprobs it came from), never a key or a header. A cache written before
``confidence`` gains the column when opened; its replies are served with none.

Which requests it serves: by default (``auto``) only those whose answer is meant to be
repeatable, at temperature 0 or with a seed; ``always`` serves any identical request; ``off``
neither reads nor writes. Writes are batched like the journal's: one commit per event-loop turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ..errors import JobError
from ..records import Request

DB_NAME = "responses.sqlite"
FLUSH_EVERY_S = 0.25
_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    response TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    truncated INTEGER NOT NULL,
    created_at REAL NOT NULL,
    confidence TEXT,
    cached_tokens INTEGER
) WITHOUT ROWID;
"""
_INSERT = (
    "INSERT OR REPLACE INTO responses (key, response, prompt_tokens, completion_tokens, truncated, "
    "created_at, confidence, cached_tokens) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


@dataclass(frozen=True, slots=True)
class Cached:
    response: str
    prompt_tokens: int
    completion_tokens: int
    truncated: bool
    confidence: Any = None  # a labeling reply's (labeling/confidence.py): a label's, or fields'
    cached_tokens: int = 0  # of prompt_tokens, those the server had cached (billed at the cached price)


def default_dir(environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "batchllm"


def repeatable(request: Request) -> bool:
    """Is this request's answer meant to be the same every time (temperature 0, or a seed)?"""
    params = request.params
    return params.get("temperature") == 0 or params.get("seed") is not None


def _migrate(conn: sqlite3.Connection) -> None:
    """A cache written before replies kept their confidence, or their cached prompt tokens, gains
    the column (NULL in old rows: no confidence; no cached tokens known, so a hit's saving is at
    the input price)."""
    for column, kind in (("confidence", "TEXT"), ("cached_tokens", "INTEGER")):
        if column not in {r[1] for r in conn.execute("PRAGMA table_info(responses)")}:
            try:
                conn.execute(f"ALTER TABLE responses ADD COLUMN {column} {kind}")
            except sqlite3.OperationalError:  # another run opening it added it first
                if column not in {r[1] for r in conn.execute("PRAGMA table_info(responses)")}:
                    raise


def cache_key(endpoint: str, request_key: str) -> str:
    return hashlib.blake2b(f"{endpoint}\0{request_key}".encode(), digest_size=16).hexdigest()


class ResponseCache:
    def __init__(self, directory: Path, policy: str = "auto") -> None:
        self.directory = directory
        self.policy = policy
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(directory / DB_NAME, isolation_level=None, check_same_thread=False)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute("PRAGMA busy_timeout=5000")
            self.conn.executescript(_SCHEMA)
            _migrate(self.conn)
        except (OSError, sqlite3.Error) as exc:
            raise JobError(f"{directory}: cannot open the response cache: {exc}") from None
        self._pending: list[tuple[Any, ...]] = []
        self._scheduled = False
        self.hits = 0
        self.saved_pico = 0

    def serves(self, request: Request) -> bool:
        return self.policy == "always" or (self.policy == "auto" and repeatable(request))

    def get_many(self, keys: Sequence[str]) -> dict[str, Cached]:
        if not keys:
            return {}
        cur = self.conn.execute(
            "SELECT key, response, prompt_tokens, completion_tokens, truncated, confidence, cached_tokens "
            "FROM responses "
            "WHERE key IN (SELECT value FROM json_each(?))",
            (orjson.dumps(list(keys)),),
        )
        return {
            r[0]: Cached(
                r[1], r[2], r[3], bool(r[4]), None if r[5] is None else orjson.loads(r[5]), r[6] or 0
            )
            for r in cur
        }

    def put(
        self,
        key: str,
        response: str,
        prompt_tokens: int,
        completion_tokens: int,
        truncated: bool,
        confidence: Any = None,
        cached_tokens: int = 0,
    ) -> None:
        sure = None if confidence is None else orjson.dumps(confidence).decode()
        self._pending.append(
            (
                key,
                response,
                prompt_tokens,
                completion_tokens,
                int(truncated),
                time.time(),
                sure,
                cached_tokens,
            )
        )
        if not self._scheduled:
            self._scheduled = True
            try:
                # Not the journal: losing the last fraction of a second costs a later run a
                # request, never a reply, so commit a few times a second, not every loop turn.
                asyncio.get_running_loop().call_later(FLUSH_EVERY_S, self.flush)
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        # In key order, each page of the (randomly keyed) table is written once per commit, not
        # once per reply.
        pending.sort()
        # A cache that cannot be written costs a later run a request, never a reply: go on.
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute("BEGIN")
            self.conn.executemany(_INSERT, pending)
            self.conn.execute("COMMIT")

    def close(self) -> None:
        self.flush()
        self.conn.close()

    def stats(self) -> dict[str, Any]:
        count, oldest, newest = self.conn.execute(
            "SELECT COUNT(*), MIN(created_at), MAX(created_at) FROM responses"
        ).fetchone()
        size = sum(f.stat().st_size for f in self.directory.glob(DB_NAME + "*"))
        return {
            "directory": str(self.directory),
            "entries": count,
            "bytes": size,
            "oldest": oldest,
            "newest": newest,
        }

    def clear(self, older_than_s: float | None = None) -> int:
        if older_than_s is None:
            cur = self.conn.execute("DELETE FROM responses")
        else:
            cur = self.conn.execute(
                "DELETE FROM responses WHERE created_at < ?", (time.time() - older_than_s,)
            )
        self.conn.execute("VACUUM")
        return cur.rowcount
