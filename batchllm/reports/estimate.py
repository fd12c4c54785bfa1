"""``batchllm estimate``: what a batch will cost before it runs, from exact token counts.

The input is streamed once; each batch's prompts are rendered exactly as ``run`` renders them,
counted with the model family's tokenizer (tokens.py: exact for Llama 3.x, so the estimated prompt
tokens equal what the API will bill) and admitted by the same rules (engine/plan.py). Completion tokens are unknown before a run: the worst case prices every row at
``max_tokens`` (a request file's line at its own, as run reserves it); ``--from-run`` prices them at the completion lengths a previous run observed (mean,
with a 95% interval for the total; expected.py, as for a pilot's rows). A labeling job's worst case is every request a row may take:
each of ``--samples`` asked and re-asked ``--reask`` times, every re-ask's prompt grown by the
model's answer (``max_tokens``) and the longest feedback, every reply ``max_tokens`` long; its
expected cost and time use the requests per row a pilot or a previous run observed. Per-row counts are kept as a compact int32 array (4 bytes a
row) for the percentiles, so memory stays flat in practice.
"""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.admission import Admission
from ..engine.checks import Prepared, prepare
from ..engine.journal import DB_NAME, TRANSIENT, Journal
from ..engine.journal_schema import length_change
from ..engine.packed import packs_for
from ..errors import JobError, SettingsMismatch
from ..job import Job
from ..labeling.parse import feedback_kinds
from ..labeling.spec import Labeling
from ..pricing import cost, usd_text
from ..prompts import PromptBatch
from ..records import Message
from ..tokens import TokenCounter, counter_for
from .expected import Observed, completions_of_run, expected_figures
from .pack_estimate import packed_figures
from .prompt_scale import pilot_pairs, prompt_scale, server_cached

MAX_LISTED = 20
PER_MESSAGE = 4  # a chat turn's header and end tokens (Llama 3 template, tokens.py)


def reask_growth(labeling: Labeling, counter: TokenCounter, max_tokens: int) -> int:
    """The most one re-ask adds to a request's prompt: the model's answer as an assistant turn
    (at most ``max_tokens``, with a margin for re-tokenizing it), and the feedback turn, which
    quotes the answer (escaped: at most twice its tokens)."""
    # Without the tokenizer, a feedback's bytes bound its tokens (with the "\n\n" before it).
    longest = max(
        counter.text_tokens(text) if counter.exact else len(text.encode("utf-8")) + 2
        for text in feedback_kinds(labeling)
    )
    return (max_tokens + 8) + (longest + 2 * max_tokens + 8) + 2 * PER_MESSAGE


def _worst_prompt(total: int, rows: int, labeling: Labeling | None, growth: int) -> int:
    """Worst-case prompt tokens of ``rows`` rows of ``total`` prompt tokens: each of a row's
    requests, re-ask k carrying k answers and feedbacks (``growth`` each)."""
    worst = total * row_requests(labeling)
    if labeling is not None and labeling.reask:
        r = labeling.reask
        worst += rows * labeling.samples * growth * r * (r + 1) // 2
    return worst


def row_requests(labeling: Labeling | None) -> int:
    """The most requests one row may take: every sample, each re-asked to the limit."""
    if labeling is None:
        return 1
    return labeling.samples * (labeling.reask + 1)


