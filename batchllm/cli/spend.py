"""`batchllm spend`: flags in, reports/spend.py's report out."""

from __future__ import annotations

import time
from pathlib import Path

import click

from ..errors import JobError
from . import CONTEXT, cli, handles_errors


@cli.command(
    "spend",
    context_settings=CONTEXT,
    epilog="""Examples:

  batchllm spend --by job

  batchllm spend --since 2026-11-01 --by month --by job --format markdown

  batchllm spend --since 7d --runs --format json

  batchllm spend --by day --by job --html spend.html""",
)
@click.option(
    "--since",
    default="30d",
    show_default=True,
    help="From: an age (30d, 12h, 2w) or a date (2026-11-01, UTC).",
)
@click.option("--until", help="To: a date (that day included) or a time, UTC.  [default: now]")
@click.option(
    "--by",
    multiple=True,
    type=click.Choice(["job", "model", "provider", "day", "week", "month"]),
    help="Break the total down; repeat for several keys (e.g. --by month --by job).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "markdown", "json", "csv"]),
    default="text",
    show_default=True,
)
@click.option("--runs", "with_runs", is_flag=True, help="List the runs themselves.")
@click.option(
    "--sandbox",
    is_flag=True,
    help="The sandbox runs (--sandbox, play money) alone; without it they are left out.",
)
@click.option(
    "--html",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write one self-contained page with plots (spend by day and job, cost per 1,000 rows).",
)
@click.option(
    "--ledger",
    help="The ledger to read.  [env: BATCHLLM_LEDGER; default: $XDG_DATA_HOME/batchllm/ledger.db]",
)
@handles_errors
def spend_cmd(
    since: str,
    until: str | None,
    by: tuple[str, ...],
    fmt: str,
    with_runs: bool,
    sandbox: bool,
    html: Path | None,
    ledger: str | None,
) -> int:
    """What runs cost across outputs, jobs and months: totals, a breakdown, this month's spend
    and forecast, cost per 1,000 rows by job, and the runs that failed or were killed. Runs against
    the built-in emulator (--sandbox) are play money: left out, or with --sandbox shown alone."""
    from ..ledger import ledger_path
    from ..reports.spend import build_spend, parse_when
    from ..reports.spend_text import format_spend

    path = ledger_path(ledger)
    if path is None:
        raise JobError("--ledger off: there is no ledger to read")
    now = time.time()
    start = parse_when(since, now=now)
    end = parse_when(until, end=True, now=now) if until else now + 1
    if end <= start:
        raise JobError(
            f"--until {until} is not after --since {since}" if until else f"--since {since} is in the future"
        )
    report = build_spend(path, start, end, list(by), with_runs, now=now, sandbox=sandbox)
    if html is not None:
        from ..reports.spend_html import write_spend_html

        write_spend_html(html, report)
        click.echo(f"wrote {html}", err=True)
    click.echo(format_spend(report, fmt))
    return 0
