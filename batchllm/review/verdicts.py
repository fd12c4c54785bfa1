"""Reviewers' verdicts: read from a Label Studio JSON export, kept in the output's journal, and
shown as columns of the output.

For each task, the latest annotation that was not cancelled (skipped) is the verdict: its value
for the label set (``review_label``) or each schema field (``review_<field>``), who made it and
when. Verdicts live in the journal's ``reviews`` table, so a later ``run`` (a resume,
``--retry-errors``, ``--reparse``) writes them again, and importing the same export twice
changes nothing. ``label_final`` (``<field>_final``) is the reviewed value where there is one,
else the model's.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from ..engine.counts import plural
from ..errors import JobError
from ..labeling.spec import Field, Labeling
from ..sniff import read_text
from .studio import LABEL


class Verdict(NamedTuple):
    row_id: str
    value: dict[str, Any]  # the control's name ("label", or a field) -> the reviewed value
    reviewer: str | None
    reviewed_at: float
    pick: str | None


def read_export(path: Path, labeling: Labeling) -> list[Verdict]:
    """A Label Studio JSON export's verdicts; a file that is not one: a usage error naming the
    first bad task."""
    try:
        tasks = orjson.loads(read_text(path, "export"))
    except OSError as exc:
        raise JobError(f"{path}: cannot read the export ({exc.strerror})") from None
    except orjson.JSONDecodeError as exc:
        raise JobError(f"{path}: not a Label Studio JSON export ({exc.msg})") from None
    return verdicts_of(tasks, labeling, str(path))


def verdicts_of(
    tasks: Any, labeling: Labeling, where: str, people: dict[int, str] | None = None
) -> list[Verdict]:
    """The verdicts of an export's tasks (``where`` names the export in messages; ``people``
    turns the user ids an export names reviewers by into their emails)."""
    if not isinstance(tasks, list):
        raise JobError(f"{where}: not a Label Studio JSON export (a list of tasks)")
    out = []
    unread: list[tuple[int, list[str]]] = []  # annotated tasks naming no field of this review
    for n, t in enumerate(tasks, 1):
        data = t.get("data") if isinstance(t, dict) else None
        row_id = data.get("row_id") if isinstance(data, dict) else None
        annotations = t.get("annotations", []) if isinstance(t, dict) else None
        if not isinstance(row_id, str) or not isinstance(annotations, list):
            raise JobError(f"{where}: task {n} is not a batchllm review task (no data.row_id or annotations)")
        assert isinstance(data, dict)
        done = [a for a in annotations if isinstance(a, dict) and not a.get("was_cancelled")]
        if not done:
            continue
        last = max(done, key=lambda a: str(a.get("updated_at") or a.get("created_at") or ""))
        value = _value(last.get("result") or [], labeling)
        if value:
            who = _who(last.get("completed_by"), people or {})
            out.append(Verdict(row_id, value, who, _when(last), data.get("pick")))
        elif last.get("result"):
            unread.append(
                (n, sorted({str(r.get("from_name")) for r in last["result"] if isinstance(r, dict)}))
            )
    if unread and not out:  # "imported 0 verdicts" and exit 0 hid a whole export read as nothing
        n, names = unread[0]
        asked = ", ".join(f.name for f in labeling.fields) or LABEL
        raise JobError(
            f"{where}: {plural(len(unread), 'annotated task')}, none answering this review's {asked} (task {n} "
            f"answers {', '.join(names) or 'nothing named'}): an export of another project or labeling?"
        )
    return out


def _value(result: list[Any], labeling: Labeling) -> dict[str, Any]:
    fields = {f.name: f for f in labeling.fields}
    out: dict[str, Any] = {}
    for r in result:
        name, value = r.get("from_name"), r.get("value") or {}
        if name == LABEL and not labeling.is_schema and value.get("choices"):
            out[LABEL] = value["choices"][0]
        elif name in fields:
            out[name] = _typed(fields[name], value)
    return out


def _typed(f: Field, value: dict[str, Any]) -> Any:
    if "choices" in value:
        choices = value["choices"]
        if f.type == "boolean":
            return choices[0] == "true"
        return list(choices) if f.type == "array" else choices[0]
    if "number" in value:
        return int(value["number"]) if f.type == "integer" else float(value["number"])
    text = (value.get("text") or [""])[0]
    return [x.strip() for x in text.split(",") if x.strip()] if f.type == "array" else text


def _who(completed_by: Any, people: dict[int, str]) -> str | None:
    if isinstance(completed_by, dict):
        return str(completed_by.get("email") or completed_by.get("id"))
    if isinstance(completed_by, int) and completed_by in people:
        return people[completed_by]
    return None if completed_by is None else str(completed_by)


def _when(annotation: dict[str, Any]) -> float:
    stamp = str(annotation.get("updated_at") or annotation.get("created_at") or "")
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


# -- the journal's reviews table -------------------------------------------------------------


def store(conn: sqlite3.Connection, verdicts: list[Verdict]) -> int:
    """Keep verdicts (a row's newer verdict replaces its older one); returns how many changed."""
    before = conn.total_changes
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO reviews VALUES (?, ?, ?, ?, ?) ON CONFLICT (row_id) DO UPDATE SET value = excluded.value, "
        "reviewer = excluded.reviewer, reviewed_at = excluded.reviewed_at, pick = excluded.pick "
        "WHERE excluded.value != reviews.value OR excluded.reviewed_at != reviews.reviewed_at",
        [(v.row_id, orjson.dumps(v.value).decode(), v.reviewer, v.reviewed_at, v.pick) for v in verdicts],
    )
    conn.execute("COMMIT")
    return conn.total_changes - before


