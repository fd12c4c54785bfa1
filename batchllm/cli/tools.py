"""`report`, `eval`, `status`, `models`, `validate` and `cache`: each parses flags and calls the library."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import BatchLLMError, ExitCode, JobError
from ..job import build_job
from ..jobfile import job_file_problems, load_job_file
from . import CONTEXT, cli, handles_errors


@cli.command(
    "report",
    context_settings=CONTEXT,
    epilog="""Examples:

  batchllm report out/reviews_sentiment.parquet --by category

  batchllm report out/reviews_sentiment.parquet --by product --html out/cost_review.html""",
)
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--by", help="Break everything down by this input column.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "markdown", "json", "csv"]),
    default="text",
    show_default=True,
)
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write a self-contained HTML page with plots.",
)
@click.option(
    "--gold",
    help="With --html: a gold label column (or 'review') to draw the confidence's reliability diagram against.",
)
@handles_errors
def report_cmd(output: Path, by: str | None, fmt: str, html_path: Path | None, gold: str | None) -> int:
    """What a run cost: rows, tokens, cost per row, latency, errors; by any column."""
    from ..folders import folders_to_make
    from ..reports.report import build_report, output_of
    from ..reports.report_text import format_report

    output = output_of(output)  # a journal folder, as `status` takes it: its output
    if html_path is not None:
        folders_to_make(html_path, "--html")  # refused before the report, not after it
    report = build_report(output, by)
    click.echo(format_report(report, fmt))
    if html_path is not None:
        from ..reports.report_html import write_html

        write_html(html_path, output, by, gold)
        click.echo(f"HTML report: {html_path}", err=True)
    return 0


@cli.command(
    "eval",
    context_settings=CONTEXT,
    epilog="""Examples:

  batchllm eval out/reviews_sentiment.parquet --gold human_label

  batchllm eval out/reviews_sentiment.parquet --gold human_label --by category --format json

  batchllm eval out/fields.parquet --gold human_label --field sentiment""",
)
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--gold", required=True, help="Column with the human (gold) labels.")
@click.option(
    "--field",
    default="label",
    show_default=True,
    help="The output column to score: label, or a --json-schema field (enum, boolean or string).",
)
@click.option("--by", help="Also score each group of this column.")
@click.option(
    "--format", "fmt", type=click.Choice(["text", "markdown", "json"]), default="text", show_default=True
)
@handles_errors
def eval_cmd(output: Path, gold: str, field: str, by: str | None, fmt: str) -> int:
    """How good a labeling run's labels are against gold: accuracy, F1, kappa, confusion, $/correct."""
    from ..reports.eval import evaluate, format_eval
    from ..reports.review_eval import evaluate_review

    if gold == "review":  # people's verdicts (batchllm review): the random picks' estimate
        if by is not None:
            raise JobError("--by does not go with --gold review: the random picks are one sample")
        click.echo(format_eval(evaluate_review(output, field), fmt))
        return 0
    click.echo(format_eval(evaluate(output, gold, by, field), fmt))
    return 0


@cli.command("models", context_settings=CONTEXT, epilog="Example:\n\n  batchllm models")
def models_cmd() -> int:
    """List the models batchllm knows per provider, with prices and context windows."""
    from ..pricing import load_models

    click.echo(
        f"{'provider':<10} {'model':<32} {'input $/M':>10} {'cached $/M':>11} {'output $/M':>11} {'window':>8}"
    )
    for m in load_models().values():
        assert m.prices is not None and m.context_window is not None
        cached = m.prices.cached_input_per_million
        click.echo(
            f"{m.provider:<10} {m.name:<32} {m.prices.input_per_million!s:>10} "
            f"{'-' if cached is None else str(cached):>11} "
            f"{m.prices.output_per_million!s:>11} {m.context_window:>8,}"
        )
    click.echo(
        "\nWith --provider openai, other models run too: give --input-price and --output-price to cost them."
        "\ncached: a prompt token served from the provider's prompt cache ('-': at the input price;"
        " --cached-input-price sets one)."
    )
    return 0


@cli.command("status", context_settings=CONTEXT, epilog="Example:\n\n  batchllm status out/reviews.parquet")
@click.argument("path", type=click.Path(path_type=Path))
@handles_errors
def status_cmd(path: Path) -> int:
    """Show how far the run behind PATH (an output file or its journal folder) has got."""
    from ..reports.status import status_text

    click.echo(status_text(path))
    return 0


