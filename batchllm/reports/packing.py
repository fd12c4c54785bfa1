"""What packing rows (``--pack``) did for a report: requests, rows per request, tokens saved.

Read from the journal beside the output: a pack's id is in every attempt and entry it answered,
and each packed row keeps what its prompts would have counted alone (engine/labeled.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..engine.journal import DB_NAME, Journal

_PACKS = (
    "SELECT COUNT(*) FROM (SELECT pack_id FROM attempts WHERE pack_id IS NOT NULL AND pack_id != 'cache' "
    "UNION SELECT json_extract(extra, '$.pack_id') FROM rows WHERE answered_by IS NULL "
    "AND json_extract(extra, '$.pack_id') IS NOT NULL AND json_extract(extra, '$.pack_id') != 'cache')"
)
_ALONE = (
    "SELECT COALESCE(SUM(attempts), 0) FROM rows WHERE answered_by IS NULL "
    "AND json_extract(extra, '$.pack_id') IS NULL"
)
# Rows a sent pack answered (a row the cache answered whole took no request; an identical
# row's copy neither): each keeps what its own requests' prompts would have been alone.
_SAVED = (
    "SELECT COUNT(*), COALESCE(SUM(json_extract(extra, '$.alone_prompt_tokens')), 0), "
    "COALESCE(SUM(prompt_tokens), 0) FROM rows AS r WHERE answered_by IS NULL "
    "AND json_extract(extra, '$.alone_prompt_tokens') IS NOT NULL "
    "AND (COALESCE(json_extract(extra, '$.pack_id'), 'cache') != 'cache' OR EXISTS (SELECT 1 FROM "
    "attempts AS a WHERE a.row_id = r.row_id AND a.pack_id IS NOT NULL AND a.pack_id != 'cache'))"
)


def requests_made(journal: Journal) -> int:
    """Requests the journal's rows took: one-row requests, and packs (each counted once)."""
    conn = journal.conn
    return int(conn.execute(_ALONE).fetchone()[0]) + int(conn.execute(_PACKS).fetchone()[0])


def packing(path: Path) -> dict[str, Any] | None:
    """Packed requests and what they saved, or None when no row was packed (or no journal)."""
    directory = path.with_name(path.name + ".batchllm")
    if not (directory / DB_NAME).is_file():
        return None
    journal = Journal.open_readonly(directory)
    try:
        requests = journal.conn.execute(_PACKS).fetchone()[0]
        rows, alone, packed = journal.conn.execute(_SAVED).fetchone()
    finally:
        journal.conn.close()
    if not requests or not rows:
        return None
    return {
        "requests": int(requests),
        "rows": int(rows),
        "rows_per_request": f"{rows / requests:.2f}",
        "prompt_tokens": int(packed),
        "prompt_tokens_alone": int(alone),
        "prompt_tokens_saved": int(alone) - int(packed),
    }
