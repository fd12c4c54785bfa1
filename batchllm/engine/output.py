"""Input + journal -> the output Parquet, in input order, written atomically.

The input is streamed again batch by batch; each batch's results are fetched from the journal by
``row_id`` and appended as columns, so memory holds one batch, never the whole output. The file is
written to a temporary name beside the target and renamed over it only once complete (and fsynced),
so the output path holds either the previous complete file or the new one, never a partial one
(parquet_file.py: the one writer of output files, which ``review import``'s rewrite shares).

Rows the journal does not have (a stopped run) get ``status = "pending"`` and nulls. The schema is
the same whichever provider answered; cost columns are null for a model without a price.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from ..inputs import InputFile
from ..labeling.spec import Labeling
from ..pricing import Prices, cached_saving, rows_saving, to_usd
from ..records import Entry
from ..review.verdicts import has_reviews, review_columns, review_fields, reviews_for
from . import counts
from .admission import ALONE
from .journal import Journal
from .journal_schema import TRANSIENT_CLASSES
from .outside import Outside, count
from .parquet_file import replacing

if TYPE_CHECKING:
    from ..prompts import Builder

RESULT_FIELDS = [
    pa.field("row_id", pa.string()),
    pa.field("response", pa.string()),
    pa.field("prompt_tokens", pa.int64()),
    pa.field("completion_tokens", pa.int64()),
    pa.field("total_tokens", pa.int64()),
    # Of prompt_tokens, those the server served from its prompt cache (billed at the cached price).
    pa.field("cached_tokens", pa.int64()),
    pa.field("input_cost_usd", pa.float64()),
    pa.field("output_cost_usd", pa.float64()),
    pa.field("cost_usd", pa.float64()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("attempts", pa.int64()),
    pa.field("latency_ms", pa.float64()),
    pa.field("truncated", pa.bool_()),
    pa.field("tokens_counted", pa.bool_()),  # the server reported no usage: batchllm counted
    pa.field("answered_by", pa.string()),  # the row whose identical request paid for this reply
    pa.field("cached", pa.bool_()),  # answered from the response cache, at no cost
    pa.field("model", pa.string()),  # the model asked for, and priced
    pa.field("served_model", pa.string()),  # the model the reply named (null: it named none)
    pa.field("finished_at", pa.timestamp("ms", tz="UTC")),
]
RESULT_NAMES = [f.name for f in RESULT_FIELDS]
ENDPOINT_FIELD = pa.field("endpoint", pa.string())  # a fleet's runs only (engine/router.py)


def _endpoint(e: Entry | None) -> str | None:
    return None if e is None else e.endpoint


METADATA_KEY = b"batchllm"


class Totals:
    """Exact sums over the rows written, for the summary and the file's metadata."""

    def __init__(self) -> None:
        self.rows = self.ok = self.error = self.pending = self.truncated = 0
        self.counted = 0  # replies whose usage batchllm counted: the server reported none
        self.prompt_tokens = self.completion_tokens = 0
        self.cached_tokens = 0
        # What the rows' cached tokens saved, each at the prices it was answered at; and the
        # cached tokens of rows that kept no saving (written before it was kept: ``cached_saved``).
        self.cached_saved_pico = self.cached_unkept = 0
        self.input_cost_pico = self.output_cost_pico = 0
        self.invalid = 0  # labeling rows whose answers never validated
        self.no_prompt = 0  # errors that are rows with nothing to send (prompts.py): never sent
        self.over_window = 0  # errors refused before sending: prompt + max_tokens over the window
        self.over_window_alone = 0  # of them, the prompt alone over it: no max_tokens sends them
        self.transient = 0  # errors the server caused (5xx, timeouts...): the next run sends them
        self.changed = 0  # ok rows whose input changed under their --id-column value (--refresh-changed)
        self.priced = 0  # rows with a cost
        self.unpriced = 0  # answered rows without a cost (no price for the model)
        self.from_cache = self.copied = 0  # rows answered without a request (counts.py)
        self.outside = Outside()  # journal entries no input row asks for any more (outside.py)

    @property
    def failed(self) -> int:
        """Rows that failed in a way a retry may mend: not the rows without a prompt, which no
        run will send, so they alone leave a run's exit code 0."""
        return self.error - self.no_prompt + self.invalid

    @property
    def cost_pico(self) -> int:
        return self.input_cost_pico + self.output_cost_pico

    def cached_saved(self, prices: Prices | None) -> int | None:
        """What the prompt cache saved over these rows, each row at the prices it was answered
        at; a row that kept no saving (an older journal's) at ``prices``, None without them."""
        discount = None if prices is None else cached_saving(prices, 1)
        return rows_saving(self.cached_saved_pico, self.cached_unkept, discount)

    def refused_advice(self, labeling: Labeling | None, max_tokens: int) -> str:
        """What sends the rows refused before sending (each time alike: a setting is what to change)."""
        n = counts.plural(self.over_window, "row")
        if not self.over_window:
            return ""
        if labeling is not None and labeling.pack > 1 and labeling.pack_tokens:
            return (
                f"; {n} too long for a pack of --pack-tokens, not sent: a higher --pack-tokens with "
                "--retry-errors, or a lower --max-tokens, sends them"
            )
        if self.over_window_alone == self.over_window:
            return f"; {n} over the context window with max_tokens {max_tokens:,}, not sent: each prompt alone is over it (shorten them)"
        return (
            f"; {n} over the context window with max_tokens {max_tokens:,}, not sent: a lower --max-tokens "
            "sends those whose prompt alone fits (the error column says which)"
        )

    def cost_or_none(self, pico: int) -> int | None:
        """A cost total, or None when no answered row had a price."""
        return None if self.unpriced and not self.priced else pico

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "ok": self.ok,
            "error": self.error,
            "invalid": self.invalid,
            "no_prompt": self.no_prompt,
            "pending": self.pending,
            "truncated": self.truncated,
            "from_cache": self.from_cache,
            "answered_by_identical_rows": self.copied,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "input_cost_pico": self.input_cost_pico,
            "output_cost_pico": self.output_cost_pico,
            "unpriced": self.unpriced,
        }


