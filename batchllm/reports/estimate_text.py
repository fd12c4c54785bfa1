"""``batchllm estimate``'s figures as a person or a program reads them: text and Markdown tables,
JSON (the figures themselves are estimate.py's)."""

from __future__ import annotations

from typing import Any


def _usd(text: str | None) -> str:
    return "unknown (no price: give --input-price and --output-price)" if text is None else f"${text}"


def _replies(e: dict[str, Any]) -> str:
    lines = e.get("max_tokens_of_lines")
    if lines is None:
        return f"every reply {e['max_tokens']:,} tokens"
    return f"every reply at its line's max_tokens, {lines['min']:,} to {lines['max']:,}"


def format_estimate(e: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        import orjson

        return orjson.dumps(e, option=orjson.OPT_INDENT_2).decode()
    pt, money = e["prompt_tokens"], e["cost_usd"]
    rows = [
        ("rows", f"{e['rows']:,}"),
        (
            "rows to send" + (", all of the input" if e.get("rows_already_done") else ""),
            f"{e['rows_to_send']:,}",
        ),
        *(
            [
                (
                    "already done in the output",
                    f"{e['rows_already_done']:,} rows, ${e['already_paid_usd']} paid"
                    + (
                        f" (the output's journal: ${e['output_paid_usd']} in all)"
                        if e.get("output_paid_usd") not in (None, e["already_paid_usd"])
                        else ""
                    )
                    + "; "
                    f"{e['rows_left_to_send']:,} left to send"
                    + (f", at most ${e['worst_case_left_usd']}" if e.get("worst_case_left_usd") else ""),
                )
            ]
            if e.get("rows_already_done")
            else []
        ),
        ("rows answered by an identical row", f"{e.get('rows_answered_by_identical_rows', 0):,}"),
        (
            "rows over the context window",
            f"{e['rows_over_window']:,}"
            + (f" ({', '.join(e['rows_over_window_ids'])})" if e["rows_over_window_ids"] else ""),
        ),
        ("rows without a prompt (not sent)", f"{e['rows_without_prompt']:,}"),
        *(
            [("rows too long for the API (not sent)", f"{e['rows_too_long']:,}")]
            if e.get("rows_too_long")
            else []
        ),
        (
            "prompt tokens" + (", one row a request" if "packing" in e else ""),
            f"{pt['total']:,} (mean {pt['mean']:,}, p50 {pt['p50']:,}, p95 {pt['p95']:,}, max {pt['max']:,})",
        ),
        # Packed, the prompts cost what the packs send (their tokens under "packed" below).
        ("prompt cost" + (", packed" if "packing" in e else ""), _usd(money["prompt"])),
        (
            "worst case ("
            + ("every pack unreadable at every size, then every row alone, " if "packing" in e else "")
            + ("every request re-asked, " if (e.get("requests") or {}).get("reasks") else "")
            + _replies(e)
            + (
                ", prompts bounded by bytes: counts are approximate"
                if e.get("worst_case_prompts") == "bytes"
                else ""
            )
            + ")",
            _usd(money["worst_case"]),
        ),
    ]
    if "expected" in money:
        rows.append(
            (
                f"expected (from {money['observed_rows']:,} observed replies, mean {money['observed_mean_completion_tokens']:,})",
                f"${money['expected']} (95%: ${money['expected_low']} to ${money['expected_high']})",
            )
        )
    if scale := e.get("prompt_scale"):
        rows.append(
            (
                f"prompt tokens as the server counted {scale['rows']:,} sent rows",
                f"{scale['ratio']:.3f} x the approximate count (row to row +-{scale['sd']:.3f}): "
                "expected uses it",
            )
        )
    req = e.get("requests") or {}
    if req.get("per_row_worst_case", 1) > 1:
        rows.append(
            (
                "requests (samples x (1 + re-asks)"
                + (", each pack at every size, then each row alone)" if "packing" in e else ")"),
                f"at most {req['worst_case']:,} ({req['per_row_worst_case']} a row)"
                + (f", expected {req['expected_per_row']:g} a row" if "expected_per_row" in req else ""),
            )
        )
    t = e["time"]
    if t["minutes"] is None:  # --rpm 0 and no --tpm
        rows.append(("time", "no rate set (--rpm 0): as fast as the server answers"))
    else:
        rates = ([f"{t['rpm']:,} requests/min"] if t["rpm"] else []) + (
            [f"{t['tpm']:,} tokens/min"] if t["tpm"] else []
        )
        rows.append(
            (
                "time at " + ", ".join(rates),
                (f"expected {t['expected_minutes']:,} min, " if "expected_minutes" in t else "")
                + f"at most {t['minutes']:,} min",
            )
        )
    if "packing" in e:
        pk = e["packing"]
        rows.append(
            (
                f"packed, {pk['pack']} rows a request",
                f"{pk['requests']:,} requests, {pk['prompt_tokens']:,} prompt tokens "
                f"({pk['prompt_tokens_one_row_a_request']:,} one row a request)"
                + (
                    f"; {pk['rows_too_long_for_a_pack']:,} rows too long for a pack (not sent)"
                    if pk.get("rows_too_long_for_a_pack")
                    else ""
                ),
            )
        )
    if "prompt_cache" in e:
        c = e["prompt_cache"]
        rows.append(
            (
                f"prompt cache (a shared prefix of {c['prefix_tokens']:,} tokens)",
                f"{c['cached_tokens']:,} prompt tokens cached ({c['share']:.0%}): prompt cost "
                f"{_usd(c['prompt_cost_usd'])}, {_usd(c['saved_usd'])} less"
                + (
                    f"; but the server cached none of the {c['server_cached_none_of']:,} rows sent: "
                    "expected assumes no hit"
                    if c.get("server_cached_none_of")
                    else ""
                ),
            )
        )
    rows.append(("token counts", e["token_counts"]))
    if e.get("play_money"):
        what = "lengths and accuracy" if "pilot_accuracy" in e else "lengths"
        rows.append(
            (
                "play money",
                f"the pilot ran on batchllm's sandbox: its {what} are the emulator's, not the model's",
            )
        )
    if "pilot_accuracy" in e:
        a = e["pilot_accuracy"]
        rows.append(
            (
                f"pilot accuracy ({a['rows']:,} rows with gold)",
                f"{a['accuracy']:.1%} (95%: {a['low']:.1%} to {a['high']:.1%})",
            )
        )
    if "votes" in e:
        v = e["votes"]
        rows.append(
            (
                f"rows that will vote (first answer below {v['below']:g})",
                f"{v['share']:.0%} ({v['pilot_voted']:,} of the pilot's {v['pilot_rows']:,}): about "
                f"{v['projected_rows']:,} rows, {v['projected_extra_requests']:,} more requests",
            )
        )
    if fmt == "markdown":
        return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    width = max(len(k) for k, _ in rows)
    return f"estimate for {e['input']} on {e['model']}\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
