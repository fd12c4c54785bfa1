"""The command line: parse flags, load the job, call the library, turn errors into exit codes.

Every command is a thin client of the library (``run_job``, ``estimate``, ``report``...);
``asyncio.run`` appears here and nowhere else. Errors found before anything is sent are
``BatchLLMError``s, printed as one line (no traceback) with their exit code.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from . import __version__
from .errors import EXIT_CODE_TABLE, BatchLLMError, ExitCode, JobError
from .job import JOB_KEYS, build_job, load_job_file

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _fail(message: str, code: int = ExitCode.USAGE) -> int:
    click.echo(f"batchllm: error: {message}", err=True)
    return code


@click.group(
    context_settings=CONTEXT,
    epilog=EXIT_CODE_TABLE.replace("\n", "\n\n")
    + "\n\nExample:\n\n  batchllm run sample_data/reviews.csv -o out/reviews.parquet --template 'Classify: {review}' --sandbox",
)
@click.version_option(__version__, prog_name="batchllm")
def cli() -> None:
    """Run a file of prompts through an LLM API: resumable, rate-limited, exactly costed.

    Reads CSV or Parquet, sends one request per row to the Dataoorts API (or the built-in
    sandbox), and writes every input row back to Parquet with its response, token usage and cost.
    """


# --- run --------------------------------------------------------------------------------------

_PROMPT_OPTIONS = [
    click.option(
        "--input-format",
        type=click.Choice(["csv", "parquet"]),
        help="Input format, when the extension does not say.",
    ),
    click.option("--prompt-column", help="Column holding the prompt text.  [default: prompt]"),
    click.option("--template", help='Prompt template filled from columns, e.g. "Classify: {review}".'),
    click.option(
        "--template-file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Read the template from a file.",
    ),
    click.option("--system", help="System prompt sent with every row."),
    click.option(
        "--model", help="Model name (see `batchllm models`).  [default: meta/llama-3.1-70b-instruct]"
    ),
    click.option("--max-tokens", type=int, help="Most completion tokens per row.  [default: 256]"),
]
_RUN_OPTIONS = [
    click.option(
        "--job",
        "job_file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="TOML job file (see jobs/); flags override it.",
    ),
    click.option(
        "-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Output Parquet file."
    ),
    *_PROMPT_OPTIONS,
    click.option("--id-column", help="Column with a stable, unique id per row (enables incremental runs)."),
    click.option("--temperature", type=float, help="0 to 5."),
    click.option("--top-p", type=float, help="0 to 2."),
    click.option("--top-k", type=int, help="1 to 50."),
    click.option("--seed", type=int, help="1 to 9,999,999,999."),
    click.option("--repetition-penalty", type=float, help="0 to 2."),
    click.option("--frequency-penalty", type=float, help="0 to 2."),
    click.option("--presence-penalty", type=float, help="0 to 2."),
    click.option(
        "--endpoint", help="API URL.  [env: DATAOORTS_ENDPOINT; default: https://cloud.dataoorts.com/api/v1]"
    ),
    click.option("--api-key-env", help="Environment variable holding the key.  [default: DATAOORTS_API_KEY]"),
    click.option(
        "--api-key-file", type=click.Path(dir_okay=False, path_type=Path), help="Read the key from this file."
    ),
    click.option(
        "--sandbox", is_flag=True, default=None, help="Use the built-in emulator: no key, no network."
    ),
    click.option("--concurrency", type=int, help="Requests in flight at most.  [default: 128]"),
    click.option(
        "--rpm", help="Requests/min: a number (hard ceiling), 0 (off), or auto (adaptive).  [default: auto]"
    ),
    click.option(
        "--tpm", type=int, help="Tokens/min (prompt + max_tokens reserved per request); 0 or unset: off."
    ),
    click.option("--max-attempts", type=int, help="Attempts per row for transient failures.  [default: 6]"),
    click.option("--timeout", type=float, help="Seconds per request.  [default: 120]"),
    click.option(
        "--max-error-rate",
        type=float,
        help="Stop when this share of the last --error-window rows failed.  [default: 0.5]",
    ),
    click.option("--error-window", type=int, help="Rows in the error-rate window.  [default: 100]"),
    click.option("--max-cost", help="Dollar cap on what this output may cost in all (exit 3 when reached)."),
    click.option("--max-runtime", help="Stop dispatching after this long, e.g. 50m (exit 75)."),
    click.option(
        "--grace", type=float, help="Seconds in-flight requests get to finish on a stop.  [default: 10]"
    ),
    click.option(
        "--checkpoint",
        type=click.Path(file_okay=False, path_type=Path),
        help="Journal folder.  [default: OUTPUT.batchllm/]",
    ),
    click.option(
        "--retry-errors", is_flag=True, default=None, help="Send rows that failed in an earlier run again."
    ),
    click.option("--restart", is_flag=True, default=None, help="Discard the journal and start over."),
    click.option(
        "--refresh-changed",
        is_flag=True,
        default=None,
        help="Re-send rows whose prompt changed under the same --id-column value.",
    ),
    click.option(
        "--log-format", type=click.Choice(["text", "json"]), help="json: one JSON object per line on stderr."
    ),
    click.option(
        "--summary-json",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Also write the final summary to this file.",
    ),
    click.option(
        "--progress",
        type=click.Choice(["auto", "bar", "lines", "none"]),
        help="Progress display.  [default: auto]",
    ),
]


def _apply(options: list[Any]) -> Any:
    def decorate(f: Any) -> Any:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def _collect(
    ctx: click.Context, input_path: Path | None, params: dict[str, Any]
) -> tuple[dict[str, Any], Path | None, frozenset[str]]:
    """Merge the job file (if any) with the flags actually given on the command line."""
    job_file = params.pop("job_file", None)
    values: dict[str, Any] = load_job_file(job_file) if job_file is not None else {}
    given = set()
    for name, value in params.items():
        if name not in JOB_KEYS:
            continue
        if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
            given.add(name)
            values[name] = str(value) if isinstance(value, Path) else value
    if input_path is not None:
        values["input"] = str(input_path)
        given.add("input")
    return values, job_file, frozenset(given)


@cli.command(
    "run",
    context_settings=CONTEXT,
    epilog=EXIT_CODE_TABLE.replace("\n", "\n\n")
    + """

