"""The checks a run makes before it sends anything, whichever engine runs it: one home.

    prepare(job) -> Prepared        the local engine's: the input read (format, encoding, rows),
                                    its columns and ids, the model and its prices, the examples
    check_model(job, provider)      the model is known, and its window and prices fit the job
    check_columns(job, columns, w)  a prompt can be built, and no input column takes the name of
                                    an output or labeling column (also the Ray engine's, and
                                    ``cluster.complete``'s for a dataset's columns)

Every failure is a ``JobError`` (exit 2) naming the file, column or flag, raised before a key is
looked up or a request leaves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import JobError
from ..inputs import InputFile
from ..job import Job
from ..labeling.spec import Labeling
from ..pricing import Model, resolve_model
from ..prompts import Builder, PromptBuilder, RequestMaker, load_examples
from ..providers import Provider, get_provider
from ..records import Message
from ..review.verdicts import review_fields
from .output import ENDPOINT_FIELD, RESULT_NAMES


@dataclass
class Prepared:
    """Everything checked before a request may leave."""

    job: Job
    provider: Provider
    model: Model
    source: InputFile
    builder: Builder
    rows: int
    examples: tuple[Message, ...] = ()

    def maker(self) -> RequestMaker:
        return RequestMaker(self.job, self.examples)


def prepare(job: Job) -> Prepared:
    """Check the job against its provider and input: model, prices, file, columns, ids."""
    provider = get_provider(job.provider)
    if job.output.resolve() == job.input.resolve():
        raise JobError(f"-o {job.output} is the input: the output would replace it; give another -o")
    source = InputFile(job.input, job.input_format, job.delimiter, job.encoding)
    builder: Builder
    if source.format == "jsonl":
        from ..backends.openai_batch import RequestFileBuilder

        rows = source.count_rows()  # valid JSON, custom_ids present and unique
        if rows == 0:
            raise JobError(f"{job.input}: the request file has no lines")
        request_builder = RequestFileBuilder(job, provider, source)
        model_name = request_builder.check(source)
        if model_name != job.model:
            job = replace(job, model=model_name)
        builder = request_builder
    else:
        builder = PromptBuilder(job, source.columns, str(job.input), source.delimiter_hint)
        check_no_clash(source.columns, str(job.input))
        rows = source.count_rows()
        if rows == 0:
            has = "a header" if source.format == "csv" else f"columns ({', '.join(source.columns[:5])})"
            raise JobError(f"{job.input}: the file has {has} but no rows")
        builder.check_some_prompt(source.batches(builder.read_columns), rows)
        if job.id_column is not None:
            check_unique_ids(source, job.id_column)
    model = check_model(job, provider)
    check_labeling_clash(job.labeling, source.output_columns, str(job.input))
    return Prepared(job, provider, model, source, builder, rows, load_examples(job))


def check_model(job: Job, provider: Provider) -> Model:
    """The job's model and prices, checked against its max_tokens and budget."""
    model = resolve_model(
        provider.name,
        job.model,
        prices=job.prices,
        unlisted_ok=provider.unlisted_models,
        cached_input_price=job.cached_input_price,
    )
    if model.context_window is not None and job.max_tokens >= model.context_window:
        raise JobError(
            f"--max-tokens {job.max_tokens} leaves no room in {model.name}'s window of "
            f"{model.context_window:,} tokens (the prompt takes some): give less than {model.context_window:,}"
        )
    if job.budgeted and model.prices is None:
        cap = next(
            (f for f, v in (("--max-cost", job.max_cost_pico), ("--max-cost-per-run", job.max_cost_per_run_pico),
                            ("--max-cost-per-month", job.max_cost_per_month_pico)) if v is not None),
            "--max-cost",
        )  # fmt: skip
        raise JobError(
            f"{cap} needs prices: {model.name!r} is not in the {provider.name} model table, so "
            "give --input-price and --output-price (USD per million tokens)"
        )
    return model


def check_labeling_clash(labeling: Labeling | None, columns: Sequence[str], source: str) -> None:
    if labeling is None:
        return
    # A schema field named as a column batchllm writes beside it (cost_usd, status, reasks...)
    # wrote two columns of one name: a model's "cost_usd" summed as the cost, a report that
    # could not read the file, a run that failed to write its output after paying for it.
    beside = labeling.columns()[len(labeling.fields) :]  # a schema's own columns come first
    ours = [*RESULT_NAMES, ENDPOINT_FIELD.name, *(c.name for c in beside)]
    reviews = [f.name for f in review_fields(labeling)]  # written by `review import`
    if taken := next((f.name for f in labeling.fields if f.name in ours or f.name in reviews), None):
        raise JobError(
            f"--json-schema: the field {taken!r} has the name of a column batchllm writes itself; "
            f"rename the field (batchllm's columns: {', '.join(dict.fromkeys(ours))}, and review_*)"
        )
    clash = [c.name for c in labeling.columns() if c.name in columns]
    if clash:
        raise JobError(
            f"{source}: input column {clash[0]!r} has the name of a labeling output column; rename it"
        )


def check_unique_ids(source: InputFile, column: str) -> None:
    chunks = [b.column(0).cast(pa.string()) for b in source.batches([column])]
    ids = pa.chunked_array(chunks, type=pa.string())
    if pc.count_distinct(ids, mode="all").as_py() == len(ids):
        return
    counts = pc.value_counts(ids)
    dup = next(v["values"] for v in counts.to_pylist() if v["counts"] > 1)
    first = pc.index(ids, dup).as_py()
    raise JobError(
        f"{source.path}: the --id-column {column!r} value {dup!r} appears more than once "
        f"(first at row {first + 1}); ids must be unique"
    )


def check_columns(job: Job, columns: Sequence[str], source: str) -> None:
    """Input ``columns`` a run can read: the prompt's columns there, none named as an output
    column. (The local engine builds its prompt builder itself, with a delimiter hint.)"""
    PromptBuilder(job, list(columns), source)
    check_no_clash(columns, source)
    check_labeling_clash(job.labeling, columns, source)


def check_no_clash(columns: Sequence[str], source: str) -> None:
    clash = [c for c in columns if c in RESULT_NAMES]
    if clash:
        raise JobError(
            f"{source}: input column {clash[0]!r} has the name of an output column; rename it "
            f"(output columns: {', '.join(RESULT_NAMES)})"
        )
