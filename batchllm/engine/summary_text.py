"""The summary as a person reads it (``format_summary``): the lines a run prints when it ends,
from the summary JSON summary.py builds, and the lines ``status`` and ``report`` share with it."""

from __future__ import annotations

from typing import Any

from ..pricing import format_usd, parse_usd
from .counts import never_paid_twice, plural

# Said wherever an output's cost is, when batchllm's sandbox answered it (``play_money``).
PLAY_MONEY = "play money: batchllm's sandbox answered (emulated replies, not the model's); nothing was billed"


def _dollars(text: str | None) -> str:
    return "unknown (no price)" if text is None else f"${text}"


def format_summary(summary: dict[str, Any]) -> str:
    """The human summary printed at the end of a run."""
    lines = []
    rows = summary.get("rows")
    if rows:
        state = "complete" if summary["complete"] else "INCOMPLETE"
        lines.append(
            f"done ({state}): {rows['ok']:,} ok, {rows['error'] - rows.get('no_prompt', 0):,} failed"
            + (f", {rows['no_prompt']:,} without a prompt (not sent)" if rows.get("no_prompt") else "")
            + (f", {rows['invalid']:,} invalid" if rows.get("invalid") else "")
            + (f", {rows['pending']:,} pending" if rows["pending"] else "")
            + f" of {plural(rows['total'], 'row')}"
            + (f", {rows['to_send_again']:,} of them left to send again" if rows.get("to_send_again") else "")
            + (f"; {plural(rows['truncated'], 'reply')} cut at max_tokens" if rows["truncated"] else "")
        )
        tok, cost = summary["tokens"], summary["cost_usd"]
        lines.append(
            f"tokens: {tok['prompt']:,} prompt + {tok['completion']:,} completion = {tok['total']:,}"
        )
        if counted := tok.get("counted_rows"):
            how = (
                "exactly, with the model's tokenizer"
                if tok.get("counted_exactly")
                else (
                    "approximately (no tokenizer for the model: about 4 bytes a token), so their cost is an estimate"
                )
            )
            lines.append(
                f"the server reported no usage for {plural(counted, 'reply')}: batchllm counted "
                f"their tokens {how} (the tokens_counted column)"
            )
        if tok.get("cached"):
            saved = tok.get("cached_saved_usd")
            lines.append(
                prompt_cache_line(tok["cached"], tok["prompt"], None if saved is None else parse_usd(saved))
            )
        if cost["total"] is None:
            lines.append("cost: unknown (no price for the model: give --input-price and --output-price)")
        else:
            lines.append(
                f"cost: ${cost['total']} (input ${cost['input']}, output ${cost['output']}); "
                f"this run {_dollars(summary['this_run']['cost_usd'])}"
            )
            if summary.get("play_money"):
                lines.append(PLAY_MONEY)
            if gone := summary.get("outside_input"):
                lines.append(outside_line(gone))
            guess = (summary.get("estimate") or {}).get("cost_usd") or {}
            if summary["complete"] and guess.get("worst_case"):  # `batchllm estimate` was run on it
                expected = f"expected ${guess['expected']}, " if guess.get("expected") else ""
                lines.append(
                    f"estimated before: {expected}at most ${guess['worst_case']} (batchllm estimate)"
                )
    elif summary.get("stop_reason") == "interrupted":  # at once (a second interrupt): no output written
        lines.append(
            f"output not written (stopped at once); its journal keeps every reply: this run "
            f"{_dollars(summary['this_run']['cost_usd'])}, `batchllm status {summary['output']}` has the totals"
        )
        if summary.get("play_money"):
            lines.append(PLAY_MONEY)
    if lost := summary.get("maybe_billed"):
        lines.append(
            f"maybe billed besides: up to {plural(lost['requests'], 'request')} without a saved reply "
            f"(given up on after a timeout, or in flight at a stop), at most ${lost['worst_case_usd']}"
        )
    t = summary["this_run"]
    window = summary.get("concurrency")  # engine/concurrency.py: what the server's pace allowed
    lines.append(
        f"this run: {plural(t['requests'], 'request')}, {t['retries']:,} retries, {t['throttled']:,} throttled, "
        f"{summary['duration_s']:,.1f} s"
        + (f", at most {window['most_in_flight']:,} in flight" if window else "")
        + (
            f" (the server states {window['server_slots']:,} slots)"
            if window and window["server_slots"]
            else ""
        )
        + (
            " (all that --concurrency allows: it, not the rate, set the pace; a higher --concurrency goes faster)"
            if window and window.get("held_the_pace")
            else ""
        )
    )
    # The output's rows, counted as ``report`` and ``status`` count them (counts.py); what the
    # cache saved is this run's (``this_run.cache_hits`` counts its requests the cache answered).
    copies = rows.get("answered_by_identical_rows", 0) if rows else t.get("answered_by_other_rows", 0)
    cached = rows.get("from_cache", 0) if rows else t.get("cache_hits", 0)
    if copies or cached or t.get("cache_hits"):
        lines.append(
            never_paid_twice(copies, cached)
            + f" (this run's cache hits saved ${t.get('cache_saved_usd') or '0'})"
        )
    for name, e in (summary.get("endpoints") or {}).items():
        lines.append(
            f"endpoint {name}: {plural(e['requests'], 'request')}, {e['ok']:,} ok, {e['errors']:,} failed, "
            f"{e['throttled']:,} throttled, ${e['cost_usd']}"
            + (f", mean {e['mean_latency_ms']:,} ms" if e["mean_latency_ms"] is not None else "")
            + (f"; out of the run ({e['out']})" if e["out"] else "")
        )
    if summary.get("message"):  # a run that finished with failed rows did not stop
        lines.append(f"{'stopped' if summary.get('stop_reason') else 'finished'}: {summary['message']}")
    if rows:
        lines.append(f"output: {summary['output']}")
    if not summary["complete"] and "resume" in summary:
        lines.append(f"{summary.get('next') or 'to resume, run the same command again'}: {summary['resume']}")
    return "\n".join(lines)


def outside_line(gone: dict[str, Any]) -> str:
    """What the journal paid for beyond the output's rows (engine/outside.py), in one line."""
    rows = plural(gone["rows"], "row") if gone["rows"] else "rows"
    return (
        f"also paid: {_dollars(gone['cost_usd'])} for {rows} no longer in the input (in the journal, "
        f"not the output); {_dollars(gone['paid_in_all_usd'])} in all"
    )


def prompt_cache_line(cached: int, prompt: int, saved_pico: int | None) -> str:
    """Prompt tokens served from the server's prompt cache, their share, and what they saved."""
    share = f"prompt cache: {cached:,} of the prompt tokens cached ({cached / max(prompt, 1):.0%})"
    if saved_pico is None:
        return share
    if saved_pico == 0:  # no cached price known: they cost the input price (pricing.py)
        return share + ", no discount at these prices (--cached-input-price sets one)"
    return share + f", saving {format_usd(saved_pico)} against the input price"