Examples:

  batchllm run sample_data/reviews.csv -o out/reviews.parquet --template 'Classify the sentiment of: {review}' --sandbox

  DATAOORTS_API_KEY=... batchllm run prompts.parquet -o out.parquet --max-cost 5

  batchllm run --job jobs/label_reviews.toml""",
)
@click.argument(
    "input_path", metavar="INPUT", required=False, type=click.Path(dir_okay=False, path_type=Path)
)
@_apply(_RUN_OPTIONS)
@click.pass_context
def run_cmd(ctx: click.Context, input_path: Path | None, **params: Any) -> int:
    """Send every row of INPUT (CSV or Parquet) and write the results to OUTPUT (Parquet).

    Re-running the same command resumes: rows already done are not sent (or paid for) again.
    """
    from .progress import make_reporter
    from .runner import command_line, format_summary, run_job

    log_format = params.get("log_format") or "text"
    try:
        values, job_file, given = _collect(ctx, input_path, params)
        log_format = values.get("log_format") or log_format
        job = build_job(values, job_file=job_file, flag_names=given)
    except BatchLLMError as exc:
        return _report_error(exc, log_format)
    reporter = make_reporter(job.log_format, job.progress)
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            result = runner.run(run_job(job, reporter=reporter, command=command_line(), handle_signals=True))
    except BatchLLMError as exc:
        reporter.close()
        return _report_error(exc, job.log_format)
    except KeyboardInterrupt:
        reporter.close()
        return _fail("interrupted before the run started", ExitCode.INTERRUPTED)
    reporter.summary(result.summary, format_summary(result.summary))
    return int(result.exit_code)


def _loop_factory() -> Any:
    """uvloop when installed: the same asyncio API, measurably faster per request (make bench)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _report_error(exc: BatchLLMError, log_format: str) -> int:
    if log_format == "json":
        from .progress import JsonReporter

        JsonReporter().error(str(exc))
        return int(exc.exit_code)
    return _fail(str(exc), exc.exit_code)


# --- estimate ---------------------------------------------------------------------------------


