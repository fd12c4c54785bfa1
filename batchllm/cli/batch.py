"""`export-batch` and `import-batch`: a job handed to a batch API, and its results brought home."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..engine.counts import plural
from ..folders import folders_to_make, made_note
from ..job import build_job
from . import CONTEXT, cli, handles_errors
from .help import GroupedCommand
from .options import (
    CHECKPOINT_OPTION,
    FLEET_OPTION,
    JOB_OPTION,
    LEDGER_OPTION,
    REQUEST_OPTIONS,
    RESTART_OPTION,
    apply,
    collect,
)

# A batch file for one endpoint of a fleet (fleet.batch_endpoint), and its replies priced there.
FLEET_OPTIONS = [
    FLEET_OPTION,
    click.option("--fleet-endpoint", help="With --fleet: the endpoint's name."),
]


@cli.command(
    "export-batch",
    cls=GroupedCommand,
    context_settings=CONTEXT,
    epilog="""Examples:

  batchllm export-batch --job jobs/one_word_sentiment.toml -o out/requests.jsonl

  batchllm export-batch --job jobs/one_word_sentiment.toml -o out/rest.jsonl --skip-done out/reviews_one_word.parquet""",
)
@click.argument(
    "input_path", metavar="INPUT", required=False, type=click.Path(dir_okay=False, path_type=Path)
)
@apply(
    [
        JOB_OPTION,
        click.option(
            "-o",
            "--output",
            type=click.Path(dir_okay=False, path_type=Path),
            help="The request file to write (FILE.jsonl; numbered parts when it is split).",
        ),
        *REQUEST_OPTIONS,
    ]
)
@apply(FLEET_OPTIONS)
@click.option(
    "--skip-done",
    type=click.Path(path_type=Path),
    help="Leave out the rows this output's journal already has (ok or failed).",
)
@click.option(
    "--max-lines", type=click.IntRange(1, None), default=50_000, show_default=True, help="Lines per file."
)
@click.option(
    "--max-bytes",
    type=click.IntRange(1, None),
    default=200 * 1024 * 1024,
    show_default=True,
    help="Bytes per file.",
)
@click.pass_context
@handles_errors
def export_cmd(
    ctx: click.Context,
    input_path: Path | None,
    skip_done: Path | None,
    max_lines: int,
    max_bytes: int,
    fleet: Path | None,
    fleet_endpoint: str | None,
    **params: Any,
) -> int:
    """Write the requests a run of INPUT would send as an OpenAI batch request file (-o FILE.jsonl).

    Each line is {"custom_id": row_id, "method": "POST", "url": "/v1/chat/completions", "body": ...}
    with exactly the messages and parameters `run` sends. A larger export is split into numbered
    parts (FILE.001.jsonl, ...) to fit --max-lines and --max-bytes; one that fits keeps the name.
    """
    from ..backends.batch_export import export_batch
    from ..errors import JobError

    values, job_file, given = collect(ctx, input_path, params)
    target = values.pop("output", None)
    if target is None:
        raise JobError("missing -o FILE.jsonl: say where to write the requests")
    target = Path(target)
    values["output"] = (
        str(skip_done) if skip_done is not None and str(skip_done).endswith(".parquet") else "x.parquet"
    )
    values.pop("max_cost", None)  # nothing is spent here
    job = build_job(values, job_file=job_file, flag_names=given)
    if job.labeling is not None and job.labeling.samples > 1:
        raise JobError(
            f"--samples {job.labeling.samples}: a batch file holds one request per row, and votes over "
            "several answers need `batchllm run`; export with --samples 1 (invalid answers imported "
            "are re-asked by `batchllm run --retry-errors`)"
        )
    folders_to_make(target, "--output")  # refused before the input is read
    via = _via(job, fleet, fleet_endpoint)
    done = export_batch(job, target, skip_done=skip_done, max_lines=max_lines, max_bytes=max_bytes, via=via)
    if done.made_folder is not None:
        click.echo(f"warning: {made_note(done.made_folder, target)}", err=True)
    if done.note is not None:
        click.echo(f"warning: {done.note}", err=True)
    files = ", ".join(str(f) for f in done.files)
    click.echo(
        f"exported {plural(done.lines, 'request')} to {files}"
        + (
            f"; {plural(done.refused, 'row')} a run would refuse (no prompt, too long) left out"
            if done.refused
            else ""
        )
        + (f" (for fleet endpoint {via.name!r}, model {via.model.name})" if via is not None else "")
    )
    return 0


def _via(job: Any, fleet: Path | None, name: str | None) -> Any:
    """The fleet endpoint a batch file is for: --fleet's, else the job's ``fleet``; None without one."""
    from ..errors import JobError
    from ..fleet import batch_endpoint, load_fleet

    endpoints = tuple(load_fleet(fleet)) if fleet is not None else job.fleet
    if endpoints is None:
        if name is not None:
            raise JobError("--fleet-endpoint goes with --fleet (or a job's fleet)")
        return None
    return batch_endpoint(endpoints, name, str(fleet) if fleet is not None else "the job's fleet")


@cli.command(
    "import-batch",
    cls=GroupedCommand,
    context_settings=CONTEXT,
    epilog="""Examples:

  batchllm import-batch results.jsonl errors.jsonl --job jobs/one_word_sentiment.toml

  batchllm import-batch prompts.jsonl vllm_results.jsonl -o out/results.parquet --provider openai""",
)
@click.argument(
    "files",
    metavar="[INPUT] RESULTS...",
    nargs=-1,
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
)
@click.option(
    "--input",
    "input_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The job's input (or INPUT).",
)
@apply(
    [
        JOB_OPTION,
        click.option(
            "-o", "--output", type=click.Path(path_type=Path), help="The job's output Parquet file."
        ),
        *REQUEST_OPTIONS,
        CHECKPOINT_OPTION,
        RESTART_OPTION,
        LEDGER_OPTION,
    ]
)
@apply(FLEET_OPTIONS)
@click.pass_context
@handles_errors
def import_cmd(
    ctx: click.Context,
    files: tuple[Path, ...],
    input_path: Path | None,
    fleet: Path | None,
    fleet_endpoint: str | None,
    **params: Any,
) -> int:
    """Record batch RESULTS (OpenAI output and error files, or vLLM's) in OUTPUT as a run would.

    INPUT, the job's input as export-batch takes it, goes first (or --input, or the job file's).
    Rows are joined by custom_id; rows with no result, expired ones and 429/5xx results stay
    pending, so `batchllm run` with the same job sends only those. Importing twice changes nothing.
    A row whose request changed since export-batch (another --system, template, model, labels...)
    is not joined: it stays pending, and one line says how many, which first and what their
    replies cost (counted in the output's cost: they were billed).
    Costs are at the model's batch prices (models.toml) or --input-price/--output-price.
    """
    from ..backends.batch_transfer import import_batch
    from ..engine.summary_text import format_summary
    from . import command_line

    input_path, results = _input_and_results(files, input_path)
    values, job_file, given = collect(ctx, input_path, params)
    values.pop("max_cost", None)  # the batch API spent it already: nothing is sent here
    job = build_job(values, job_file=job_file, flag_names=given)

    def warn(message: str) -> None:
        click.echo(f"warning: {message}", err=True)

    via = _via(job, fleet, fleet_endpoint)
    done = import_batch(
        job, results, command=command_line(), warn=warn, via=via, live_command=_live_command(ctx, input_path)
    )
    click.echo(
        f"imported {done.ok + done.invalid:,} replies"
        + (
            f" ({done.invalid:,} did not validate: `batchllm run --retry-errors` re-asks them)"
            if done.invalid
            else ""
        )
        + f" and {plural(done.error, 'failed request')}"
        + (f"; {done.unchanged:,} were in the journal already" if done.unchanged else "")
        + (
            f"; {done.unreadable:,} success lines had no readable reply (left pending)"
            if done.unreadable
            else ""
        ),
        err=True,
    )
    click.echo(format_summary(done.summary), err=True)
    return int(done.exit_code)


def _input_and_results(files: tuple[Path, ...], option: Path | None) -> tuple[Path | None, list[Path]]:
    """The job's input (INPUT: a first file that is not a results file, or --input) and the
    results files; INPUT and --input naming different files is a usage error."""
    from ..backends.openai_batch import is_results_file
    from ..errors import JobError

    if is_results_file(files[0]):
        return option, list(files)
    if len(files) < 2:
        raise JobError(
            f"{files[0]}: not a batch results file (no custom_id with a response or error on its first "
            "line); give the job's input first, then the results: batchllm import-batch INPUT RESULTS..."
        )
    given, results = files[0], list(files[1:])
    if option is not None and option.resolve() != given.resolve():
        raise JobError(f"--input {option} and INPUT {given} name different files: give the job's input once")
    return given, results


# What a live run of the same job must not take from an import's command line: the batch's
# prices, its one fleet endpoint (the live run has the whole fleet), a fresh start.
_BATCH_ONLY = frozenset({"input_price", "output_price", "fleet_endpoint", "restart"})


def _live_command(ctx: click.Context, input_path: Path | None) -> str:
    """`batchllm run` with the job and flags this import was given (``input_path``, its INPUT
    positional): the command that sends only the rows it left pending."""
    import shlex

    from click.core import ParameterSource

    words = ["batchllm", "run"]
    for param in ctx.command.params:
        name = param.name
        if not isinstance(param, click.Option) or name is None or name in _BATCH_ONLY:
            continue
        if ctx.get_parameter_source(name) is not ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[name]
        if name == "input_path":
            continue
        if param.is_flag:
            flag = param.opts[0] if value else next(iter(param.secondary_opts), "")
            words += [flag] if flag else []
        else:
            for v in value if param.multiple else [value]:
                words += [param.opts[0], str(v)]
    if input_path is not None:
        words.insert(2, str(input_path))
    return " ".join(shlex.quote(w) for w in words)
