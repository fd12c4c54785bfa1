"""The job: every setting of a run, its default and its allowed range, validated once.

A job comes from flags, from a TOML job file (``jobs/*.toml``), or both (flags win). Either way it
passes through ``build_job``, the one place that knows types and defaults, so the CLI, job files
and library users get the same checks and the same messages. Each message names where the value
came from (``--temperature`` or ``jobs/x.toml: key 'temperature'``) and what is allowed.

Sampling parameters and their ranges are the provider's (providers/): ``build_job`` asks the
chosen provider to parse each one, so a request is never sent with a value the API would reject
as a whole batch of 400s, and a parameter the provider does not take is a usage error.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from . import sniff
from .errors import JobError
from .fleet import FleetEndpoint, dearest, parse_deadline
from .folders import folders_to_make
from .job_keys import PARSERS, SAMPLING_KEYS, check_endpoint
from .job_labeling import check_structured_on, confidence_mode
from .jsonl_rows import is_request_file
from .labeling.spec import Labeling, labeling_from
from .notify import notify_url
from .pricing import Prices, cached_price_problem
from .providers import DEFAULT_PROVIDER, PROVIDERS, Provider, get_provider
from .sniff import read_text

DEFAULT_MODEL = "meta/llama-3.1-70b-instruct"
# 300 requests/min x 15-25 s per reply (docs/api.md) needs ~100 in flight; a little headroom.
DEFAULT_CONCURRENCY = 128
# Replies of 512 tokens take 15-25 s, more under load; 120 s is the contract's upper figure.
DEFAULT_TIMEOUT = 120.0
DEFAULT_MAX_ATTEMPTS = 6


@dataclass(frozen=True, slots=True)
class Job:
    """Everything a run needs. Construct it with ``build_job`` so it is validated."""

    input: Path
    output: Path
    input_format: str | None = None
    prompt_column: str = "prompt"
    template: str | None = None
    system: str | None = None
    id_column: str | None = None
    provider: str = DEFAULT_PROVIDER
    model: str = DEFAULT_MODEL
    model_given: bool = field(default=False, compare=False)  # named by the user, not the default
    max_tokens: int = 256
    sampling: Mapping[str, Any] = field(default_factory=dict)  # validated by the provider
    extra_body: Mapping[str, Any] | None = None  # passed through as is (openai provider)
    prices: Prices | None = None  # --input-price/--output-price: win over the model table's
    cached_input_price: Decimal | None = None  # --cached-input-price: wins over either's
    endpoint: str = ""  # the provider's default (or its environment variable) when not given
    api_key_env: str | None = None  # the provider's own variable when not given
    api_key_file: Path | None = None
    sandbox: bool = False
    concurrency: int = DEFAULT_CONCURRENCY
    warmup: bool = True  # one request per cacheable prompt prefix before the rest (engine/warmup.py)
    rpm: int | None = None  # None: auto (adaptive, no ceiling); 0: off
    tpm: int | None = None  # None or 0: off
    delimiter: str = ","  # CSV field separator
    encoding: str | None = None  # of a CSV or JSONL input; None: UTF-8 (a byte-order mark wins)
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    timeout: float = DEFAULT_TIMEOUT
    max_error_rate: float = 0.5
    error_window: int = 100
    max_cost_pico: int | None = None
    max_cost_per_run_pico: int | None = None
    max_cost_per_month_pico: int | None = None  # the job's calendar month (UTC), from the ledger
    max_runtime: float | None = None
    grace: float = 10.0
    checkpoint: Path | None = None
    retry_errors: bool = False
    restart: bool = False
    refresh_changed: bool = False
    labeling: Labeling | None = None  # --labels / --labels-file / --json-schema, with re-asks, samples
    # A labeling job's response_format (auto: where the provider takes it; labeling/structured.py).
    # Not a request setting: a journal is resumed under any value, as the replies read alike.
    structured: str = "auto"
    examples: Path | None = None  # few-shot turns (prompts.load_examples)
    examples_digest: str | None = None
    reparse: bool = False
    cache: str = "auto"  # off, auto (temperature 0 or a seed), always
    cache_dir: Path | None = None  # the user's cache directory when not given
    log_format: str = "text"
    summary_json: Path | None = None
    notify: str | None = field(default=None, repr=False)  # a URL to POST the summary to (notify.py)
    ledger: str | None = None  # the ledger file, or "off"; None: BATCHLLM_LEDGER or the default
    progress: str = "auto"
    fleet: tuple[FleetEndpoint, ...] | None = None  # several endpoints (--fleet, fleet.py)
    deadline: str | None = None  # with a fleet: a duration or a clock time (reports/fleet_plan.py)
    engine: str = "local"  # or "ray": the same job on Ray Data (batchllm/cluster/)
    ray_address: str | None = None  # an existing Ray cluster; None starts a local one
    actors: int = 2  # Ray actors sending requests
    job_file: Path | None = field(default=None, compare=False)

    @property
    def journal_dir(self) -> Path:
        if self.checkpoint is not None:
            return self.checkpoint
        return self.output.with_name(self.output.name + ".batchllm")

    @property
    def budgeted(self) -> bool:
        """Is spending capped (``--max-cost``, ``--max-cost-per-run`` or ``--max-cost-per-month``)?"""
        return (
            self.max_cost_pico is not None
            or self.max_cost_per_run_pico is not None
            or self.max_cost_per_month_pico is not None
        )

    @property
    def name(self) -> str:
        """The job's name in the ledger: the job file's stem, else the output's."""
        return (self.job_file or self.output).stem or self.output.name

    @property
    def full_system(self) -> str | None:
        """The system prompt sent: the job's, then the labeling instruction."""
        if self.labeling is None:
            return self.system
        instruction = self.labeling.instruction()
        return instruction if not self.system else f"{self.system}\n\n{instruction}"

    @property
    def structured_output(self) -> bool:
        """Do this job's requests carry a ``response_format`` (labeling/structured.py)?"""
        if self.labeling is None or self.structured == "off":
            return False
        if self.extra_body and "response_format" in self.extra_body:
            return False  # the job file's own, sent as it is
        # A fleet's requests go to its endpoints, each taking it or not (engine/router.py).
        providers = {e.provider for e in self.fleet} if self.fleet else {self.provider}
        return any(get_provider(name).takes_response_format for name in providers)

    @property
    def logprobs(self) -> bool:
        """Do this job's requests ask for logprobs (a labeling row's confidence, labeling/confidence.py)?"""
        return self.labeling is not None and self.labeling.confidence == "logprobs"

    @property
    def logprobs_insisted(self) -> bool:
        """Does a server refusing logprobs stop the run (``--confidence logprobs``, not auto)?"""
        return self.labeling is not None and self.labeling.logprobs_insisted and self.logprobs

    @property
    def key_env(self) -> str:
        return self.api_key_env or get_provider(self.provider).key_env

    def params(self) -> dict[str, Any]:
        """The parameters sent with every request, in the provider's order, unset ones left out."""
        out: dict[str, Any] = {}
        for name in get_provider(self.provider).params:
            value = self.max_tokens if name == "max_tokens" else self.sampling.get(name)
            if value is not None:
                out[name] = value
        if self.extra_body:
            out.update(self.extra_body)
        return out

    def request_settings(self) -> dict[str, Any]:
        """What shapes a request: a journal written with other values cannot be resumed."""
        prompt = {"template": self.template} if self.template else {"prompt_column": self.prompt_column}
        settings: dict[str, Any] = {
            "model": self.model,
            "system": self.system,
            **prompt,
            "params": self.params(),
        }
        if self.provider != DEFAULT_PROVIDER:
            # Journals written before providers existed were Dataoorts': they still resume.
            settings["provider"] = self.provider
        if self.labeling is not None:
            settings["labeling"] = self.labeling.settings()
        if self.examples_digest is not None:
            settings["examples"] = self.examples_digest
        if self.sandbox:
            # Emulated replies must never pass for real ones: a real run refuses such a journal.
            settings["sandbox"] = True
        return settings


