"""Bringing a batch home: ``import-batch`` (``export-batch`` is batch_export.py).

    import:  result file(s) + input + job -> the output's journal, exactly as if a run had received
             them -> the output Parquet

Both go through the same seams as a run: ``plan.prepare`` checks the job, ``Admission`` refuses
what a run would refuse, the rows' ``Request`` values are what a run would send, and imported
replies become journal ``Entry`` values costed by ``pricing.cost``. Hence a later ``batchllm run``
of the same job sends only what is still pending, and ``status`` and ``report`` count every row
once, whichever path answered it.

Importing is idempotent: a row the journal already holds as ok is never replaced, and an error
row only by a success, so importing the same file twice changes nothing. Expired, cancelled,
throttled (429) and server-error (5xx) results stay pending, for the live run to retry, and so
do the rows whose request changed since they were exported (batch_keys.py), what their replies
cost kept with them. Every reply paid for is in the output's cost, used or not.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ..engine.checks import Prepared, prepare
from ..engine.dispatch import Stats
from ..engine.journal import Journal
from ..engine.lock import RunLock
from ..engine.output import Totals, write_output
from ..engine.reopen import imported_answers_are_real, restart_notice
from ..engine.spend import CARRY_ATTEMPTS
from ..engine.summary import build_summary
from ..errors import APIError, ExitCode, JobError
from ..fleet import FleetEndpoint
from ..folders import made_note, make_folders
from ..job import Job
from ..labeling.confidence import of_reply
from ..labeling.rows import Attempt, RowLabeler
from ..labeling.spec import Labeling
from ..ledger import RunRecord, Snapshot, of_job
from ..pricing import Prices, cached_saving, cost
from ..providers import get_provider
from ..records import Entry, Request
from ..tokens import counter_for
from .batch_export import request_rows
from .batch_keys import add_refused, changed_line, drop_changed, line_id
from .batch_packs import add_splits, read_pack
from .openai_batch import iter_lines, result_body, result_logprobs, result_message

_PENDING_CODES = {"batch_expired", "batch_cancelled", "expired", "cancelled"}


class Unreadable(Exception):
    """A success line whose reply cannot be read: left pending, and counted."""


@dataclass
class Imported:
    ok: int = 0
    invalid: int = 0  # labeling rows whose imported answer did not validate
    unreadable: int = 0  # success lines with no readable reply: left pending, for the live run
    error: int = 0
    pending: int = 0  # expired, cancelled, 429/5xx: for the live run
    unchanged: int = 0  # already in the journal (an import done before)
    changed: int = 0  # rows whose request changed since export-batch: left pending (batch_keys.py)
    cut: list[str] = field(default_factory=list)  # files whose last line was cut off
    exit_code: ExitCode = ExitCode.OK
    summary: dict[str, Any] = field(default_factory=dict)


def import_batch(
    job: Job,
    results: list[Path],
    *,
    command: str,
    warn: Any,
    via: FleetEndpoint | None = None,
    live_command: str | None = None,
) -> Imported:
    """Record result lines in the output's journal as a run would, then write the output.
    ``via``: the fleet's endpoint that answered them: its batch prices (else its live ones), and
    its name in every row's ``endpoint``. ``live_command``: the run that sends what is left
    pending, for the summary's closing hint."""
    started = time.time()
    p = prepare(job)
    provider = get_provider(job.provider)
    model = via.model if via is not None else p.model
    given = job.prices if via is None else None  # --input-price/--output-price
    prices = given or model.batch_prices or model.prices
    if given is None and model.batch_prices is None:
        whose = f"fleet endpoint {via.name!r}" if via is not None else f"the {provider.name} model table"
        warn(
            f"no batch prices for {model.name!r} in {whose}: imported rows are priced at its live prices "
            f"(${prices.input_per_million} / ${prices.output_per_million} per million input / output "
            "tokens); --input-price/--output-price give the batch's own"
            if prices is not None
            else f"no prices for {model.name!r} in {whose} and none given (--input-price/--output-price): "
            "cost columns of imported rows will be null"
        )
    wanted = {row_id: (h, r) for _, row_id, h, r in request_rows(p, None)}
    entries, splits, outcome, lines = _read_results(results, wanted, p, prices, warn)
    asked = via.model.name if via is not None else None
    models = [p.model.name, *(e.model.name for e in job.fleet or ())]
    entries, splits, refused = drop_changed(entries, splits, wanted, job.input, asked, lines, models)
    if refused is not None:
        outcome.changed = len(refused.rows)
        warn(changed_line(refused))
    if via is not None:
        entries = {k: e._replace(endpoint=via.name) for k, e in entries.items()}
        splits = [(k, a._replace(endpoint=via.name)) for k, a in splits]
    made = make_folders(job.output, "--output")
    if made is not None:
        warn(made_note(made, job.output))
    lock = RunLock(job.journal_dir)
    lock.acquire(command)
    try:
        if discarded := restart_notice(job):
            warn(discarded)
        journal = Journal.open(job.journal_dir, job.request_settings(), restart=job.restart)
        imported_answers_are_real(journal, job.output, bool(entries or splits or lines))
        start = Snapshot.of(journal.totals())
        # The ledger names who answered: the fleet endpoint the file went to, else the job's.
        answered = (via.provider, via.endpoint, via.model.name) if via else (provider.name, "", p.model.name)
        record = RunRecord.begin(
            **of_job(job), kind="import", provider=answered[0], endpoint=answered[1], model=answered[2],
            engine="batch", rows_total=p.rows, start=start, lost=(0, 0), warn=warn, priced=prices is not None,
        )  # fmt: skip
        try:
            have = journal.fetch(list(entries))
            added: set[str] = set()
            for row_id, entry in entries.items():
                old = have.get(row_id)
                if old is not None and (old.status in ("ok", entry.status) or entry.status == "error"):
                    outcome.unchanged += 1
                    continue
                if old is None and journal.has_attempts:  # what it paid before stays its cost
                    journal.supersede(row_id, CARRY_ATTEMPTS)
                journal.add(entry)
                added.add(row_id)
                if entry.status == "ok":
                    outcome.ok += 1
                elif entry.status == "invalid":
                    outcome.invalid += 1
                else:
                    outcome.error += 1
            # Replies paid for and not used: this run's cost too. A line an earlier import
            # refused and this one kept was counted then: its cost is now its row's entry's.
            back = journal.take_back_refused([
                (r, lines[r], (e.prompt_tokens or 0, e.completion_tokens or 0, e.input_cost_pico or 0,
                               e.output_cost_pico or 0))
                for r, e in entries.items() if r in added and r in lines
            ])  # fmt: skip
            paid = [add_splits(journal, splits, have), add_refused(journal, refused), tuple(-x for x in back)]
            journal.set_meta(
                "last_run",
                {
                    "command": command,
                    "input": str(job.input),
                    "input_rows": p.rows,
                    "started_at": started,
                    # Importing the same files again sends nothing: status names the run that does.
                    **(
                        {"next": "to send the rows not done live", "resume": live_command}
                        if live_command
                        else {}
                    ),
                },
            )
            journal.flush()
            stats = Stats(ok=outcome.ok, error=outcome.error, invalid=outcome.invalid)
            stats.prompt_tokens, stats.completion_tokens, stats.cost_pico = (
                sum(x) for x in zip(*paid, strict=True)
            )
            for e in entries.values():
                if e.status in ("ok", "invalid") and e.row_id not in have:
                    stats.prompt_tokens += e.prompt_tokens or 0
                    stats.completion_tokens += e.completion_tokens or 0
                    stats.cost_pico += (e.input_cost_pico or 0) + (e.output_cost_pico or 0)
                    stats.cached_tokens += e.cached_tokens or 0  # the ledger's (spend) figures too
                    stats.cached_saved_pico += e.cached_saved_pico or 0

            def summary(t: Totals | None, code: ExitCode | None) -> dict[str, Any]:
                out = build_summary(p, t, stats, None, None, started, code, [], journal, command)
                out["imported_from"] = [str(r) for r in results]
                out["prices"] = prices.as_dict() if prices else None
                if t is not None and t.pending and live_command:
                    # Nothing more comes from these files: the pending rows go live (or come from
                    # more result files), never from importing the same ones again.
                    rows = f"{t.pending:,} row{'s are' if t.pending != 1 else ' is'}"
                    out["next"] = (
                        f"{rows} still pending (no result in these files, expired, "
                        f"{'429/5xx, or asked otherwise at export' if outcome.changed else 'or 429/5xx'}); "
                        "to send only those live"
                    )
                    out["resume"] = live_command
                else:
                    out.pop("resume", None)
                return out

            totals = write_output(
                job.output, p.source, p.builder, journal, lambda t: summary(t, None), job.labeling,
                fleet=via is not None,
            )  # fmt: skip
            outcome.exit_code = ExitCode.ROW_ERRORS if totals.failed else ExitCode.OK
            outcome.pending = totals.pending
            outcome.summary = summary(totals, outcome.exit_code)
        finally:
            record.finish(
                outcome.summary or {"message": "the import failed"}, start, Snapshot.of(journal.totals())
            )
            journal.close()
    finally:
        lock.release()
    return outcome


