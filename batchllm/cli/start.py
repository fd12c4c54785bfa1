"""`batchllm init`: a commented job file drawn from the user's own input (starter.py)."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import JobError
from ..folders import made_note, make_folders
from . import CONTEXT, cli, handles_errors
from .options import ENCODING_OPTION, JSON_SCHEMA_OPTION, LABELS_OPTION, MODEL_OPTION, PROVIDER_OPTION, apply


def option_notes() -> dict[str, str]:
    """Each job key's comment: the help of `run`'s option for it, less its ``[default: ...]``."""
    from .run import run_cmd

    return {
        p.name: p.help.split("  [")[0]
        for p in run_cmd.params
        if isinstance(p, click.Option) and p.name and p.help
    }


@cli.command(
    "init",
    context_settings=CONTEXT,
    epilog="""Examples:

  batchllm init sample_data/reviews.csv --labels positive,negative,neutral -o my_reviews.toml

  batchllm init tickets.parquet --json-schema fields.json --provider openai --model gpt-4o-mini""",
)
@click.argument("input_path", metavar="INPUT", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    "job_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The job file to write; never overwritten.  [default: INPUT's name, .toml, here]",
)
@apply([LABELS_OPTION, JSON_SCHEMA_OPTION, PROVIDER_OPTION, MODEL_OPTION, ENCODING_OPTION])
@handles_errors
def init_cmd(
    input_path: Path,
    job_path: Path | None,
    labels: str | None,
    json_schema: Path | None,
    provider: str | None,
    model: str | None,
    encoding: str | None,
) -> int:
    """Write a job file for INPUT (CSV, Parquet or JSONL) from its own columns, one comment a key.

    The template names the columns that hold text, id_column is a column of distinct ids if there
    is one, and the model's prices and rate come from `batchllm models`. Then `batchllm validate`
    it, and `batchllm run --job JOB.toml --sandbox` to see it run with nothing spent.
    """
    from ..starter import draft_job

    if labels is not None and json_schema is not None:
        raise JobError("give one of --labels and --json-schema")
    job_path = job_path or Path(f"{input_path.stem}.toml")
    if job_path.exists():
        raise JobError(f"{job_path} exists already: init never overwrites a file (-o names another)")
    text = draft_job(
        input_path,
        job_path,
        labels=labels,
        json_schema=json_schema,
        provider=provider,
        model=model,
        encoding=encoding,
        notes=option_notes(),
    )
    made = make_folders(job_path, "-o")
    try:
        with open(job_path, "x", encoding="utf-8") as fh:
            fh.write(text)
    except FileExistsError:
        raise JobError(
            f"{job_path} exists already: init never overwrites a file (-o names another)"
        ) from None
    except OSError as exc:
        raise JobError(f"{job_path}: cannot write the job file: {exc.strerror}") from None
    if made is not None:
        click.echo(f"warning: {made_note(made, job_path)}", err=True)
    click.echo(f"wrote {job_path}; next: batchllm validate {job_path}")
    return 0
