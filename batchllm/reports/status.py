"""``batchllm status``: how far a run has got, read from its journal without disturbing it."""

from __future__ import annotations

import re
import time
from pathlib import Path

from ..engine.counts import JOURNAL_SQL, RowCounts, never_paid_twice, plural
from ..engine.journal import DB_NAME, Journal
from ..engine.journal_schema import SANDBOX_ANSWERS, TRANSIENT_SQL
from ..engine.left import AGAIN
from ..engine.lock import holder
from ..engine.output import read_summary
from ..engine.outside import SEEN, Outside
from ..engine.summary_text import PLAY_MONEY, prompt_cache_line
from ..errors import JobError
from ..pricing import format_usd, rows_saving
from .pilot import pilot_journals


def find_journal(path: Path) -> Path:
    """The journal folder for an output file, a journal folder, or the database itself."""
    candidates = [path, path.with_name(path.name + ".batchllm")]
    if path.name == DB_NAME:
        candidates.insert(0, path.parent)
    for c in candidates:
        if (c / DB_NAME).is_file():
            return c
    folder = path.with_name(path.name + ".batchllm")
    if not path.exists() and folder.is_dir():
        raise JobError(f"{path}: not run yet; {folder}/ is there but holds no batchllm journal")
    if not path.exists():
        raise JobError(f"{path}: no such file, and no batchllm journal at {path}.batchllm/")
    # An output written with --checkpoint elsewhere names its journal in its summary.
    kept = (read_summary(path) or {}).get("checkpoint")
    if kept and (Path(kept) / DB_NAME).is_file():
        return Path(kept)
    raise JobError(f"{path}: no batchllm journal here or at {path}.batchllm/")


def status_text(path: Path) -> str:
    """The output's journal's status, and where its pack-size pilots are; an output not run yet
    whose folder holds only such pilots (``estimate --pilot M --pack 1,5,10``): theirs."""
    folder = path if path.name.endswith(".batchllm") else path.with_name(path.name + ".batchllm")
    pilots = pilot_journals(folder)
    try:
        directory = find_journal(path)
    except JobError:
        if not pilots:
            raise
        sizes = ", ".join(str(size) for size, _ in pilots)
        lines = [
            f"{folder.with_name(folder.name.removesuffix('.batchllm'))}: not run yet; {folder}/ holds a pilot at pack sizes {sizes} (estimate --pack), "
            "each size's rows in a journal of its own, apart from the output's:"
        ]
        for size, d in pilots:
            lines += [f"pack {size}:", *("  " + line for line in journal_status(d).splitlines())]
        return "\n".join(lines)
    text = journal_status(directory)
    if pilots and directory == folder:
        sizes = ", ".join(str(size) for size, _ in pilots)
        text += (
            f"\npilots at pack sizes {sizes} (estimate --pack), apart from the output's rows: "
            f"batchllm status {folder / 'pilots' / 'pack-N'}"
        )
    return text