def _read_results(
    results: list[Path],
    wanted: dict[str, tuple[str, Request | None]],
    p: Prepared,
    prices: Prices | None,
    warn: Any,
) -> tuple[dict[str, Entry], list[tuple[str, Attempt]], Imported, dict[str, str]]:
    """Every result line, checked before anything is written: unknown custom_ids are bad input.
    Also each entry's line (``line_id``: batch_keys.py), by row, and each split's, by row and pack."""
    outcome = Imported()
    entries: dict[str, Entry] = {}
    lines: dict[str, str] = {}
    splits: list[tuple[str, Attempt]] = []
    order = list(wanted)  # input position -> row_id: a pack's custom_id names positions
    for path in results:
        try:
            numbered = list(iter_lines(path))
        except OSError as exc:
            raise JobError(f"{path}: cannot read the results file ({exc.strerror})") from None
        for k, (number, raw) in enumerate(numbered):
            try:
                record = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                if k == len(numbered) - 1 and not raw.endswith(b"\n"):
                    warn(f"{path}: line {number} is cut off (not imported): {exc.msg}")
                    outcome.cut.append(str(path))
                    continue
                raise JobError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None
            custom_id = record.get("custom_id") if isinstance(record, dict) else None
            if isinstance(custom_id, str) and custom_id not in wanted:
                try:
                    packed = read_pack(custom_id, record, wanted, order, p, prices, _entry, labeled_entry)
                except Unreadable as exc:
                    outcome.unreadable += 1
                    warn(f"{path}: line {number}: a success whose reply cannot be read ({exc}); left pending")
                    continue
                if packed is not None:
                    (split, unread), line = packed, line_id(record)
                    splits += unread
                    lines.update((f"{r} {a.pack_id}", line) for r, a in unread)
                    for e in split:
                        previous = entries.get(e.row_id)
                        if previous is None or previous.status != "ok":
                            entries[e.row_id] = e
                            lines[e.row_id] = line
                    continue
            if not isinstance(custom_id, str) or custom_id not in wanted:
                raise JobError(
                    f"{path}: line {number}: custom_id {custom_id!r} is not a row of {p.job.input} "
                    "(nothing was imported)"
                )
            content_hash, request = wanted[custom_id]
            try:
                entry = _entry(custom_id, content_hash, request, record, p, prices)
            except Unreadable as exc:
                outcome.unreadable += 1
                if outcome.unreadable == 1:
                    warn(f"{path}: line {number}: a success whose reply cannot be read ({exc}); left pending")
                continue
            if entry is None:  # pending: whatever another line or file said stands
                continue
            if p.job.labeling is not None and entry.status == "ok":
                tokens = result_logprobs(record)
                entry = labeled_entry(entry, p.job.labeling, None, tokens, p.job.structured_output)
            previous = entries.get(custom_id)
            if previous is None or previous.status != "ok":
                entries[custom_id] = entry
                lines[custom_id] = line_id(record)
    return entries, splits, outcome, lines


