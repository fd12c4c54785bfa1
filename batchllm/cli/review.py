"""`batchllm review`: rows of a labeling output in front of people (Label Studio), and back."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import click
import orjson

from . import CONTEXT, cli, handles_errors


@cli.group(
    "review",
    context_settings=CONTEXT,
    epilog="Example:\n\n  batchllm review export out/reviews_sentiment.parquet --pick random:40 --pick uncertain:20 -o out/tasks.json",
)
def review_group() -> None:
    """Human review of model labels: pick the rows worth a look, as Label Studio tasks."""


@review_group.command(
    "export",
    context_settings=CONTEXT,
    epilog="Example:\n\n  batchllm review export out/reviews_sentiment.parquet --pick random:40 --pick uncertain:20 -o out/tasks.json",
)
@click.argument("output", type=click.Path(path_type=Path))
@click.option(
    "--pick",
    "picks",
    multiple=True,
    required=True,
    help="random:N (a seeded sample: the basis of an accuracy estimate), uncertain:N (invalid, "
    "disagreeing, re-asked rows), label:L:N; repeat to mix (picks never overlap).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random picks.")
@click.option(
    "-o",
    "--out",
    "target",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The tasks file (Label Studio JSON); the labeling config is written beside it (.xml).",
)
@handles_errors
def review_export_cmd(output: Path, picks: tuple[str, ...], seed: int, target: Path) -> int:
    """Write the picked rows of OUTPUT as Label Studio tasks, the model's answers pre-filled."""
    from ..engine.runner import write_atomic
    from ..review.export import export_tasks
    from ..review.picks import parse_pick

    tasks, config = export_tasks(output, [parse_pick(p) for p in picks], seed)
    config_path = target.with_suffix(".label_config.xml")
    write_atomic(target, orjson.dumps(tasks, option=orjson.OPT_INDENT_2))
    write_atomic(config_path, config.encode())
    why = Counter(t["data"]["pick"].split(":")[0] for t in tasks)
    shown = ", ".join(f"{n:,} {k}" for k, n in why.items()) or "none"
    click.echo(f"wrote {len(tasks):,} tasks ({shown}) to {target}; labeling config: {config_path}")
    return 0
