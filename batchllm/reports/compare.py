"""``estimate --compare``: what the same job would cost on every model batchllm knows.

Each model in ``batchllm models`` gets the job's own estimate (estimate.py: its prompts rendered
and counted with that model's tokenizer, exact for Llama 3.x, a labelled approximation otherwise,
and admitted by its window), at its live prices and, where the provider has a batch API, at its
batch prices, with the time at its documented rate limit (models.toml). A model that cannot take
the job (a parameter its provider does not have, ``max_tokens`` past its window, rows over its
window) is listed with why. The expected cost uses completion lengths observed on this job (a
pilot, ``--from-run``, or the output's journal): another model answers at another length, so it
is a guide and says so.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..engine.journal import Journal
from ..errors import JobError
from ..job import Job
from ..pricing import Model, Prices, cost, load_models, usd_text
from ..providers import get_provider
from .estimate import estimate
from .expected import Observed
from .tables import grid


def _variant(job: Job, model: Model) -> Job | str:
    """The job on ``model``, or why it cannot run there."""
    provider = get_provider(model.provider)
    for key, value in job.sampling.items():
        parse = provider.params.get(key)
        if parse is None:
            return f"the {provider.name} API has no {key}"
        try:
            parse(value)
        except ValueError as exc:
            return f"{key} {exc}"
    if job.extra_body and not provider.unlisted_models:
        return f"the {provider.name} API takes no extra_body"
    if model.context_window is not None and job.max_tokens >= model.context_window:
        return f"max_tokens {job.max_tokens:,} leaves no room in its {model.context_window:,}-token window"
    return dataclasses.replace(
        job,
        provider=provider.name,
        model=model.name,
        model_given=True,
        prices=None,
        endpoint=provider.default_endpoint,
        max_cost_pico=None,
        max_cost_per_run_pico=None,
        max_cost_per_month_pico=None,
    )


def observed_of(job: Job) -> Observed | None:
    """Completion lengths this job's earlier runs observed, from its output's journal."""
    try:
        journal = Journal.open_readonly(job.journal_dir)
    except JobError:
        return None
    try:
        found = Observed(*journal.observed())
    finally:
        journal.conn.close()
    return found if found.completions else None


def _at(prices: Prices | None, e: dict[str, Any]) -> tuple[str | None, str | None]:
    """Worst and expected cost of estimate ``e`` at other prices (a batch API's)."""
    if prices is None:
        return None, None
    worst_in, worst_out = cost(prices, e["tokens_worst_case"]["prompt"], e["tokens_worst_case"]["completion"])
    expected = None
    if "tokens_expected" in e:
        exp_in, exp_out = cost(prices, e["tokens_expected"]["prompt"], e["tokens_expected"]["completion"])
        expected = usd_text((exp_in or 0) + (exp_out or 0))
    return usd_text((worst_in or 0) + (worst_out or 0)), expected


def compare(job: Job, from_run: Path | None, observed: Observed | None) -> dict[str, Any]:
    observed = observed if observed is not None or from_run is not None else observed_of(job)
    lines = []
    for model in load_models().values():
        line: dict[str, Any] = {
            "provider": model.provider,
            "model": model.name,
            "context_window": model.context_window,
            "current": model.provider == job.provider and model.name == job.model,
        }
        variant = _variant(job, model)
        if isinstance(variant, str):
            lines.append({**line, "fits": False, "why": variant})
            continue
        rpm = model.rpm or int(get_provider(model.provider).documented_rpm)
        e = estimate(dataclasses.replace(variant, rpm=rpm, tpm=model.tpm), from_run, observed)
        if e["rows_over_window"]:
            why = f"{e['rows_over_window']:,} rows over its {model.context_window:,}-token window"
            lines.append({**line, "fits": False, "why": why})
            continue
        money, t = e["cost_usd"], e["time"]
        batch_worst, batch_expected = _at(model.batch_prices, e)
        lines.append(
            {
                **line,
                "fits": True,
                "token_counts": e["token_counts"],
                "prompt_tokens": e["prompt_tokens"]["total"],
                "worst_case_usd": money["worst_case"],
                "expected_usd": money.get("expected"),
                "batch_worst_case_usd": batch_worst,
                "batch_expected_usd": batch_expected,
                "rpm": rpm,
                "tpm": model.tpm,
                "minutes_worst_case": t["minutes"],
                "minutes_expected": t.get("expected_minutes"),
            }
        )
    return {
        "input": str(job.input),
        "expected_from": "completion lengths observed on this job"
        if observed is not None or from_run is not None
        else None,
        "models": lines,
    }


def format_compare(report: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        import orjson

        return orjson.dumps(report, option=orjson.OPT_INDENT_2).decode()
    md = fmt == "markdown"
    header = [
        "model",
        "prompt tokens",
        "worst case",
        "expected",
        "batch worst",
        "batch expected",
        "time (rate limit)",
    ]
    rows = []
    for x in report["models"]:
        name = f"{x['provider']}:{x['model']}" + (" (this job's)" if x["current"] else "")
        if not x["fits"]:
            rows.append([name, f"does not fit: {x['why']}", "", "", "", "", ""])
            continue
        exact = "" if x["token_counts"].startswith("exact") else " (approx.)"
        minutes = (
            (f"{x['minutes_expected']:,} min expected, " if x["minutes_expected"] is not None else "")
            + f"at most {x['minutes_worst_case']:,} min at {x['rpm']:,}/min"
            + (f", {x['tpm']:,} tokens/min" if x["tpm"] else "")
        )
        rows.append(
            [
                name,
                f"{x['prompt_tokens']:,}{exact}",
                _usd(x["worst_case_usd"]),
                _usd(x["expected_usd"]),
                _usd(x["batch_worst_case_usd"]),
                _usd(x["batch_expected_usd"]),
                minutes,
            ]
        )
    note = (
        "expected: at the completion lengths observed on this job (other models answer at other lengths)"
        if report["expected_from"]
        else "expected: n/a until the job has run (--pilot N, or --from-run)"
    )
    title = [f"the job on every model batchllm knows ({report['input']})", ""]
    return "\n".join(
        [*title, *grid(header, rows, md), "", note, "batch: within the batch API's 24-hour window"]
    )


def _usd(text: str | None) -> str:
    return "n/a" if text is None else f"${text}"