def _entry(
    row_id: str,
    content_hash: str,
    request: Request | None,
    record: dict[str, Any],
    p: Prepared,
    prices: Prices | None,
) -> Entry | None:
    """A result line as a journal entry; None when the row stays pending (expired, 429, 5xx)."""
    status, body = result_body(record)
    error = record.get("error")
    now = time.time()
    model = p.model.name
    if status == 200 and isinstance(body, dict):
        # A result line says what it is, whatever the job's provider: an OpenAI chat completion
        # (the Batch API's, vLLM's) has ``choices``; anything else is read by the job's provider.
        reader = get_provider("openai") if "choices" in body else p.provider
        try:
            completion = reader.parse(200, {}, orjson.dumps(body))
        except APIError as exc:
            raise Unreadable(exc.message) from None
        pt, ct = completion.prompt_tokens, completion.completion_tokens
        counted = pt is None or ct is None
        if counted:
            counter = counter_for(model)
            pt = pt if pt is not None else counter.count_messages(request.messages if request else ())
            ct = ct if ct is not None else counter.completion_tokens(completion.text)
        assert pt is not None and ct is not None
        cached = completion.cached_tokens  # billed at the batch's cached price, as live
        in_cost, out_cost = cost(prices, pt, ct, cached)
        max_tokens = (request.max_tokens if request else None) or p.job.max_tokens
        created = body.get("created")
        return Entry(
            row_id,
            content_hash,
            "ok",
            completion.text,
            pt,
            ct,
            in_cost,
            out_cost,
            None,
            None,
            1,
            None,
            float(created) if isinstance(created, (int, float)) and created > 0 else now,
            model,
            p.provider.truncated(completion, max_tokens),
            counted,
            cached_tokens=cached,
            served_model=completion.model,
            cached_saved_pico=None if in_cost is None else cached_saving(prices, cached),  # batch prices
        )
    if status is not None and 400 <= status < 500 and status not in (408, 409, 429):
        message = result_message(body, error) or f"HTTP {status}"
        return Entry(
            row_id, content_hash, "error", None, None, None, None, None,
            f"BatchError HTTP {status}: {message}", "BatchError", 1, None, now, model, None, None,
        )  # fmt: skip
    code = error.get("code") if isinstance(error, dict) else None
    if status is None and error is not None and code not in _PENDING_CODES:
        # A failure that is not HTTP's and not an expiry: the request itself was refused.
        message = result_message(None, error) or "error"
        return Entry(
            row_id, content_hash, "error", None, None, None, None, None,
            f"BatchError: {message}", "BatchError", 1, None, now, model, None, None,
        )  # fmt: skip
    return None  # expired, cancelled, 408/409/429/5xx: the live run sends it