@cli.command(
    "validate",
    context_settings=CONTEXT,
    epilog="Examples:\n\n  batchllm validate jobs/*.toml\n\n  batchllm validate jobs/sentiment.toml --fleet jobs/fleets/three_endpoints.toml",
)
@click.argument("job_files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--fleet",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also check a fleet file: every endpoint must take each job (model, window, parameters).",
)
def validate_cmd(job_files: tuple[Path, ...], fleet: Path | None) -> int:
    """Check job files (keys, types, ranges, input and columns) without running them.

    Every problem of a file is listed, one line each, with the nearest key for an unknown one.
    """
    from ..engine.checks import prepare
    from ..engine.counts import plural
    from ..engine.packed import packs_for
    from ..fleet import fleet_problems, fleet_text, load_fleet

    endpoints = None
    if fleet is not None:
        try:
            endpoints = load_fleet(fleet)
        except BatchLLMError as exc:
            for line in str(exc).splitlines():
                click.echo(f"invalid: {line}", err=True)
            return ExitCode.USAGE
    bad = 0
    for path in job_files:
        problems = job_file_problems(path)
        if not problems:
            try:
                job = build_job(load_job_file(path), job_file=path)
                prepared = prepare(job)
                packs_for(prepared)  # --pack-tokens must leave room for one row
                if endpoints is not None:
                    problems = [f"{path}: {p}" for p in fleet_problems(endpoints, job, str(fleet))]
            except BatchLLMError as exc:
                problems = [str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}"]
        if problems:
            bad += 1
            for problem in problems:
                click.echo(f"invalid: {problem}", err=True)
            continue
        # A fleet's own providers and models, not the job's (which its endpoints replace).
        served = fleet_text(tuple(endpoints) if endpoints is not None else job.fleet)
        where = f"fleet: {served}" if served else f"{job.provider} model {job.model}"
        click.echo(f"ok: {path} ({plural(prepared.rows, 'row')} from {job.input} -> {job.output}, {where})")
    return ExitCode.USAGE if bad else 0


@cli.group(
    "cache",
    context_settings=CONTEXT,
    epilog="Examples:\n\n  batchllm cache stats\n\n  batchllm cache clear --older-than 30d",
)
def cache_group() -> None:
    """The response cache shared by every run: what it holds, and clearing it."""


_DIR = click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    help="The cache folder.  [default: $XDG_CACHE_HOME/batchllm or ~/.cache/batchllm]",
)


@cache_group.command("stats", context_settings=CONTEXT, epilog="Example:\n\n  batchllm cache stats")
@_DIR
@handles_errors
def cache_stats_cmd(directory: Path | None) -> int:
    """How many replies the cache holds and how much disk it takes."""
    import time

    from ..engine.cache import ResponseCache, default_dir

    cache = ResponseCache(directory or default_dir())
    try:
        s = cache.stats()
    finally:
        cache.close()
    when = "" if s["oldest"] is None else f", oldest {time.strftime('%Y-%m-%d', time.localtime(s['oldest']))}"
    click.echo(f"{s['directory']}: {s['entries']:,} replies, {s['bytes'] / 1e6:,.1f} MB{when}")
    return 0


@cache_group.command(
    "clear", context_settings=CONTEXT, epilog="Examples:\n\n  batchllm cache clear --older-than 30d"
)
@_DIR
@click.option("--older-than", help="Only replies older than this, e.g. 30d or 12h.")
@handles_errors
def cache_clear_cmd(directory: Path | None, older_than: str | None) -> int:
    """Forget cached replies: all of them, or those older than a duration."""
    from ..engine.cache import ResponseCache, default_dir
    from ..values import duration

    try:
        if older_than is not None and older_than.strip().replace(".", "", 1).isdigit():
            raise ValueError(
                f"needs a unit, like {older_than.strip()}d or {older_than.strip()}h, got {older_than!r}"
            )
        seconds = duration(older_than) if older_than is not None else None
    except ValueError as exc:
        raise JobError(f"--older-than {exc}") from None
    cache = ResponseCache(directory or default_dir())
    try:
        removed = cache.clear(seconds)
    finally:
        cache.close()
    click.echo(f"removed {removed:,} cached replies from {cache.directory}")
    return 0