def write_output(
    path: Path,
    source: InputFile,
    builder: Builder,
    journal: Journal,
    metadata: Callable[[Totals], dict[str, Any]],
    labeling: Labeling | None = None,
    *,
    fleet: bool = False,
) -> Totals:
    """Write the output file atomically; ``metadata(totals)`` gives the summary stored in it.
    A fleet's run has an ``endpoint`` column: the endpoint that answered each row."""
    kept = source.output_columns
    extra = labeling.columns() if labeling is not None else []
    if fleet:
        extra = [ENDPOINT_FIELD, *extra]
    reviewed = labeling is not None and has_reviews(journal.conn)  # people's verdicts (review/)
    if reviewed:
        assert labeling is not None
        extra += review_fields(labeling)
    schema = pa.schema([source.schema.field(name) for name in kept] + RESULT_FIELDS + extra)
    totals = Totals()
    path.parent.mkdir(parents=True, exist_ok=True)
    unsettled = journal.has_unsettled()  # once: it scans the attempts
    with replacing(path, schema) as writer:
        position = 0
        for batch in source.batches():
            prompts = builder.build(batch.select(builder.read_columns), position)
            position += batch.num_rows
            entries = journal.fetch(prompts.row_ids)
            paid = journal.unsettled(prompts.row_ids) if unsettled else None
            # Under --id-column an edited row keeps its id: its hash says it changed (plan.py).
            hashes = None if builder.ids_embed_hash else prompts.hashes
            results = _result_columns(prompts.row_ids, entries, totals, paid, hashes)
            if fleet:
                results.append(pa.array([_endpoint(entries.get(r)) for r in prompts.row_ids], pa.string()))
            if labeling is not None:
                answers = label_columns(prompts.row_ids, entries, labeling)
                results += answers
                if reviewed:
                    model = {f.name: a.to_pylist() for f, a in zip(labeling.columns(), answers, strict=True)}
                    verdicts = reviews_for(journal.conn, prompts.row_ids)
                    results += review_columns(prompts.row_ids, model, verdicts, labeling)
            arrays = [batch.column(name) for name in kept] + results
            writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))
        totals.outside = count(journal, totals, source.path)
        writer.add_key_value_metadata({METADATA_KEY: orjson.dumps(metadata(totals))})
    return totals