def estimate(job: Job, from_run: Path | None = None, observed: Observed | None = None) -> dict[str, Any]:
    """The estimate; ``observed`` completion lengths (a pilot's) or ``from_run`` give "expected"."""
    p = prepare(job)
    model, admission = p.model, Admission.of(p, count_all=True)
    counts = np.zeros(p.rows, dtype=np.int32)
    # Identical requests are sent once (engine/reuse.py): rows are told apart by their content
    # hash, 8 bytes a row, so memory stays flat.
    digests = np.zeros(p.rows, dtype=np.uint64)
    # A request file's lines each carry their own max_tokens (the job's where one has none), which
    # the window check, the worst case and run's reservations (admission.py) all use.
    replies: np.ndarray | None = None
    # Without the model's tokenizer the counts are a guess: the worst case bounds each prompt by
    # its bytes, as run reserves it (Admission.prompt_bound); "expected" keeps the guess.
    bounds = None if admission.counter.exact else np.zeros(p.rows, dtype=np.int32)
    over: list[str] = []
    pairs: list[tuple[int, int]] = []
    seen = (0, 0)  # rows sent before (a pilot's) that the server answered, their cached tokens
    over_count = empty = too_long = done = paid_done = 0
    position = 0
    journal = done_journal(job)  # rows a run of the output would not send again
    done_mask = np.zeros(p.rows, dtype=bool)
    for batch in p.source.batches(p.builder.read_columns):
        pb = p.builder.build(batch, position)
        own: list[int | None] = [None] * batch.num_rows
        skip = done_rows(journal, pb, job, p.builder.ids_embed_hash) if journal is not None else set()
        entries: dict[str, Any] = {}
        if skip and journal is not None:  # what these rows paid: the output may hold others too
            entries = journal.fetch([pb.row_ids[i] for i in skip])
            paid_done += sum((e.input_cost_pico or 0) + (e.output_cost_pico or 0) for e in entries.values())
        if pb.requests is not None:  # a request file: whole requests, counted as sent
            n = [admission.counter.count_messages(r.messages) for r in pb.requests]
            own = [r.max_tokens or job.max_tokens for r in pb.requests]
            if replies is None:
                replies = np.zeros(p.rows, dtype=np.int32)
            replies[position : position + batch.num_rows] = own
        else:
            countable = [admission.needs_count(u) for u in pb.users]
            n = admission.count(
                [u if c and u is not None else "" for u, c in zip(pb.users, countable, strict=True)]
            )
        if entries and bounds is not None:  # a guess: what the server counted for the rows sent
            pairs += pilot_pairs(entries, {pb.row_ids[i]: n[i] for i in skip})
        rows_seen, cached_seen = server_cached(entries)
        seen = (seen[0] + rows_seen, seen[1] + cached_seen)
        for i, user in enumerate(pb.users):
            if i in skip:  # done already: in the whole batch's figures, apart in the rest's
                done += 1
                done_mask[position + i] = True
            refused = admission.reject(user, n[i], position + i + 1, pb.requests is not None, own[i])
            tokens = n[i]
            if refused is not None:
                tokens = 0
                if refused.error_class == "ContextWindowExceeded":
                    over_count += 1
                    if len(over) < MAX_LISTED:
                        over.append(pb.row_ids[i])
                elif refused.error_class == "NoPrompt":
                    empty += 1
                else:
                    too_long += 1
            elif bounds is not None:
                bounds[position + i] = admission.prompt_bound(user or "", tokens)
            counts[position + i] = tokens
        # A row without a prompt hashes as "null"; it is never sent, so never counted (mask).
        digests[position : position + batch.num_rows] = [
            0 if h == "null" else int(h[:16], 16) for h in pb.hashes
        ]
        position += batch.num_rows
    paid = None
    if journal is not None:
        paid = journal.spent_pico()
        journal.conn.close()
    mask = counts > 0
    _, first = np.unique(digests[mask], return_index=True)
    sendable = counts[mask][np.sort(first)]
    left = ~done_mask[mask][np.sort(first)]  # of the requests, those a run sends now
    if replies is not None:
        replies = replies[mask][np.sort(first)]
    if bounds is not None:
        bounds = bounds[mask][np.sort(first)]
    duplicates = int(mask.sum()) - int(sendable.size)
    rows_sent = int(sendable.size)
    prompt_tokens = int(sendable.sum())
    prompt_cost, _ = cost(model.prices, prompt_tokens, 0)
    labeling, mt = job.labeling, job.max_tokens
    per_row = row_requests(labeling)
    growth = reask_growth(labeling, admission.counter, mt) if labeling is not None and labeling.reask else 0
    worst_prompt = _worst_prompt(prompt_tokens, rows_sent, labeling, growth)
    # The prompt tokens the worst case prices: the same, each prompt bounded by its bytes when
    # the counts are a guess (the time stays at the counts, which pace a run's --tpm).
    billed = worst_prompt
    if bounds is not None:
        billed = _worst_prompt(int(bounds.sum(dtype=np.int64)), rows_sent, labeling, growth)
    worst_requests = rows_sent * per_row
    worst_out = worst_requests * mt if replies is None else per_row * int(replies.sum())
    packed = None
    packs = packs_for(p, admission)
    if labeling is not None and packs is not None:  # several rows a request (pack_estimate.py)
        packed = packed_figures(packs, sendable, admission.overhead, labeling, growth)
        prompt_cost, _ = cost(model.prices, packed["prompt_tokens"], 0)
        worst_prompt, worst_out = packed["worst_prompt_tokens"], packed["worst_completion_tokens"]
        billed = worst_prompt
        if bounds is not None:  # each row's line bounded by its bytes
            billed = packed_figures(packs, bounds, admission.overhead, labeling, growth)[
                "worst_prompt_tokens"
            ]
        worst_requests = packed["worst_requests"]
    worst = worst_left = None
    if prompt_cost is not None:
        in_cost, out_cost = cost(model.prices, billed, worst_out)
        worst = (in_cost or 0) + (out_cost or 0)
        if done and packed is None:  # what is left: the same worst case over the rows not done
            rest = int((bounds if bounds is not None else sendable)[left].sum(dtype=np.int64))
            out_left = per_row * (int(left.sum()) * mt if replies is None else int(replies[left].sum()))
            in_left, out_cost_left = cost(
                model.prices, _worst_prompt(rest, int(left.sum()), labeling, growth), out_left
            )
            worst_left = (in_left or 0) + (out_cost_left or 0)
    # Unset, the model's listed limits (its tier's requests and tokens a minute), as --compare
    # says; --rpm 0 sets no request rate: the server's pace decides, not known beforehand.
    rpm = (model.rpm or int(p.provider.documented_rpm)) if job.rpm is None else job.rpm
    tpm = job.tpm if job.tpm is not None else model.tpm
    minutes = worst_requests / rpm if rpm else None
    if tpm:
        by_tokens = (worst_prompt + worst_out) / tpm
        minutes = by_tokens if minutes is None else max(minutes, by_tokens)
    result: dict[str, Any] = {
        "input": str(job.input),
        "provider": p.provider.name,
        "model": model.name,
        "token_counts": admission.counter.label,
        "rows": p.rows,
        "rows_to_send": rows_sent,
        # Done in the output's journal (same settings): a run sends the rest, at most this more.
        "rows_already_done": done,
        "already_paid_usd": usd_text(None if paid is None else paid_done),
        "output_paid_usd": usd_text(paid),  # with rows no longer in the input, and earlier answers
        "rows_left_to_send": int(left.sum()),
        "worst_case_left_usd": usd_text(worst_left),
        "rows_answered_by_identical_rows": duplicates,
        "rows_over_window": over_count,
        "rows_over_window_ids": over,
        "rows_without_prompt": empty,  # null, empty or only whitespace (prompts.py): never sent
        "rows_too_long": too_long,  # over the API's characters a message
        "prompt_tokens": {
            "total": prompt_tokens,
            "mean": round(float(sendable.mean()), 1) if rows_sent else 0,
            "p50": int(np.percentile(sendable, 50)) if rows_sent else 0,
            "p95": int(np.percentile(sendable, 95)) if rows_sent else 0,
            "max": int(sendable.max()) if rows_sent else 0,
        },
        # A request file's lines' max_tokens: their one value, or the job's and their range.
        "max_tokens": int(replies[0]) if replies is not None and _same(replies) else job.max_tokens,
        "requests": {
            "per_row_worst_case": per_row,
            "worst_case": worst_requests,
            "reasks": labeling.reask if labeling is not None else 0,  # re-asks exist only in labeling
        },
        "cost_usd": {"prompt": usd_text(prompt_cost), "worst_case": usd_text(worst)},
        # How the worst case counts prompts: "exact" tokens, or "bytes" (a token is at least one).
        "worst_case_prompts": "exact" if bounds is None else "bytes",
        "time": {"rpm": rpm, "tpm": tpm, "minutes": None if minutes is None else round(minutes, 1)},
        "tokens_worst_case": {"prompt": billed, "completion": worst_out},
    }
    if replies is not None and not _same(replies):
        low, high = int(replies.min()), int(replies.max())
        result["max_tokens_of_lines"] = {"min": low, "max": high, "mean": round(float(replies.mean()), 1)}
    if packed is not None:
        result["packing"] = packed
        result["requests"]["per_row_worst_case"] = round(worst_requests / max(rows_sent, 1), 2)
    requests = packed["requests"] if packed is not None else rows_sent
    cached = projected_cache(p, packs.prefix if packs is not None else p.maker().cache_prefix, requests)
    with_cache: int | None = None
    if cached is not None:
        first_prompt = packed["prompt_tokens"] if packed is not None else prompt_tokens
        with_cache, _ = cost(model.prices, first_prompt, 0, cached["cached_tokens"])
        cached["share"] = round(cached["cached_tokens"] / max(first_prompt, 1), 4)
        cached["prompt_cost_usd"] = usd_text(with_cache)
        cached["saved_usd"] = usd_text(None if with_cache is None else (prompt_cost or 0) - with_cache)
        result["prompt_cache"] = cached
        if seen[0] >= 2 and not seen[1]:  # the server cached nothing: expect no hit
            cached["server_cached_none_of"], with_cache = seen[0], None
    if from_run is not None:
        observed = completions_of_run(from_run)
        result["expected_from"] = f"the run in {from_run}"
    if observed is not None and model.prices is not None and prompt_cost is not None:
        # A guessed count is scaled by what the server counted for the rows it answered.
        expected_figures(
            observed, result, rows_sent=rows_sent, per_row=per_row,
            sent=packed["requests"] if packed is not None else rows_sent,  # a pack is one request
            first_cost=with_cache if with_cache is not None else prompt_cost,
            first_prompt=packed["prompt_tokens"] if packed is not None else prompt_tokens,
            scale=prompt_scale(pairs) if packed is None else None, out_pico=model.prices.output_pico,
            caps=mt * per_row if replies is None else replies.astype(np.int64) * per_row, rpm=rpm, tpm=tpm,
        )  # fmt: skip
    return result