def build_job(
    values: Mapping[str, Any],
    *,
    job_file: Path | None = None,
    flag_names: frozenset[str] = frozenset(),
    environ: Mapping[str, str] | None = None,
    partial: bool = False,
) -> Job:
    """Validate raw values (from a job file and/or flags) into a ``Job``.

    ``flag_names`` are the keys that came from the command line, so that a message names the flag
    (``--top-k``) rather than the job file's key. ``partial`` checks only the values given, one
    at a time (``job_file_problems``), and builds nothing.
    """
    environ = os.environ if environ is None else environ

    def where(key: str) -> str:
        if key in flag_names or job_file is None:
            return f"--{key.replace('_', '-')}"
        return f"{job_file}: key '{key}'"

    kwargs: dict[str, Any] = {}
    for key, raw in values.items():
        if raw is None:
            continue
        try:
            attr, parse = PARSERS[key]
        except KeyError:
            raise JobError(f"unknown setting {key!r}") from None
        try:
            kwargs[attr] = parse(raw)
        except ValueError as exc:
            shown = repr(raw)
            got = "" if shown in str(exc) or str(raw) in str(exc) else f" (got {shown})"
            # Several problems at once (a fleet file's): each line names where it is.
            raise JobError("\n".join(f"{where(key)} {line}" for line in f"{exc}{got}".splitlines())) from None
    if partial:
        if "cache" in kwargs:
            _cache_setting(kwargs["cache"], where)
        if set(SAMPLING_KEYS) & set(kwargs):
            _sampling_params(get_provider(kwargs.get("provider", DEFAULT_PROVIDER)), dict(kwargs), where)
        return None  # type: ignore[return-value]

    provider = get_provider(kwargs.get("provider", DEFAULT_PROVIDER))
    kwargs["sampling"] = _sampling_params(provider, kwargs, where)
    if "extra_body" in kwargs and provider.name == DEFAULT_PROVIDER:
        raise JobError(
            f"{where('extra_body')}: the {provider.name} provider takes only its documented "
            f"parameters ({', '.join(provider.params)})"
        )
    kwargs["prices"] = _prices(
        kwargs.pop("input_price", None),
        kwargs.pop("output_price", None),
        where,
        kwargs.get("cached_input_price"),
    )
    if (cached := kwargs.get("cached_input_price")) is not None and (
        problem := cached_price_problem(
            cached, kwargs["prices"], provider.name, kwargs.get("model", DEFAULT_MODEL)
        )
    ):
        raise JobError(f"{where('cached_input_price')} {problem}")
    if kwargs["prices"] is None and kwargs.get("fleet"):
        # Worst cases (--max-cost, estimate) at the dearest endpoint's prices: any may answer.
        # A row's cost is its own endpoint's (engine/router.py).
        kwargs["prices"] = dearest(kwargs["fleet"])
    kwargs["labeling"] = labeling_from(kwargs, where)
    if kwargs["labeling"] is not None:
        kwargs["labeling"] = confidence_mode(kwargs["labeling"], provider, kwargs.get("fleet"), where)
    if kwargs.get("structured") == "on":
        check_structured_on(kwargs, provider, where("structured"))
    if "examples" in kwargs:
        if kwargs["labeling"] is None:
            raise JobError(f"{where('examples')}: few-shot examples go with --labels or --json-schema")
        try:
            kwargs["examples_digest"] = hashlib.blake2b(
                kwargs["examples"].read_bytes(), digest_size=8
            ).hexdigest()
        except OSError as exc:
            raise JobError(f"{where('examples')} {kwargs['examples']}: {exc.strerror}") from None
    if kwargs.get("cache") is not None:
        kwargs["cache"], cache_dir = _cache_setting(kwargs["cache"], where)
        if cache_dir is not None:
            kwargs["cache_dir"] = cache_dir
    if kwargs.get("reparse") and kwargs["labeling"] is None:
        raise JobError(f"{where('reparse')}: re-reading stored replies needs --labels or --json-schema")

    for key, what in (("template", "template"), ("system", "system prompt")):
        if values.get(key) is not None and values.get(f"{key}_file") is not None:
            flags = {key, f"{key}_file"} & flag_names  # a flag stands over the job file's other key
            if len(flags) != 1:
                both = (
                    f"give --{key} or --{key}-file"
                    if flags
                    else f"{job_file}: give key '{key}' or '{key}_file'"
                )
                raise JobError(f"{both}, not both")
            if key in flags:
                kwargs[key] = PARSERS[key][1](values[key])
                continue
        if values.get(f"{key}_file") is not None:  # the text is the setting: a changed file is a change
            path = Path(values[f"{key}_file"])
            try:
                kwargs[key] = read_text(path, f"{what} file")
            except OSError as exc:
                raise JobError(f"{path}: cannot read the {what} file: {exc.strerror}") from None
            if not kwargs[key].strip():
                raise JobError(f"{path}: the {what} file is empty")
    for key in ("input", "output"):
        if key not in kwargs:
            raise JobError(f"missing {where(key)}: say which file to {'read' if key == 'input' else 'write'}")
    if "notify" in kwargs:
        kwargs["notify"] = notify_url(kwargs["notify"], where("notify"), environ)
    if kwargs.get("deadline") is not None and kwargs.get("fleet") is None:
        raise JobError(f"{where('deadline')} goes with --fleet: it plans a fleet's endpoints")
    if kwargs.get("deadline") is not None and kwargs.get("engine") not in (None, "local"):
        raise JobError(
            f"{where('deadline')}: the plan paces the rows left on one machine; use the local engine"
        )
    if kwargs.get("deadline") is not None:
        parse_deadline(kwargs["deadline"])  # refused here, before the run says it starts
    if "endpoint" not in kwargs:
        kwargs["endpoint"] = environ.get(provider.endpoint_env) or provider.default_endpoint
    kwargs["endpoint"] = check_endpoint(kwargs["endpoint"])
    if kwargs.get("engine", "local") == "local":
        if kwargs["output"].suffix.lower() != ".parquet":
            raise JobError(f"{where('output')}: {kwargs['output']} must end in .parquet")
        if kwargs["output"].is_dir():
            raise JobError(f"{where('output')}: {kwargs['output']} is a directory")
        for key in ("ray_address", "actors"):
            if key in kwargs:
                raise JobError(f"{where(key)} goes with --engine ray")
    folders_to_make(kwargs["output"], where("output"))  # made by the command that writes it
    if kwargs.get("summary_json") is not None:  # refused before the run, not after it
        folders_to_make(kwargs["summary_json"], where("summary_json"))
    limit = provider.max_content_chars
    if limit is not None and kwargs.get("system") is not None and len(kwargs["system"]) > limit:
        flag = "system_file" if "system_file" in values else "system"
        raise JobError(f"{where(flag)}: the system prompt is over {limit:,} characters")
    kwargs.setdefault("max_tokens", provider.default_max_tokens)
    kwargs["model_given"] = "model" in kwargs
    if _is_request_file(kwargs):
        for key in ("template", "system", "prompt_column", "id_column"):
            if key in kwargs:
                flag = f"{key}_file" if f"{key}_file" in values else key
                raise JobError(
                    f"{where(flag)}: {kwargs['input']} is a request file: its lines carry their own "
                    "messages and custom_ids"
                )
    return Job(job_file=job_file, **kwargs)