@cli.command(
    "estimate",
    context_settings=CONTEXT,
    epilog="""Examples:

  batchllm estimate sample_data/reviews.csv --template 'Classify: {review}' --max-tokens 16

  batchllm estimate prompts.csv --system 'You are an expert deep learning engineer' --max-tokens 512 --format json

  batchllm estimate sample_data/reviews.csv --template 'Classify: {review}' --pilot 20 -o out/r.parquet --sandbox""",
)
@click.argument(
    "input_path", metavar="INPUT", required=False, type=click.Path(dir_okay=False, path_type=Path)
)
@_apply(_RUN_OPTIONS)
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
@click.option(
    "--format", "fmt", type=click.Choice(["text", "json", "markdown"]), default="text", show_default=True
)
@click.pass_context
def estimate_cmd(
    ctx: click.Context,
    input_path: Path | None,
    pilot: int | None,
    from_run: Path | None,
    fmt: str,
    **params: Any,
) -> int:
    """What running INPUT would cost: exact prompt tokens, worst case, expected, and time.

    Takes the same options as `run`. With -o, the estimate is kept in that output's journal and
    the run's report compares it with what the run cost; --pilot also pays for N sampled rows,
    which the full run then does not send again.
    """
    from .estimate import completions_of_journal, estimate, format_estimate, pilot_positions, record_estimate
    from .journal import Journal
    from .progress import make_reporter
    from .runner import command_line, prepare, run_job

    try:
        values, job_file, given = _collect(ctx, input_path, params)
        keep = "output" in values
        if pilot is not None and not keep:
            raise JobError("--pilot needs -o OUTPUT.parquet: the pilot's rows are kept in its journal")
        values.setdefault("output", "estimate.parquet")
        job = build_job(values, job_file=job_file, flag_names=given)
        observed = None
        if pilot is not None:
            positions = pilot_positions(prepare(job).rows, pilot)
            reporter = make_reporter(job.log_format, job.progress)
            with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                result = runner.run(
                    run_job(
                        job, reporter=reporter, command=command_line(), only=positions, write_output=False
                    )
                )
            reporter.close()
            if result.exit_code not in (ExitCode.OK, ExitCode.ROW_ERRORS):
                return _fail(f"the pilot stopped: {result.summary.get('message')}", result.exit_code)
            journal = Journal.open_readonly(job.journal_dir)
            try:
                observed = completions_of_journal(journal)
            finally:
                journal.conn.close()
        report = estimate(job, from_run, observed)
        if pilot is not None:
            report["expected_from"] = f"a pilot of {pilot:,} rows"
        if keep:
            record_estimate(job, report)
        click.echo(format_estimate(report, fmt))
    except BatchLLMError as exc:
        return _fail(str(exc), exc.exit_code)
    return 0


# --- report -----------------------------------------------------------------------------------


@cli.command(
    "report",
    context_settings=CONTEXT,
    epilog="""Examples:

  batchllm report out/reviews_labeled.parquet --by category

  batchllm report out/reviews_labeled.parquet --by product --html out/cost_review.html""",
)
@click.argument("output", type=click.Path(dir_okay=False, path_type=Path))
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
def report_cmd(output: Path, by: str | None, fmt: str, html_path: Path | None) -> int:
    """What a run cost: rows, tokens, cost per row, latency, errors; by any column."""
    from .report import build_report, format_report

    try:
        report = build_report(output, by)
        click.echo(format_report(report, fmt))
        if html_path is not None:
            from .report_html import write_html

            write_html(html_path, output, by)
            click.echo(f"HTML report: {html_path}", err=True)
    except BatchLLMError as exc:
        return _fail(str(exc), exc.exit_code)
    return 0


# --- sandbox ----------------------------------------------------------------------------------