def journal_status(directory: Path) -> str:
    """One journal's status."""
    journal = Journal.open_readonly(directory)
    try:
        t = journal.totals()
        run = journal.get_meta("last_run") or {}
        seen = journal.get_meta(SEEN)  # rows done and no longer in the input (engine/outside.py)
        played = journal.get_meta(SANDBOX_ANSWERS)
        running = holder(directory)
        # While a run holds the journal, its log holds requests in flight now, not lost ones.
        lost = journal.maybe_billed(current=running is None)
        endpoints = journal.by_endpoint()
        found = RowCounts(*journal.conn.execute(JOURNAL_SQL).fetchone())
        # Rows refused before sending (no prompt, over the window or too long) fail alike again.
        resendable, transient = journal.conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(" + TRANSIENT_SQL + "), 0) FROM rows WHERE status = 'error' "
            "AND COALESCE(error_class, '') NOT IN ('NoPrompt', 'ContextWindowExceeded', 'PromptTooLong')"
        ).fetchone()
    finally:
        journal.conn.close()
    lines = [f"journal: {directory}"]
    total_rows = run.get("input_rows")
    gone = 0 if not seen or seen.get("stamp") is None else Outside.of(seen).rows
    done = t["rows"] - gone  # of the input's rows
    # Rows a stopped run was asked to send again keep their entries until then (engine/left.py).
    again = run.get(AGAIN, 0)
    not_done = max(0, total_rows - done) + again if total_rows else 0
    remaining = f", {not_done:,} not done of {total_rows:,}" if total_rows else ""
    if again:
        remaining += f" ({again:,} of the rows done, which the run that stopped was to send again)"
    if total_rows and gone:
        remaining = (
            f": {done:,} of the input's {total_rows:,} rows, {not_done:,} not done, "
            f"and {gone:,} no longer in the input"
        )
    elif total_rows and seen and seen.get("stamp") is None:  # counted against an earlier input
        remaining = f" of the input's {total_rows:,} (it changed since: the next run counts them)"
    if total_rows and directory.parent.name == "pilots":  # a pack size's pilot (pilot.py): all it does
        remaining = f": a pilot of the input's {total_rows:,} rows at one pack size"
    if total_rows and run.get("shared_ids"):  # --engine ray without --id-column
        remaining = (
            f" of {total_rows:,} input rows (on Ray identical prompts are one row, answered once: "
            "`batchllm report` counts the output's rows)"
        )
    invalid = t["rows"] - t["ok"] - t["error"]
    lines.append(
        f"rows: {t['rows']:,} done ({t['ok']:,} ok, {t['error']:,} error"
        + (f", {invalid:,} invalid" if invalid else "")
        + f"){remaining}"
        + (f"; {plural(found.truncated, 'reply')} cut at max_tokens" if found.truncated else "")
    )
    if found.from_cache or found.answered_by_identical_rows:
        lines.append(never_paid_twice(found.answered_by_identical_rows, found.from_cache))
    lines.append(
        f"tokens: {t['prompt_tokens']:,} prompt + {t['completion_tokens']:,} completion; "
        f"cost so far: {format_usd(None if t['unpriced'] else t['input_cost_pico'] + t['output_cost_pico'])}"
    )
    if played:
        lines.append(PLAY_MONEY)
    if t["cached_tokens"]:
        discount = run.get("cached_discount_pico")
        lines.append(
            prompt_cache_line(
                t["cached_tokens"],
                t["prompt_tokens"],
                rows_saving(t["cached_saved_pico"], t["cached_unkept"], discount),
            )
        )
    for name, rows, ok, error, pico, latency in endpoints:  # a fleet's run (engine/router.py)
        mean = f", mean latency {latency:,.0f} ms" if latency is not None else ""
        lines.append(
            f"  endpoint {name}: {rows:,} rows ({ok:,} ok, {error:,} error), {format_usd(pico)}{mean}"
        )
    if t["last_written"]:
        ago = time.time() - t["last_written"]
        lines.append(
            f"last written: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t['last_written']))} ({ago:,.0f} s ago)"
        )
    if lost["requests"]:
        lines.append(maybe_billed_line(lost["requests"], lost["worst_pico"]))
    who = holder(directory)
    lines.append(f"running now: {who}" if who else "running now: no")
    if who:  # its own end says what is next; the same command now would wait for the lock
        pass
    elif run.get("kind") == "pilot":  # its command, the estimate, sends no other row
        lines.append(
            "a pilot's rows (batchllm estimate --pilot): `batchllm run` with the same settings sends the rest"
        )
    elif run.get("command") and (not total_rows or done < total_rows or again):
        # A budget stop's advice (summary.py): a higher cap; else the same command resumes.
        lines.append(f"{run.get('next', 'resume with')}: {run.get('resume', run['command'])}")
    elif run.get("command") and (resendable or invalid):  # every row has an entry
        if transient == resendable and not invalid:  # the server's failures go again as they are
            lines.append(f"resume with: {run['command']}")
        else:
            lines.append(f"send the failed rows again with: {retrying(run['command'], run)}")
    return "\n".join(lines)


def retrying(command: str, run: dict[str, object]) -> str:
    """The command with --retry-errors, added only when it (or its job file) does not say it."""
    if run.get("retry_errors") or _RETRY_ERRORS.search(command):
        return command
    return f"{command} --retry-errors"


_RETRY_ERRORS = re.compile(r"(?:^|\s)--retry-errors(?:[=\s]|$)")


def maybe_billed_line(requests: int, worst_pico: int) -> str:
    return (
        f"up to {plural(requests, 'request')}, at most {format_usd(worst_pico)}, may have been billed without a "
        "saved reply (given up on after a timeout, or in flight when a run stopped; their rows were "
        "or will be sent again)"
    )
