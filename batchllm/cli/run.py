"""`batchllm run` and `batchllm estimate`: flags in, the library called, an exit code out."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import click

from .. import DISTRIBUTION
from ..errors import EXIT_CODE_HELP, BatchLLMError, ExitCode, JobError
from ..job import Job, build_job
from ..job_keys import parse_pack
from . import CONTEXT, cli, command_line, fail, handles_errors, report_error, run_async
from .help import GroupedCommand
from .options import RUN_OPTIONS, apply, collect, make_output_folder


def _job(ctx: click.Context, input_path: Path | None, params: dict[str, Any]) -> Job:
    values, job_file, given = collect(ctx, input_path, params)
    return build_job(values, job_file=job_file, flag_names=given)


@cli.command(
    "run",
    cls=GroupedCommand,
    context_settings=CONTEXT,
    epilog=EXIT_CODE_HELP
    + """

Examples:

  batchllm run sample_data/reviews.csv -o out/reviews.parquet --template 'Classify the sentiment of: {review}' --sandbox

  DATAOORTS_API_KEY=... batchllm run prompts.parquet -o out.parquet --max-cost 5

  batchllm run prompts.csv -o out.parquet --provider openai --endpoint http://127.0.0.1:8000/v1 --model meta-llama/Llama-3.1-8B-Instruct

  batchllm run --job jobs/one_word_sentiment.toml""",
)
@click.argument("input_path", metavar="INPUT", required=False, type=click.Path(path_type=Path))
@apply(RUN_OPTIONS)
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    help=f"local, or ray: the same job on Ray Data (pip install '{DISTRIBUTION}[ray]'); INPUT and OUTPUT "
    "may then be directories of Parquet files.  [default: local]",
)
@click.option("--ray-address", help="With --engine ray: the cluster to join.  [default: start a local Ray]")
@click.option("--actors", type=int, help="With --engine ray: actors sending requests.  [default: 2]")
@click.pass_context
def run_cmd(ctx: click.Context, input_path: Path | None, **params: Any) -> int:
    """Send every row of INPUT (CSV, Parquet, JSON Lines rows or a batch request file) and write the results to OUTPUT (Parquet).

    Re-running the same command resumes: rows already done are not sent (or paid for) again.
    With --engine ray, INPUT may be a directory or glob of files and OUTPUT is a directory.
    """
    from ..api import failure_summary, run_job
    from ..engine.summary_text import format_summary
    from .progress import make_reporter

    log_format = params.get("log_format")
    try:
        job = _job(ctx, input_path, params)
    except BatchLLMError as exc:
        failed = {"complete": False, "exit_code": int(exc.exit_code), "message": str(exc)}
        _summary_file(params.get("summary_json"), failed)
        return report_error(exc, log_format)
    reporter = make_reporter(job.log_format, job.progress)
    if job.sandbox and (
        unused := [f"--{k.replace('_', '-')}" for k in ("endpoint", "api_key_file") if params.get(k)]
    ):
        reporter.warning(f"--sandbox answers every request: {' and '.join(unused)} not used")
    try:
        result = run_async(run_job(job, observer=reporter, command=command_line(), handle_signals=True))
    except BatchLLMError as exc:
        reporter.close()
        _summary_file(job.summary_json, failure_summary(job, exc))
        return report_error(exc, job.log_format)
    except KeyboardInterrupt:
        reporter.close()
        return fail("interrupted before the run started", ExitCode.INTERRUPTED)
    reporter.summary(result.summary, format_summary(result.summary))
    return int(result.exit_code)


def _summary_file(path: Path | None, summary: dict[str, Any]) -> None:
    """A run refused or stopped before its end writes its --summary-json all the same: a
    monitor reading the file must not find the last night's success there."""
    if path is None:
        return
    import orjson

    from ..folders import write_atomic

    with contextlib.suppress(OSError, BatchLLMError):
        write_atomic(Path(path), orjson.dumps(summary, option=orjson.OPT_INDENT_2), "--summary-json")


