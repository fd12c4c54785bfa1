"""The flags shared by `run` and `estimate`, and how flags and a job file become raw job values.

Help texts name defaults and ranges as the job and the providers declare them, so ``--help``
cannot drift from what ``build_job`` enforces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from ..errors import JobError
from ..folders import made_note, make_folders
from ..job import DEFAULT_CONCURRENCY, DEFAULT_MAX_ATTEMPTS, DEFAULT_MODEL, Job
from ..job_keys import JOB_KEYS
from ..jobfile import load_job_file
from ..providers import DEFAULT_PROVIDER, PROVIDERS


def _ranges(name: str) -> str:
    """``0 to 5 (dataoorts); 0 to 2 (openai)``, from each provider's parameter table."""
    parts = []
    for provider in PROVIDERS.values():
        parse = provider.params.get(name)
        if parse is not None:
            parts.append(f"{(parse.__doc__ or '').split(' ', 1)[-1].removeprefix('from ')} ({provider.name})")
    return "; ".join(parts).strip()


def _keys() -> str:
    return "; ".join(f"{p.name}: {p.key_env}" for p in PROVIDERS.values())


# Shared by name too: `init` takes them.
ENCODING_OPTION = click.option(
    "--encoding",
    help="Text encoding of a CSV or JSONL input without a byte-order mark, e.g. latin-1, cp1252, "
    "utf-16-le.  [default: utf-8; a UTF-8/16/32 byte-order mark is followed]",
)
PROVIDER_OPTION = click.option(
    "--provider",
    type=click.Choice(list(PROVIDERS)),
    help=f"The API to speak: dataoorts, or openai for any OpenAI-compatible server.  [default: {DEFAULT_PROVIDER}]",
)