def has_reviews(conn: sqlite3.Connection) -> bool:
    try:
        return conn.execute("SELECT EXISTS (SELECT 1 FROM reviews)").fetchone()[0] == 1
    except sqlite3.OperationalError:  # a journal from before reviews, opened read-only
        return False


def reviews_for(conn: sqlite3.Connection, row_ids: Sequence[str]) -> dict[str, Verdict]:
    rows = conn.execute(
        "SELECT row_id, value, reviewer, reviewed_at, pick FROM reviews WHERE row_id IN "
        "(SELECT value FROM json_each(?))",
        (orjson.dumps(list(row_ids)),),
    )
    return {r[0]: Verdict(r[0], orjson.loads(r[1]), r[2], r[3], r[4]) for r in rows}


# -- output columns --------------------------------------------------------------------------


def review_fields(labeling: Labeling) -> list[pa.Field]:
    typed = [pa.field(f.name, f.arrow) for f in labeling.fields] or [pa.field(LABEL, pa.string())]
    cols = [pa.field(f"review_{f.name}", f.type) for f in typed]
    cols += [pa.field(f"{f.name}_final", f.type) for f in typed]
    return [*cols, pa.field("reviewed_at", pa.timestamp("ms", tz="UTC")), pa.field("reviewer", pa.string()),
            pa.field("review_pick", pa.string())]  # fmt: skip


def review_columns(
    row_ids: list[str], model: dict[str, list[Any]], verdicts: dict[str, Verdict], labeling: Labeling
) -> list[pa.Array]:
    """The review columns of these rows; ``model`` holds the model's values by control name."""
    fields = review_fields(labeling)
    names = [f.name for f in labeling.fields] or [LABEL]
    cols: dict[str, list[Any]] = {f.name: [None] * len(row_ids) for f in fields}
    for name in names:
        cols[f"{name}_final"] = list(model[name])
    for i, row_id in enumerate(row_ids):
        v = verdicts.get(row_id)
        if v is None:
            continue
        for name in names:
            if name in v.value:
                cols[f"review_{name}"][i] = v.value[name]
                cols[f"{name}_final"][i] = v.value[name]
        cols["reviewed_at"][i] = int(v.reviewed_at * 1000)
        cols["reviewer"][i] = v.reviewer
        cols["review_pick"][i] = v.pick
    return [pa.array(cols[f.name], type=f.type) for f in fields]


def reviewed_counts(path: Path) -> dict[str, int] | None:
    """How many rows of an output people reviewed, and how many of those they changed; None
    when it has no review columns (``report``)."""
    names = pq.read_schema(path).names if path.is_file() else []
    finals = [n.removesuffix("_final") for n in names if n.endswith("_final") and f"review_{n[:-6]}" in names]
    if not finals:
        return None
    table = pq.read_table(path, columns=[c for f in finals for c in (f, f"review_{f}")]).to_pylist()
    reviewed = [r for r in table if any(r[f"review_{f}"] is not None for f in finals)]
    changed = sum(1 for r in reviewed if any(r[f"review_{f}"] not in (None, r[f]) for f in finals))
    return {"rows": len(reviewed), "changed": changed}