_NOTHING = (0, 0, 0, 0)


def _result_columns(
    row_ids: list[str],
    entries: dict[str, Entry],
    totals: Totals,
    unsettled: dict[str, tuple[int, int, int, int]] | None = None,
    hashes: Sequence[str] | None = None,
) -> list[pa.Array]:
    """The result columns of one batch. A row's tokens and costs are everything it paid for:
    its entry, plus what it cost before it was sent again and the requests of a labeling row
    not finished yet (``unsettled``, journal.py), so the rows' costs add up to what was billed.
    ``hashes``: the rows' content hashes, to count the rows answered before their input changed."""
    n = len(row_ids)
    cols: dict[str, list[Any]] = {name: [None] * n for name in RESULT_NAMES}
    cols["row_id"] = row_ids
    status = cols["status"]
    unsettled = unsettled or {}
    for i, row_id in enumerate(row_ids):
        e = entries.get(row_id)
        if e is None:
            status[i] = "pending"
            totals.pending += 1
            paid = unsettled.get(row_id)
            if paid is not None:
                e = Entry(row_id, "", "pending", None, *paid, None, None, 0, None, 0.0, None, None, None)
                _costs(cols, i, e, totals, _NOTHING)
            continue
        status[i] = e.status
        cols["response"][i] = e.response
        cols["error"][i] = e.error
        cols["attempts"][i] = e.attempts
        cols["latency_ms"][i] = e.latency_ms
        cols["model"][i] = e.model
        cols["served_model"][i] = e.served_model
        cols["answered_by"][i] = e.answered_by
        cols["cached"][i] = bool(e.cached)
        cols["finished_at"][i] = int(e.finished_at * 1000)
        totals.from_cache += counts.from_cache(e)
        totals.copied += counts.copied(e)
        if e.status == "error":
            totals.error += 1
            totals.no_prompt += e.error_class == "NoPrompt"
            totals.over_window += e.error_class == "ContextWindowExceeded"
            totals.over_window_alone += e.error_class == "ContextWindowExceeded" and ALONE in (e.error or "")
            totals.transient += e.error_class in TRANSIENT_CLASSES
        elif e.status == "invalid":
            totals.invalid += 1
        else:
            totals.ok += 1
            totals.changed += hashes is not None and e.content_hash != hashes[i]
        _costs(cols, i, e, totals, unsettled.get(row_id, _NOTHING) if unsettled else _NOTHING)
    totals.rows += n
    return [pa.array(cols[f.name], type=f.type) for f in RESULT_FIELDS]


def _costs(
    cols: dict[str, list[Any]], i: int, e: Entry, totals: Totals, before: tuple[int, int, int, int]
) -> None:
    if e.prompt_tokens is None and before is _NOTHING:  # refused, or failed before any reply
        return
    pt, ct = (e.prompt_tokens or 0) + before[0], (e.completion_tokens or 0) + before[1]
    cols["prompt_tokens"][i] = pt
    cols["completion_tokens"][i] = ct
    cols["total_tokens"][i] = pt + ct
    if e.prompt_tokens is not None:
        cached = e.cached_tokens or 0
        cols["cached_tokens"][i] = cached
        totals.cached_tokens += cached
        if e.cached_saved_pico is None:
            totals.cached_unkept += cached
        else:
            totals.cached_saved_pico += e.cached_saved_pico
        cols["truncated"][i] = bool(e.truncated)
        cols["tokens_counted"][i] = bool(e.tokens_counted)
        totals.counted += bool(e.tokens_counted)
        totals.truncated += counts.truncated(e)
    totals.prompt_tokens += pt
    totals.completion_tokens += ct
    ic, oc = e.input_cost_pico, e.output_cost_pico
    if e.prompt_tokens is None:  # no reply of its own: only what it paid before
        ic, oc = 0, 0
    if ic is None or oc is None:
        totals.unpriced += 1
        return
    ic, oc = ic + before[2], oc + before[3]
    cols["input_cost_usd"][i] = to_usd(ic)
    cols["output_cost_usd"][i] = to_usd(oc)
    cols["cost_usd"][i] = to_usd(ic + oc)
    totals.priced += 1
    totals.input_cost_pico += ic
    totals.output_cost_pico += oc