CACHE_POLICIES = ("off", "auto", "always")


def _cache_setting(value: str, where: Callable[[str], str]) -> tuple[str, Path | None]:
    """``--cache``: a policy, or a folder (a path with a ``/``, or a directory that exists); any
    other word is a typo, not a folder to create."""
    if value in CACHE_POLICIES:
        return value, None
    path = Path(value).expanduser()
    if "/" in value or os.sep in value or path.is_dir():
        return "auto", path
    raise JobError(
        f"{where('cache')} must be off, auto, always or a folder (a path with a '/', or an existing "
        f"directory), got {value!r}"
    )


def _is_request_file(kwargs: Mapping[str, Any]) -> bool:
    """A JSON Lines input of batch requests, not of rows (jsonl_rows.py: its first line says)."""
    fmt, path = kwargs.get("input_format"), kwargs["input"]
    if not (fmt == "jsonl" or (fmt is None and path.suffix.lower() in (".jsonl", ".ndjson"))):
        return False
    if not path.is_file():
        return True  # the input's own check names what is wrong
    return is_request_file(path, sniff.encoding_of(path, kwargs.get("encoding")))


def _sampling_params(
    provider: Provider, kwargs: dict[str, Any], where: Callable[[str], str]
) -> dict[str, Any]:
    """The sampling parameters given, parsed by the provider's own ranges."""
    out: dict[str, Any] = {}
    for key in SAMPLING_KEYS:
        raw = kwargs.pop(key, None)
        if raw is None:
            continue
        parse = provider.params.get(key)
        if parse is None:
            others = [p.name for p in map(get_provider, PROVIDERS) if key in p.params]
            hint = f" (it is a parameter of: {', '.join(others)})" if others else ""
            if provider.name != DEFAULT_PROVIDER:
                hint += "; pass server-specific fields in the job file's [extra_body] table"
            raise JobError(f"{where(key)}: not a parameter of the {provider.name} provider{hint}")
        try:
            out[key] = parse(raw)
        except ValueError as exc:
            raise JobError(f"{where(key)} {exc}") from None
    return out


def _prices(inp: Any, out: Any, where: Callable[[str], str], cached: Decimal | None = None) -> Prices | None:
    if inp is None and out is None:
        return None
    if inp is None or out is None:
        missing = "input_price" if inp is None else "output_price"
        raise JobError(f"{where(missing)} is missing: give --input-price and --output-price together")
    return Prices(inp, out, cached)