@cli.command(
    "estimate",
    cls=GroupedCommand,
    context_settings=CONTEXT,
    epilog="""Examples:

  batchllm estimate sample_data/reviews.csv --template 'Classify: {review}' --max-tokens 16

  batchllm estimate prompts.csv --system 'You are an expert deep learning engineer' --max-tokens 512 --format json

  batchllm estimate sample_data/reviews.csv --template 'Classify: {review}' --pilot 20 -o out/r.parquet --sandbox

  batchllm estimate --job jobs/sentiment.toml --compare

  batchllm estimate --job jobs/sentiment.toml --fleet jobs/fleets/three_endpoints.toml --deadline 30m""",
)
@click.argument(
    "input_path", metavar="INPUT", required=False, type=click.Path(dir_okay=False, path_type=Path)
)
@apply(RUN_OPTIONS)
@click.option(
    "--pilot",
    type=click.IntRange(1, 100_000),
    help="Run N sampled rows for real (into -o's journal) and project from them.",
)
@click.option(
    "--from-run",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Expected cost from a previous run's output.",
)
@click.option("--gold", help="With --pilot: the column of human labels to score the pilot's labels against.")
@click.option(
    "--compare",
    is_flag=True,
    help="The job on every model in `batchllm models` that fits it: prompt tokens, worst case and expected "
    "cost at live and batch prices, and the time at each one's documented rate limit.",
)
@click.option(
    "--format", "fmt", type=click.Choice(["text", "json", "markdown"]), default="text", show_default=True
)
@click.pass_context
@handles_errors
def estimate_cmd(
    ctx: click.Context,
    input_path: Path | None,
    pilot: int | None,
    from_run: Path | None,
    gold: str | None,
    compare: bool,
    fmt: str,
    **params: Any,
) -> int:
    """What running INPUT would cost: exact prompt tokens, worst case, expected, and time.

    Takes the same options as `run`. With -o, the estimate is kept in that output's journal and
    the run's report compares it with what the run cost; --pilot also pays for N sampled rows,
    which the full run then does not send again.
    """
    from ..api import run_pilot
    from ..engine.reopen import sandbox_answered
    from ..reports.estimate import estimate, record_estimate
    from ..reports.estimate_text import format_estimate
    from .progress import make_reporter

    values, job_file, given = collect(ctx, input_path, params)
    keep = "output" in values  # -o (or the job file's output): keep the estimate in its journal
    values.setdefault("output", "estimate.parquet")
    sizes = pack_sizes(values.get("pack"))
    if sizes is not None:
        values["pack"] = sizes[0]
    job = build_job(values, job_file=job_file, flag_names=given)
    # Usage errors before a pilot pays for anything.
    if gold is not None and (pilot is None or job.labeling is None):
        raise JobError("--gold goes with --pilot and --labels: it scores the pilot's labels")
    if job.fleet is not None and compare:  # the plan is a fleet's comparison: its endpoints side by side
        raise JobError("--compare goes without --fleet: the fleet's plan compares its endpoints; drop one")
    if sizes is not None:
        return _pack_table(job, sizes, pilot, gold, keep, fmt)
    observed, accuracy = None, None
    if pilot is not None:
        if not keep:
            raise JobError("--pilot needs -o OUTPUT.parquet: the pilot's rows are kept in its journal")
        reporter = make_reporter(job.log_format, job.progress)
        try:
            code, message, observed, accuracy = run_async(
                run_pilot(job, pilot, reporter, command_line(), gold)
            )
        finally:
            reporter.close()
        if code not in (ExitCode.OK, ExitCode.ROW_ERRORS):
            return fail(f"the pilot stopped: {message}", code)
    if job.fleet is not None:
        return _fleet_plan(job, job.deadline, from_run, observed, fmt)
    if compare:
        from ..reports.compare import compare as compare_models
        from ..reports.compare import format_compare

        click.echo(format_compare(compare_models(job, from_run, observed), fmt))
        return 0
    report = estimate(job, from_run, observed)
    if pilot is not None:
        report["expected_from"] = f"a pilot of {pilot:,} rows"
        if accuracy is not None:
            report["pilot_accuracy"] = accuracy
        if job.sandbox or sandbox_answered(job.journal_dir):
            report["play_money"] = True
    if job.labeling is not None and job.labeling.vote_below is not None and keep and job.journal_dir.exists():
        from ..reports.pilot import votes_share  # from a pilot's rows (this one's, or an earlier one's)

        votes = votes_share(job.journal_dir, job.labeling, report["rows_to_send"])
        if votes["pilot_rows"]:
            report["votes"] = votes
    if keep:
        make_output_folder(job)  # a pilot made it already; else only now the input proved good
    if keep and not record_estimate(job, report):
        click.echo(
            f"note: not kept in {job.journal_dir}: it was written with other settings than these",
            err=True,
        )
    click.echo(format_estimate(report, fmt))
    return 0


def _fleet_plan(job: Job, deadline: str | None, from_run: Path | None, observed: Any, fmt: str) -> int:
    """``estimate --fleet F [--deadline D]``: the plan (reports/fleet_plan.py)."""
    from ..fleet import deadline_note, fleet_problems, parse_deadline
    from ..reports.compare import observed_of
    from ..reports.expected import completions_of_run
    from ..reports.fleet_plan import format_plan, plan

    assert job.fleet is not None
    fleet = list(job.fleet)
    problems = fleet_problems(fleet, job, "--fleet")
    if problems:
        raise JobError("\n".join(problems))
    seconds = parse_deadline(deadline) if deadline is not None else None
    if deadline is not None and seconds is not None and (note := deadline_note(deadline, seconds)):
        click.echo(f"warning: {note}", err=True)
    if from_run is not None:
        observed = completions_of_run(from_run)
    click.echo(format_plan(plan(job, fleet, seconds, observed or observed_of(job)), fmt))
    return 0


def pack_sizes(raw: Any) -> list[int] | None:
    """``--pack 1,5,10,20`` (estimate only): the sizes to pilot; None for one size."""
    if not isinstance(raw, str) or "," not in raw:
        return None
    sizes = []
    for part in raw.split(","):
        try:
            size = parse_pack(part.strip())
        except ValueError as exc:
            raise JobError(f"--pack {raw}: {part.strip()!r} {exc}") from None
        if size not in sizes:
            sizes.append(size)
    return sorted(sizes)


def _pack_table(job: Job, sizes: list[int], pilot: int | None, gold: str | None, keep: bool, fmt: str) -> int:
    """``estimate --pilot M --gold COLUMN --pack 1,5,20``: one line per size."""
    from ..api import PilotStopped, run_pack_pilots
    from ..reports.pilot import format_table
    from .progress import make_reporter

    if pilot is None or gold is None or not keep or job.labeling is None:
        raise JobError(
            "--pack with several sizes compares them on your own gold: give --pilot M, --gold COLUMN, "
            "-o OUTPUT.parquet and --labels (or --json-schema)"
        )
    reporter = make_reporter(job.log_format, job.progress)
    try:
        table = run_async(run_pack_pilots(job, pilot, sizes, gold, reporter, command_line()))
    except PilotStopped as exc:
        return fail(str(exc), exc.code)
    finally:
        reporter.close()
    click.echo(format_table(table, fmt))
    return 0