def label_columns(row_ids: list[str], entries: dict[str, Entry], labeling: Labeling) -> list[pa.Array]:
    """A labeling job's columns from each row's ``extra``: the label or the schema's typed fields,
    parse_error, reasks, agreement and votes, and what re-asks and extra samples cost."""
    fields = labeling.columns()
    cols: dict[str, list[Any]] = {f.name: [None] * len(row_ids) for f in fields}
    for i, row_id in enumerate(row_ids):
        e = entries.get(row_id)
        if e is None or e.extra is None:
            continue
        x = orjson.loads(e.extra)
        value = x.get("value")
        if labeling.is_schema:
            for f in labeling.fields:
                cols[f.name][i] = value.get(f.name) if isinstance(value, dict) else None
        else:
            cols["label"][i] = value
        if labeling.confidence != "off":
            sure = x.get("confidence")
            if labeling.is_schema:
                for f in labeling.fields:
                    if f.scored:
                        cols[f"confidence_{f.name}"][i] = sure.get(f.name) if isinstance(sure, dict) else None
            else:
                cols["confidence"][i] = sure if isinstance(sure, (int, float)) else None
        cols["parse_error"][i] = x.get("parse_error")
        cols["reasks"][i] = x.get("reasks")
        if "agreement" in cols:
            cols["agreement"][i] = x.get("agreement")
            votes = x.get("votes")
            cols["label_votes"][i] = list(votes.items()) if votes else None
        for kind in ("reask", "sample"):
            pico = x.get(f"{kind}_cost_pico")
            cols[f"{kind}_cost_usd"][i] = None if pico is None else to_usd(pico)
        if "pack_id" in cols:
            cols["pack_id"][i] = x.get("pack_id")
            cols["pack_position"][i] = x.get("pack_position")
    return [pa.array(cols[f.name], type=f.type) for f in fields]


def journal_table(journal: Journal) -> pa.Table:
    """The result columns of every row the journal knows (answered, or paid for and not finished),
    with what re-asks and extra samples cost: ``report`` reads it when the output is not
    written yet (a run died before writing it)."""
    tables = []
    ids = journal.known_rows()
    unsettled = journal.has_unsettled()
    for start in range(0, len(ids), 8192):
        chunk = ids[start : start + 8192]
        entries = journal.fetch(chunk)
        arrays = _result_columns(chunk, entries, Totals(), journal.unsettled(chunk) if unsettled else None)
        split: dict[str, list[float | None]] = {"reask_cost_usd": [], "sample_cost_usd": []}
        for row_id in chunk:
            e = entries.get(row_id)
            x = orjson.loads(e.extra) if e is not None and e.extra else {}
            for kind in ("reask", "sample"):
                pico = x.get(f"{kind}_cost_pico")
                split[f"{kind}_cost_usd"].append(None if pico is None else to_usd(pico))
        tables.append(
            pa.Table.from_arrays(
                arrays + [pa.array(v, type=pa.float64()) for v in split.values()],
                names=RESULT_NAMES + list(split),
            )
        )
    if not tables:
        empty = Totals()
        return pa.Table.from_arrays(_result_columns([], {}, empty, {}), names=RESULT_NAMES)
    return pa.concat_tables(tables)


SUMMARY_NAME = "_batchllm_summary.json"  # in an output directory (--engine ray)


def read_schema(path: Path) -> pa.Schema:
    """An output's schema: a Parquet file's, or a directory of them (--engine ray)."""
    if path.is_dir():
        import pyarrow.dataset as pads

        return pads.dataset(path, format="parquet").schema
    return pq.read_schema(path)


def read_summary(path: Path) -> dict[str, Any] | None:
    """The run summary stored in an output file's metadata (or an output directory's summary
    file), if any."""
    if path.is_dir():
        try:
            return orjson.loads((path / SUMMARY_NAME).read_bytes())  # type: ignore[no-any-return]
        except (OSError, orjson.JSONDecodeError):
            return None
    try:
        meta = pq.read_metadata(path).metadata or {}
    except (pa.ArrowInvalid, OSError):
        return None
    raw = meta.get(METADATA_KEY)
    return orjson.loads(raw) if raw else None