@cli.command(
    "sandbox",
    context_settings=CONTEXT,
    epilog="""Example:

  batchllm sandbox --port 8787 --api-key test-key --latency 0.2 --rate-limit 20

  DATAOORTS_ENDPOINT=http://127.0.0.1:8787/api/v1 DATAOORTS_API_KEY=test-key batchllm run sample_data/reviews.csv -o out/r.parquet --template 'Classify: {review}'""",
)
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback only is wise)."
)
@click.option("--port", default=8787, show_default=True, type=int, help="Port; 0 picks a free one.")
@click.option(
    "--api-key",
    envvar="BATCHLLM_SANDBOX_KEY",
    help="Key clients must send.  [env: BATCHLLM_SANDBOX_KEY; default: random, printed]",
)
@click.option("--latency", default=0.0, type=float, show_default=True, help="Seconds before each reply.")
@click.option(
    "--latency-per-token",
    default=0.0,
    type=float,
    show_default=True,
    help="Extra seconds per completion token.",
)
@click.option("--jitter", default=0.0, type=float, show_default=True, help="+/- fraction of the latency.")
@click.option(
    "--reply-tokens",
    default="8-64",
    show_default=True,
    help="Natural reply length range in tokens (cut at max_tokens).",
)
@click.option(
    "--rate-limit",
    default=0.0,
    type=float,
    show_default=True,
    help="Requests/second before 429/3040; 0 = none.",
)
@click.option(
    "--rate-burst",
    default=2,
    type=int,
    show_default=True,
    help="Requests allowed back to back under --rate-limit.",
)
@click.option(
    "--quota",
    default=0,
    type=int,
    show_default=True,
    help="Successful requests before 429/3036 (quota used up); 0 = none.",
)
@click.option(
    "--fail-5xx", default=0.0, type=float, show_default=True, help="Share of requests answered 500/503."
)
@click.option("--fail-drop", default=0.0, type=float, show_default=True, help="Share of connections dropped.")
@click.option(
    "--fail-hang", default=0.0, type=float, show_default=True, help="Share of requests never answered."
)
@click.option(
    "--fail-garbled", default=0.0, type=float, show_default=True, help="Share of replies cut in half."
)
@click.option(
    "--fail-3040",
    default=0.0,
    type=float,
    show_default=True,
    help="Share answered 429/3040 without Retry-After.",
)
@click.option("--seed", type=int, help="Seed for fault injection (replies are deterministic anyway).")
@click.option(
    "--keep-log/--no-keep-log",
    default=True,
    show_default=True,
    help="Keep the request log behind GET /_sandbox/log.",
)
@click.option(
    "--port-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the bound port here once listening.",
)
def sandbox_cmd(port_file: Path | None, host: str, port: int, reply_tokens: str, **options: Any) -> int:
    """Serve a local emulator of the Dataoorts API (CONTRACT.md) until interrupted."""
    from .sandbox import SandboxConfig, start_sandbox

    try:
        low, _, high = reply_tokens.partition("-")
        tokens = (int(low), int(high or low))
    except ValueError:
        return _fail(f"--reply-tokens {reply_tokens!r} must be N or MIN-MAX")
    rates = [k for k in options if k.startswith("fail_") and not 0 <= options[k] <= 1]
    if rates:
        return _fail(f"--{rates[0].replace('_', '-')} must be a share from 0 to 1")
    if options["api_key"] is None:
        options.pop("api_key")
    config = SandboxConfig(reply_tokens=tokens, **options)

    async def serve() -> None:
        runner, box, url = await start_sandbox(config, host, port)
        if port_file is not None:
            port_file.write_text(url.rsplit(":", 1)[1].split("/")[0])
        click.echo(f"batchllm sandbox listening on {url} (key: {box.config.api_key})", err=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await runner.shutdown()
            await runner.cleanup()

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(serve())
    except OSError as exc:
        return _fail(f"cannot listen on {host}:{port}: {exc.strerror}")
    return 0


# --- models, status, validate -----------------------------------------------------------------


@cli.command("models", context_settings=CONTEXT, epilog="Example:\n\n  batchllm models")
def models_cmd() -> int:
    """List the models batchllm knows, with prices and context windows."""
    from .pricing import load_models

    click.echo(f"{'model':<32} {'input $/M':>10} {'output $/M':>11} {'window':>8}")
    for m in load_models().values():
        click.echo(
            f"{m.name:<32} {m.input_price_per_million!s:>10} {m.output_price_per_million!s:>11} {m.context_window:>8,}"
        )
    return 0


@cli.command("status", context_settings=CONTEXT, epilog="Example:\n\n  batchllm status out/reviews.parquet")
@click.argument("path", type=click.Path(path_type=Path))
def status_cmd(path: Path) -> int:
    """Show how far the run behind PATH (an output file or its journal folder) has got."""
    from .status import status_text

    try:
        click.echo(status_text(path))
    except BatchLLMError as exc:
        return _fail(str(exc), exc.exit_code)
    return 0


@cli.command("validate", context_settings=CONTEXT, epilog="Example:\n\n  batchllm validate jobs/*.toml")
@click.argument("job_files", nargs=-1, required=True, type=click.Path(path_type=Path))
def validate_cmd(job_files: tuple[Path, ...]) -> int:
    """Check job files (keys, types, ranges, input and columns) without running them."""
    from .runner import prepare

    bad = 0
    for path in job_files:
        try:
            job = build_job(load_job_file(path), job_file=path)
            prepared = prepare(job)
        except BatchLLMError as exc:
            bad += 1
            click.echo(
                f"invalid: {exc}" if str(exc).startswith(str(path)) else f"invalid: {path}: {exc}", err=True
            )
            continue
        click.echo(f"ok: {path} ({prepared.rows:,} rows from {job.input} -> {job.output}, model {job.model})")
    return ExitCode.USAGE if bad else 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    # Until a run installs its graceful handlers, SIGTERM stops like Ctrl-C: exit 130, no traceback.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        code = cli.main(standalone_mode=False, prog_name="batchllm")
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("batchllm: aborted", err=True)
        sys.exit(ExitCode.INTERRUPTED)
    except click.UsageError as exc:
        # One line, like every other error: what is wrong and where to read more.
        command = exc.ctx.command_path if exc.ctx is not None else "batchllm"
        sys.exit(_fail(f"{exc.format_message()} (see `{command} --help`)", exc.exit_code))
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except JobError as exc:
        sys.exit(_fail(str(exc)))
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
