"""``estimate --fleet F [--deadline D]``: which endpoint of a fleet takes how many rows, at what
cost, and when the job ends.

Each endpoint gets the job's own estimate (estimate.py, at its model's tokenizer and its prices):
rows to send, and a cost per row (expected when the job has observations, else the worst case).
Its pace is its limit in rows per second: ``rpm`` (and ``tpm`` over the tokens a row reserves,
and ``concurrency`` over ``latency`` when the file gives a latency), over the requests a row may
take.

The plan is the cheapest schedule that meets the deadline: endpoints in order of cost per row,
each given as many rows as it can do by the deadline at its full pace, until none is left. With
linear costs and one capacity per endpoint this greedy fill is optimal (an exchange argument: a
row moved from a cheaper endpoint with time left to a pricier one can only cost more). Without a
deadline every endpoint runs at its full pace (the fleet at the sum of its limits) and the
cheapest take what they can first. If even every endpoint at full pace misses the deadline, the
plan says so and runs at full speed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..errors import JobError
from ..fleet import FleetEndpoint
from ..job import Job
from ..pricing import parse_usd, usd_text
from .estimate import estimate
from .expected import Observed
from .svg import money
from .tables import grid


def _on(job: Job, e: FleetEndpoint) -> Job:
    return dataclasses.replace(
        job, provider=e.provider, model=e.model.name, model_given=True, prices=e.model.prices,
        endpoint=e.endpoint, rpm=e.rpm, tpm=e.tpm, max_cost_pico=None, max_cost_per_run_pico=None,
        max_cost_per_month_pico=None,
    )  # fmt: skip


def plan(
    job: Job, fleet: list[FleetEndpoint], deadline_s: float | None, observed: Observed | None
) -> dict[str, Any]:
    lines: list[dict[str, Any]] = []
    rows = 0
    for e in fleet:
        est = estimate(_on(job, e), None, observed)
        rows = est["rows_to_send"]
        money = est["cost_usd"]
        total = money.get("expected") or money["worst_case"]
        per_request = requests_a_row(est)
        reply = (est.get("max_tokens_of_lines") or {}).get("mean", est["max_tokens"])
        tokens = (est["prompt_tokens"]["mean"] or 0) + reply
        rate = e.requests_per_s
        if e.tpm:
            rate = min(rate, e.tpm / 60.0 / max(tokens, 1))
        lines.append(
            {
                "endpoint": e.name,
                "provider": e.provider,
                "model": e.model.name,
                "rows_per_s": rate / per_request,
                "_total_pico": _pico(total),
                "cost_basis": "expected" if "expected" in money else "worst case",
            }
        )
    order = sorted(lines, key=lambda x: x["_total_pico"])
    full_speed = sum(x["rows_per_s"] for x in order)
    fastest_s = rows / full_speed if full_speed else math.inf
    feasible = deadline_s is None or fastest_s <= deadline_s
    horizon = deadline_s if deadline_s is not None and feasible else fastest_s
    left = rows
    for x in order:  # cheapest first, each at its full pace until the horizon or the rows run out
        take = min(left, math.floor(x["rows_per_s"] * horizon + 1e-9)) if math.isfinite(horizon) else left
        x["rows"] = take
        left -= take
    order[0]["rows"] += left  # rounding: the few rows left go to the cheapest
    total_pico = 0
    finish = 0.0
    for x in order:
        x["_cost_pico"] = x["_total_pico"] * x["rows"] // rows if rows else 0
        total_pico += x["_cost_pico"]
        x["cost_usd"] = usd_text(x["_cost_pico"])
        x["minutes"] = round(x["rows"] / x["rows_per_s"] / 60, 1) if x["rows"] else 0.0
        finish = max(finish, x["minutes"])
        x["rows_per_s"] = round(x["rows_per_s"], 3)
    cheapest = order[0]
    return {
        "input": str(job.input),
        "rows": rows,
        "deadline_minutes": round(deadline_s / 60, 1) if deadline_s is not None else None,
        "feasible": feasible,
        "fastest_minutes": round(fastest_s / 60, 1),
        "finish_minutes": finish,
        "cost_usd": usd_text(total_pico),
        "cheapest_alone": {
            "endpoint": cheapest["endpoint"],
            "cost_usd": usd_text(cheapest["_total_pico"]),
            "minutes": round(rows / cheapest["rows_per_s"] / 60, 1) if cheapest["rows_per_s"] else None,
        },
        "endpoints": [{k: v for k, v in x.items() if not k.startswith("_")} for x in order],
    }


def requests_a_row(est: dict[str, Any]) -> float:
    """The requests a row takes, as the estimate projects them: what the job's observations show;
    else a pack's share of one request (``--pack``: a deadline is met in requests, not rows, and
    the router replans from the rows left every few seconds, re-asks included); else the worst
    case of one row a request."""
    requests = est["requests"]
    if requests.get("expected_per_row"):
        return float(requests["expected_per_row"])
    packing, rows = est.get("packing"), est["rows_to_send"]
    if packing and rows:
        return max(float(packing["requests"]) / rows, 1e-9)
    return max(float(requests["per_row_worst_case"]), 1.0)


def _pico(text: str | None) -> int:
    if text is None:
        raise JobError("a fleet plan needs prices: give the endpoint input_price and output_price")
    return parse_usd(text)


def format_plan(p: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        import orjson

        return orjson.dumps(p, option=orjson.OPT_INDENT_2).decode()
    md = fmt == "markdown"
    # Without observations (a pilot's, --from-run's) each figure is the worst case: every reply at
    # max_tokens, every re-ask taken (a row's most requests slow its pace too). Said as such.
    worst = any(x["cost_basis"] == "worst case" for x in p["endpoints"])
    header = ["endpoint", "model", "rows", "cost (worst case)" if worst else "cost (expected)",
              "rows/s at its limit", "busy for"]  # fmt: skip
    body = [
        [x["endpoint"], f"{x['provider']}:{x['model']}", f"{x['rows']:,}", money(x["cost_usd"]),
         f"{x['rows_per_s']:,}", f"{x['minutes']:,} min"]
        for x in p["endpoints"]
    ]  # fmt: skip
    head = f"the job over {len(p['endpoints'])} endpoints ({p['input']}, {p['rows']:,} rows to send)"
    if p["deadline_minutes"] is None:
        verdict = (
            f"every endpoint at its limit: done in {p['finish_minutes']:,} min for {money(p['cost_usd'])}"
        )
    elif p["feasible"]:
        verdict = (
            f"the cheapest mix that ends within {p['deadline_minutes']:,} min: done in "
            f"{p['finish_minutes']:,} min for {money(p['cost_usd'])}"
        )
    else:
        verdict = (
            f"no mix ends within {p['deadline_minutes']:,} min (every endpoint at its limit takes "
            f"{p['fastest_minutes']:,} min): the run goes at full speed, {money(p['cost_usd'])}"
        )
    alone = p["cheapest_alone"]
    tail = f"the cheapest endpoint alone ({alone['endpoint']}): {money(alone['cost_usd'])} in {alone['minutes']:,} min"
    basis = (
        "costs and times are worst cases (every reply at max_tokens, every re-ask); --pilot N -o OUT or "
        "--from-run gives the expected ones"
        if worst
        else "costs and times are expected, from the rows observed"
    )
    return "\n".join([head, "", *grid(header, body, md), "", verdict, tail, basis])
