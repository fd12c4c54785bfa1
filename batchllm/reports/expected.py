"""An estimate's "expected" figures: what finished rows of the job (a pilot's, or a previous
run's, ``--from-run``) say the rest will cost and take.

Completion lengths are drawn from the observed ones (mean, with a 95% interval for the batch
total), each capped at what a row may take. The prompts' part is the first request's exact cost
(at the cache's projected price when the server caches the shared prefix) times the requests a
row took as observed (a labeling row's re-asks and samples), spread as much as they were; a
guessed count (no tokenizer) is scaled by what the server counted for the rows it answered
(prompt_scale.py), its spread widening the interval. Figures are said to the millionth of a dollar.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow.parquet as pq

from ..errors import JobError
from ..pricing import usd_text
from .prompt_scale import PromptScale


class Observed(NamedTuple):
    """What finished rows of this job (a pilot's, or a previous run's) say: per row, completion
    tokens (all its requests) and requests made."""

    completions: Sequence[float]
    requests: Sequence[float]


def completions_of_run(path: Path) -> Observed:
    try:
        table = pq.read_table(path, columns=["status", "completion_tokens", "attempts"])
    except (OSError, ValueError) as exc:
        raise JobError(f"--from-run {path}: cannot read it ({exc})") from None
    ok = table.filter(table.column("status").to_numpy(zero_copy_only=False) != "pending")
    ok = ok.filter(ok.column("completion_tokens").is_valid())
    values = [int(v) for v in ok.column("completion_tokens").to_pylist()]
    if not values:
        raise JobError(f"--from-run {path}: no answered rows to learn completion lengths from")
    # A row answered needed a request, even one the cache or an identical row answered here.
    return Observed(values, [max(1, int(v or 0)) for v in ok.column("attempts").to_pylist()])


def expected_figures(
    observed: Observed,
    result: dict[str, Any],
    *,
    rows_sent: int,
    sent: int,
    per_row: int,
    first_cost: int,
    first_prompt: int,
    scale: PromptScale | None,
    out_pico: int,
    caps: int | np.ndarray,
    rpm: int,
    tpm: int | None,
) -> None:
    """Add the expected cost, tokens and time to an estimate's ``result``: ``first_cost`` and
    ``first_prompt`` are the rows' first requests' prompt cost and tokens, ``sent`` the requests
    of one pass (a pack is one), ``per_row`` the most requests a row may take."""
    asked = np.asarray(observed.requests or [1.0], dtype=np.float64)
    mean_requests = min(float(asked.mean()), per_row)
    result["requests"]["expected_per_row"] = round(mean_requests, 3)
    ratio, ratio_sd = (scale.ratio, scale.sd) if scale is not None else (1.0, 0.0)
    if scale is not None:
        result["prompt_scale"] = scale.as_dict()
    cost = first_cost * ratio
    spread = float(asked.std(ddof=1)) if asked.size > 1 else 0.0
    row_sd = math.hypot(spread, ratio_sd / ratio * max(mean_requests, 1.0)) if ratio else spread
    result["cost_usd"].update(
        _expected(
            np.asarray(observed.completions, dtype=np.float64),
            rows_sent,
            (round(cost * max(mean_requests, 1.0)), round(cost * row_sd / max(rows_sent, 1))),
            out_pico,
            caps,
        )
    )
    result["tokens_expected"] = {
        "prompt": round(first_prompt * ratio * max(mean_requests, 1.0)),
        "completion": result["cost_usd"].pop("expected_completion_tokens"),
    }
    minutes = [sent * max(mean_requests, 1.0) / rpm] if rpm else []
    if tpm:
        minutes.append(sum(result["tokens_expected"].values()) / tpm)
    if minutes:
        result["time"]["expected_minutes"] = round(max(minutes), 1)


def _expected(
    observed: np.ndarray, rows: int, prompt: tuple[int, int], out_pico: int, caps: int | np.ndarray
) -> dict[str, Any]:
    """Expected cost: ``prompt`` is the batch's expected prompt cost and the standard deviation
    of a row's (from its requests'); ``caps``: a row's most completion tokens, one for all or
    each row's own (a request file's lines), which no row's expected length exceeds."""
    if observed.size == 0:
        raise JobError("no completed rows to learn completion lengths from")
    prompt_cost, prompt_sd = prompt
    if isinstance(caps, int):
        top, ceiling = caps, rows * caps
    else:
        top, ceiling = (int(caps.max()) if caps.size else 0), int(caps.sum())
    observed = np.minimum(observed, top)
    mean, sd = float(observed.mean()), float(observed.std(ddof=1)) if observed.size > 1 else 0.0
    # 95% interval for the batch total: the sum of `rows` draws from the observed distribution.
    half = 1.96 * sd * math.sqrt(rows) + 1.96 * sd / math.sqrt(observed.size) * rows
    total = rows * mean if isinstance(caps, int) else float(np.minimum(caps, mean).sum())
    low, high = math.floor(max(0.0, total - half)), math.ceil(min(ceiling, total + half))
    # The same interval for the prompt's part, when rows took more requests than others.
    spread = round(1.96 * prompt_sd * (math.sqrt(rows) + rows / math.sqrt(observed.size)))
    micro = 10**6  # an estimate is said to the millionth of a dollar: low down, high up
    return {
        "expected": usd_text(round((prompt_cost + round(total) * out_pico) / micro) * micro),
        "expected_low": usd_text((max(0, prompt_cost - spread) + low * out_pico) // micro * micro),
        "expected_high": usd_text(-(-(prompt_cost + spread + high * out_pico) // micro) * micro),
        "observed_rows": int(observed.size),
        "observed_mean_completion_tokens": round(mean, 1),
        "expected_completion_tokens": round(total),
    }
