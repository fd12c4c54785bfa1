"""`batchllm review`: rows of a labeling output in front of people (Label Studio), and back."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import click
import orjson

from . import CONTEXT, cli, handles_errors
from .help import GroupedCommand


@cli.group(
    "review",
    context_settings=CONTEXT,
    epilog="Example:\n\n  batchllm review export out/reviews_sentiment.parquet --pick random:40 --pick uncertain:20 -o out/tasks.json",
)
def review_group() -> None:
    """Human review of model labels: pick the rows worth a look, as Label Studio tasks."""


@review_group.command(
    "export",
    cls=GroupedCommand,
    help_groups=(("Which rows", ("picks", "seed")), ("Where they go", ("target", "url", "project"))),
    context_settings=CONTEXT,
    epilog="Example:\n\n  batchllm review export out/reviews_sentiment.parquet --pick random:40 --pick uncertain:20 -o out/tasks.json",
)
@click.argument("output", type=click.Path(path_type=Path))
@click.option(
    "--pick",
    "picks",
    multiple=True,
    required=True,
    help="random:N (a seeded sample: the basis of an accuracy estimate), uncertain:N (invalid rows, "
    "then the least confident, or else disagreeing and re-asked rows), below:P:N (a sample of rows "
    "with a confidence below P), label:L:N; repeat to mix (picks never overlap).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random picks.")
@click.option(
    "-o",
    "--out",
    "target",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The tasks file (Label Studio JSON); the labeling config is written beside it (.xml).",
)
@click.option(
    "--to", "url", help="A Label Studio URL: the tasks go to --project there (key in LABEL_STUDIO_API_KEY)."
)
@click.option("--project", help="With --to: the project's title (created with the config when missing).")
@handles_errors
def review_export_cmd(
    output: Path, picks: tuple[str, ...], seed: int, target: Path | None, url: str | None, project: str | None
) -> int:
    """Put the picked rows of OUTPUT in front of reviewers: Label Studio tasks, the model's answers
    pre-filled, to a file (-o) or a Label Studio project (--to URL --project NAME)."""
    from ..errors import JobError
    from ..folders import write_atomic
    from ..review.export import export_tasks, send_tasks
    from ..review.picks import parse_pick

    if target is None and url is None:
        raise JobError("say where the tasks go: -o tasks.json, or --to URL --project NAME")
    if url is not None and not project:
        raise JobError("--to needs --project NAME: the Label Studio project the tasks go to")
    tasks, config, short = export_tasks(output, [parse_pick(p) for p in picks], seed)
    for line in short:
        click.echo(f"warning: {line}", err=True)
    why = Counter(t["data"]["pick"].split(":")[0] for t in tasks)
    shown = ", ".join(f"{n:,} {k}" for k, n in why.items()) or "none"
    if target is not None:
        config_path = target.with_suffix(".label_config.xml")
        write_atomic(target, orjson.dumps(tasks, option=orjson.OPT_INDENT_2), "-o")
        write_atomic(config_path, config.encode(), "-o")
        click.echo(f"wrote {len(tasks):,} tasks ({shown}) to {target}; labeling config: {config_path}")
    if url is not None:
        assert project is not None
        sent, held = send_tasks(url, project, tasks, config)
        click.echo(
            f"sent {sent:,} tasks ({shown} picked) to project {project!r} at {url.rstrip('/')}"
            + (f"; {held:,} it held already were left alone" if held else "")
        )
    return 0


@review_group.command(
    "import",
    cls=GroupedCommand,
    help_groups=(("Where verdicts come from", ("source", "project")),),
    context_settings=CONTEXT,
    epilog="Example:\n\n  batchllm review import out/reviews_sentiment.parquet --from export.json",
)
@click.argument("output", type=click.Path(path_type=Path))
@click.option(
    "--from",
    "source",
    required=True,
    help="A Label Studio JSON export file, or the Label Studio URL (with --project).",
)
@click.option("--project", help="With --from URL: the project's title.")
@handles_errors
def review_import_cmd(output: Path, source: str, project: str | None) -> int:
    """Bring reviewers' verdicts home: review_label (or review_<field>), reviewer, reviewed_at,
    and label_final, the reviewed value where there is one; kept across later runs."""
    from ..review.importing import import_verdicts

    done = import_verdicts(output, source, project)
    click.echo(
        f"imported {done.verdicts:,} verdicts ({done.changed:,} new or changed); {done.reviewed:,} rows of "
        f"{output} are reviewed"
        + (f"; labels outside the set, kept: {', '.join(done.outside)}" if done.outside else "")
    )
    return 0