def projected_cache(p: Prepared, prefix: tuple[Message, ...], requests: int) -> dict[str, Any] | None:
    """The prompt tokens the server's prompt cache is expected to serve: every request after the
    first of the job's shared prefix (engine/warmup.py holds the rest back until it is answered;
    ``--no-warmup``: all but the first ``--concurrency``), each its prefix in whole steps. None
    when the prefix is too short or the provider reports no cached tokens."""
    minimum = p.provider.prompt_cache_min
    if minimum is None or not prefix:
        return None
    step = p.provider.prompt_cache_step
    # The prefix as the server sees it: the messages before the row's own, without the closing header.
    tokens = counter_for(p.job.model).count_messages(prefix) - PER_MESSAGE
    if tokens < minimum:
        return None
    cacheable = tokens // step * step
    cold = 1 if p.job.warmup else p.job.concurrency
    return {"prefix_tokens": cacheable, "cached_tokens": cacheable * max(0, requests - cold)}


def pilot_positions(rows: int, n: int, seed: int = 0) -> frozenset[int]:
    """A fixed random sample of input positions, the same every time for the same input size."""
    return frozenset(random.Random(seed).sample(range(rows), min(n, rows)))


def done_journal(job: Job) -> Journal | None:
    """The output's journal, read-only, when it holds rows done with this job's settings (the
    sandbox and max_tokens aside, as a run resumes); else None. Its rows a run would not send
    again are left out of the estimate."""
    if not (job.journal_dir / DB_NAME).is_file():
        return None
    try:
        journal = Journal.open_readonly(job.journal_dir)
        stored = journal.get_meta("settings") or {}
        ours = job.request_settings()
        stored, ours = (
            {k: v for k, v in stored.items() if k != "sandbox"},
            {k: v for k, v in ours.items() if k != "sandbox"},
        )
        same = stored == ours or length_change(stored, ours) is not None  # a run would resume it
        if same and journal.status_counts():
            return journal
        journal.conn.close()
    except (JobError, sqlite3.Error):
        pass
    return None


def done_rows(journal: Journal, pb: PromptBatch, job: Job, ids_embed_hash: bool) -> set[int]:
    """The rows of a batch a run would not send again: done, as the run's plan decides (plan.py)."""
    again: set[int] = set()
    for i, status, _ in journal.unfinished(pb.row_ids, None if ids_embed_hash else pb.hashes):
        if (
            status is None
            or (status == "ok" and job.refresh_changed)
            or status == TRANSIENT  # sent again by any run
            or (status != "ok" and job.retry_errors)
        ):
            again.add(i)
    return set(range(len(pb.row_ids))) - again


def record_estimate(job: Job, result: dict[str, Any]) -> bool:
    """Keep the estimate in the output's journal, so the run and its report can compare; False
    (nothing kept) when the journal was written with other settings: an estimate of a variant
    must not stand in the way of the output's runs."""
    try:
        journal = Journal.open(job.journal_dir, job.request_settings(), adopt=False)
    except SettingsMismatch:
        return False
    try:
        journal.set_meta("estimate", result)
    finally:
        journal.close()
    return True


def _same(values: np.ndarray) -> bool:
    return values.size == 0 or bool((values == values[0]).all())