def labeled_entry(
    entry: Entry,
    labeling: Labeling,
    pack: tuple[str, int] | None = None,
    tokens: list[Any] | None = None,
    held: bool = False,
) -> Entry:
    """An imported reply of a labeling job, read like a run reads it: label (or fields), status
    ``ok`` or ``invalid`` with its parse error (``run --retry-errors`` re-asks those), and its
    confidence from the line's logprobs (``tokens``). ``pack``: the row's item of a packed reply
    (its pack and position, batch_packs.py)."""
    pack_id, position = pack if pack is not None else (None, None)
    text = entry.response or ""
    sure = None
    if tokens is not None and labeling.confidence == "logprobs":
        sure = of_reply(labeling, text, bool(entry.truncated), tokens, held)
    attempt = Attempt(0, "first", text, entry.prompt_tokens or 0, entry.completion_tokens or 0,
                      entry.input_cost_pico, entry.output_cost_pico, bool(entry.truncated), pack_id,
                      position, None, entry.cached_tokens or 0, None, sure)  # fmt: skip
    outcome = RowLabeler(labeling, Request("", "", (), {})).outcome([attempt])
    extra = {
        "reask_cost_pico": 0 if entry.input_cost_pico is not None else None,
        "sample_cost_pico": 0 if entry.input_cost_pico is not None else None,
        "value": outcome.value,
        "parse_error": outcome.error,
        "reasks": 0,
        "agreement": outcome.agreement,
        "votes": outcome.votes,
    }
    if outcome.confidence is not None:
        extra["confidence"] = outcome.confidence
    if pack is not None:
        extra["pack_id"], extra["pack_position"] = pack
    return entry._replace(
        status=outcome.status,
        error=None if outcome.error is None else f"invalid: {outcome.error}",
        error_class=None if outcome.error is None else "Invalid",
        extra=orjson.dumps(extra).decode(),
    )