def _model_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Shell completion of --model: the models table's names (the --provider's, if given)."""
    from ..pricing import load_models

    names = {m.name for m in load_models(ctx.params.get("provider")).values()}
    return sorted(n for n in names if n.startswith(incomplete))


MODEL_OPTION = click.option(
    "--model",
    shell_complete=_model_names,
    help=f"Model name (see `batchllm models`).  [default: {DEFAULT_MODEL}]",
)
LABELS_OPTION = click.option(
    "--labels", help='Label set, e.g. "positive,negative,neutral": each reply read into a label column.'
)
JSON_SCHEMA_OPTION = click.option(
    "--json-schema",
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSON Schema object file: each property becomes a typed column.",
)

PROMPT_OPTIONS = [
    click.option(
        "--input-format",
        type=click.Choice(["csv", "parquet", "jsonl"]),
        help="Input format, when the extension does not say.",
    ),
    click.option("--delimiter", help="CSV field separator: one character, or tab.  [default: ,]"),
    ENCODING_OPTION,
    click.option("--prompt-column", help="Column holding the prompt text.  [default: prompt]"),
    click.option("--template", help='Prompt template filled from columns, e.g. "Classify: {review}".'),
    click.option(
        "--template-file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Read the template from a file.",
    ),
    click.option("--system", help="System prompt sent with every row."),
    click.option(
        "--system-file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Read the system prompt from a file (a long instruction: resume lines stay short).",
    ),
    PROVIDER_OPTION,
    MODEL_OPTION,
    click.option("--max-tokens", type=int, help="Most completion tokens per row.  [default: 256]"),
    click.option(
        "--input-price",
        metavar="USD",
        help="USD per million input tokens (a model not in the table, or your own price).",
    ),
    click.option(
        "--output-price", metavar="USD", help="USD per million output tokens (give with --input-price)."
    ),
    click.option(
        "--cached-input-price",
        metavar="USD",
        help="USD per million prompt tokens served from the server's prompt cache.  [default: the model "
        "table's, else the input price]",
    ),
    LABELS_OPTION,
    click.option(
        "--labels-file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Labels one a line, optionally 'label: description'.",
    ),
    JSON_SCHEMA_OPTION,
    click.option(
        "--reask", type=int, help="Re-asks for a reply that does not validate (0 to 10).  [default: 1]"
    ),
    click.option(
        "--samples",
        type=int,
        help="Ask N times with distinct seeds; the label is the majority.  [default: 1]",
    ),
    click.option(
        "--adaptive", is_flag=True, default=None, help="With --samples: stop once the majority cannot change."
    ),
    click.option(
        "--pack",
        help="Rows per request (1 to 100), answered as one JSON object; each row still checked, "
        "re-asked and costed on its own (estimate --pilot: several sizes, e.g. 1,5,10,20).  [default: 1]",
    ),
    click.option(
        "--pack-tokens",
        type=int,
        help="Most tokens (prompt + reply) a packed request may take.  [default: the model's window]",
    ),
    click.option(
        "--structured",
        type=click.Choice(["auto", "on", "off"]),
        help="Send the label set or schema as a JSON schema (response_format) the server holds "
        "replies to; auto: with the openai provider, off for the run if the server refuses it; on: "
        "the run stops (exit 4) if the server refuses it.  "
        "[default: auto]",
    ),
    click.option(
        "--confidence",
        type=click.Choice(["auto", "logprobs", "votes", "off"]),
        help="A confidence column: the probability the model gave its label (logprobs), or the "
        "label's share of --samples votes; auto: logprobs with the openai provider (none for the run "
        "if the server refuses them), else votes with --samples; logprobs: the run stops (exit 4) "
        "if the server refuses them.  [default: auto]",
    ),
    click.option(
        "--vote-below",
        type=float,
        help="With --samples N: ask the other N-1 samples only for rows whose first answer's "
        "confidence is below this (0 to 1).",
    ),
    click.option(
        "--examples",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Few-shot examples (CSV/Parquet with the template's columns and a label column).",
    ),
]

JOB_OPTION = click.option(
    "--job",
    "job_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="TOML job file (see jobs/); flags override it.",
)

# What shapes the requests: shared by run, estimate, export-batch and import-batch.
REQUEST_OPTIONS = [
    *PROMPT_OPTIONS,
    click.option("--id-column", help="Column with a stable, unique id per row (enables incremental runs)."),
    click.option("--temperature", type=float, help=_ranges("temperature") + "."),
    click.option("--top-p", type=float, help=_ranges("top_p") + "."),
    click.option("--top-k", type=int, help=_ranges("top_k") + "."),
    click.option("--seed", type=int, help=_ranges("seed") + "."),
    click.option("--repetition-penalty", type=float, help=_ranges("repetition_penalty") + "."),
    click.option("--frequency-penalty", type=float, help=_ranges("frequency_penalty") + "."),
    click.option("--presence-penalty", type=float, help=_ranges("presence_penalty") + "."),
    click.option("--stop", multiple=True, help="A stop sequence; repeat for up to 4 (openai)."),
]

FLEET_OPTION = click.option(
    "--fleet",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A fleet file ([[endpoint]] tables: several endpoints of one model, each with its limit and "
    "price): a run sends each request to the cheapest endpoint with room, estimate plans it, a batch "
    "file goes to one of them (--fleet-endpoint, else the cheapest that takes batch files).",
)

# How a live run sends: run and estimate (a pilot) only.
SEND_OPTIONS = [
    click.option(
        "--endpoint",
        help="API URL; for openai the base URL, e.g. http://127.0.0.1:8000/v1.  [default: the provider's]",
    ),
    click.option("--api-key-env", help=f"Environment variable holding the key.  [default: {_keys()}]"),
    click.option(
        "--api-key-file", type=click.Path(dir_okay=False, path_type=Path), help="Read the key from this file."
    ),
    click.option(
        "--sandbox", is_flag=True, default=None, help="Use the built-in emulator: no key, no network."
    ),
    click.option(
        "--concurrency", type=int, help=f"Requests in flight at most.  [default: {DEFAULT_CONCURRENCY}]"
    ),
    click.option(
        "--rpm", help="Requests/min: a number (hard ceiling), 0 (off), or auto (adaptive).  [default: auto]"
    ),
    click.option(
        "--tpm", type=int, help="Tokens/min (prompt + max_tokens reserved per request); 0 or unset: off."
    ),
    click.option(
        "--warmup/--no-warmup",
        default=None,
        help="Rows sharing a prompt prefix the server can cache wait for the first one's answer, so "
        "they are served from the prompt cache.  [default: warmup]",
    ),
    click.option(
        "--max-attempts",
        type=int,
        help=f"Attempts per row for transient failures.  [default: {DEFAULT_MAX_ATTEMPTS}]",
    ),
    click.option("--timeout", type=float, help="Seconds per request.  [default: 120]"),
    click.option(
        "--max-error-rate",
        type=float,
        help="Stop when this share of the last --error-window rows failed or were invalid.  [default: 0.5]",
    ),
    click.option("--error-window", type=int, help="Rows in the error-rate window.  [default: 100]"),
    click.option(
        "--max-cost",
        metavar="USD",
        help="Dollar cap on what this output may cost in all (exit 3 when reached).",
    ),
    click.option(
        "--max-cost-per-run",
        metavar="USD",
        help="Dollar cap on what this run may spend (exit 3 when reached).",
    ),
    click.option(
        "--max-cost-per-month",
        metavar="USD",
        help="Dollar cap on what this job (the job file's name, else the output's) spends in a calendar "
        "month (UTC), across its runs, from the ledger (exit 3 when reached).",
    ),
    FLEET_OPTION,
    click.option(
        "--deadline",
        help="With --fleet: end by then at the least cost (pricier endpoints only as much as needed): "
        "a duration (6h) or a clock time (06:00).",
    ),
    click.option("--max-runtime", help="Stop dispatching after this long, e.g. 50m (exit 75)."),
    click.option(
        "--grace", type=float, help="Seconds in-flight requests get to finish on a stop.  [default: 10]"
    ),
]

CHECKPOINT_OPTION = click.option(
    "--checkpoint",
    type=click.Path(file_okay=False, path_type=Path),
    help="Journal folder.  [default: OUTPUT.batchllm/]",
)

RESTART_OPTION = click.option(
    "--restart", is_flag=True, default=None, help="Discard the journal and start over."
)

JOURNAL_OPTIONS = [
    click.option(
        "--retry-errors", is_flag=True, default=None, help="Send rows that failed in an earlier run again."
    ),
    RESTART_OPTION,
    click.option(
        "--cache",
        help="Response cache: auto (temperature 0 or a seed), always, off, or a folder.  "
        "[default: auto in $XDG_CACHE_HOME/batchllm]",
    ),
    click.option(
        "--reparse",
        is_flag=True,
        default=None,
        help="Read stored replies again under a changed label set or schema; send nothing.",
    ),
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
    click.option(
        "--notify",
        help="POST the summary JSON to this URL (or the environment variable named) when the run ends, "
        "whatever its exit code; {exit_code} in the URL is replaced.",
    ),
]

LEDGER_OPTION = click.option(
    "--ledger",
    help="The spend ledger (SQLite), or off.  [default: $XDG_DATA_HOME/batchllm/ledger.db]",
)

RUN_OPTIONS = [
    JOB_OPTION,
    click.option(
        "-o",
        "--output",
        type=click.Path(path_type=Path),
        help="Output Parquet file (with --engine ray: a directory of Parquet files).",
    ),
    *REQUEST_OPTIONS,
    *SEND_OPTIONS,
    CHECKPOINT_OPTION,
    *JOURNAL_OPTIONS,
    LEDGER_OPTION,
]


def apply(options: list[Any]) -> Any:
    def decorate(f: Any) -> Any:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def collect(
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
            if name == "stop" and not value:
                continue
            given.add(name)
            values[name] = (
                str(value) if isinstance(value, Path) else (list(value) if name == "stop" else value)
            )
    if input_path is not None:
        if input_path.suffix.lower() == ".toml" and job_file is None:  # the job file as the input
            raise JobError(f"{input_path} is a job file: give it with --job {input_path}")
        values["input"] = str(input_path)
        given.add("input")
    return values, job_file, frozenset(given)


def make_output_folder(job: Job, path: Path | None = None) -> None:
    """Make the folders the output (or ``path``) needs, and say which (folders.py decides)."""
    made = make_folders(path or job.output, "--output")
    if made is None:
        return
    note = made_note(made, path or job.output)
    if job.log_format == "json":
        from .progress import JsonReporter

        JsonReporter().warning(note)
    else:
        click.echo(f"warning: {note}", err=True)
