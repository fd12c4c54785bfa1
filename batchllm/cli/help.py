"""``--help`` in headed groups, the ones a first run needs first, for the commands with many options.

Where an option shows is one line of ``HELP_GROUPS`` (by the option's parameter name, so a new
option lands in a group by adding its name there); an option named in no group still shows, under
"Other", never vanishes. For commands that take ``--job``, each option's help also says its job-file
key and environment variable, read from the job-key table (job_keys.py), so the two cannot drift.
"""

from __future__ import annotations

from typing import Any

import click

from ..job_keys import ENVIRONMENT, JOB_KEYS, SAMPLING_KEYS

Groups = tuple[tuple[str, tuple[str, ...]], ...]

# Heading -> the parameter names under it, in the order shown. The first five are what a first
# run needs (input and output, prompt, model, labels, a cost cap): `run --help` shows them on its
# first screen (tests/test_help.py holds that).
HELP_GROUPS: Groups = (
    ("Input and output", ("job_file", "input_path", "output")),
    ("Prompt", ("template", "template_file", "system", "system_file")),
    ("Model and endpoint", ("provider", "model", "sandbox", "endpoint")),
    (
        "Money",
        (
            "max_cost",
            "max_cost_per_run",
            "max_cost_per_month",
            "input_price",
            "output_price",
            "cached_input_price",
        ),
    ),
    (
        "Labeling",
        (
            "labels",
            "labels_file",
            "json_schema",
            "structured",
            "examples",
            "reask",
            "samples",
            "adaptive",
            "confidence",
            "vote_below",
        ),
    ),
    ("Estimate", ("pilot", "from_run", "gold", "compare", "fmt")),
    ("API key", ("api_key_env", "api_key_file")),
    ("Reading the input", ("prompt_column", "id_column", "input_format", "delimiter", "encoding")),
    ("Sampling", ("max_tokens", *SAMPLING_KEYS)),
    ("Packing", ("pack", "pack_tokens")),
    (
        "Limits and pacing",
        ("concurrency", "rpm", "tpm", "max_attempts", "timeout", "max_error_rate", "error_window"),
    ),
    ("Stopping", ("max_runtime", "grace")),
    ("Fleet", ("fleet", "fleet_endpoint", "deadline")),
    ("Batch files", ("skip_done", "max_lines", "max_bytes")),
    (
        "Output and resume",
        ("checkpoint", "retry_errors", "restart", "reparse", "refresh_changed", "summary_json", "notify"),
    ),
    ("Spend ledger", ("ledger",)),
    ("Cache", ("cache", "warmup")),
    ("Logging", ("log_format", "progress")),
    ("Scale-out", ("engine", "ray_address", "actors")),
)
OTHER = "Other"
# The option column's width: narrower than click's 30 leaves the help its room on an 80-column
# terminal; the few longer option strings put their help on the next line.
_COLUMN = 22

# Parameter names that are not their job key.
_KEY_OF = {"input_path": "input"}


def job_key_note(name: str) -> str:
    """``job key: max_cost`` (and ``env: ...`` where one is read), or "" for a flag with no key."""
    key = _KEY_OF.get(name, name)
    if key not in JOB_KEYS:
        return ""
    env = ENVIRONMENT.get(key)
    return f"job key: {key}" + (f"; env: {env}" if env else "")


def _with_note(help_text: str, note: str) -> str:
    """Fold the note into the help's trailing ``[default: ...]``, or add one bracket of its own."""
    if not note:
        return help_text
    if help_text.endswith("]"):
        return f"{help_text[:-1]}; {note}]"
    return f"{help_text}  [{note}]".strip()


class GroupedCommand(click.Command):
    """A command whose ``--help`` lists options under headings: ``HELP_GROUPS``, or its own
    ``help_groups`` (``@group.command(cls=GroupedCommand, help_groups=...)``)."""

    def __init__(self, *args: Any, help_groups: Groups = HELP_GROUPS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help_groups = help_groups

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        takes_job = any(p.name == "job_file" for p in self.params)
        sections: dict[str, list[tuple[str, str]]] = {heading: [] for heading, _ in self.help_groups}
        sections[OTHER] = []
        heading_of = {name: heading for heading, names in self.help_groups for name in names}
        rows_of: dict[str, tuple[str, str]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None or param.name is None or isinstance(param, click.Argument):
                continue
            opts, help_text = record
            if takes_job:
                help_text = _with_note(help_text, job_key_note(param.name))
            rows_of[param.name] = (opts, help_text)
        for _, names in self.help_groups:
            for name in names:
                if name in rows_of:
                    sections[heading_of[name]].append(rows_of.pop(name))
        sections[OTHER].extend(rows_of.values())  # unplaced options and --help, in definition order
        # One first-column width for every section, as one flat list would have: write_dl sizes its
        # column from the terms it is given, so each section's first term is padded to the widest.
        shown = [rows for rows in sections.values() if rows]
        width = min(_COLUMN, max(len(opts) for rows in shown for opts, _ in rows))
        for heading, rows in sections.items():
            if rows:
                rows = [(rows[0][0].ljust(width), rows[0][1]), *rows[1:]]
                with formatter.section(heading):
                    formatter.write_dl(rows, col_max=_COLUMN)
