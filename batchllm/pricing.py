"""Models and prices as data, and the one function that turns a usage into money.

Money never touches a float until it is stored. A price of $P per million tokens is P * 10**6
picodollars (1e-12 USD) per token, an integer as long as P has at most six decimal places (checked
when a price is read). Costs are integers in picodollars, so sums over a million rows are exact;
``to_usd`` turns one into a float64 only for the Parquet column, and ``format_usd`` into text.

``cost`` is the only place a cost is computed: the dispatcher books replies with it, ``estimate``
prices prompts with it, and ``report`` recomputes totals with it. A model without a price (an
unlisted model on an OpenAI-compatible server, run without ``--input-price``) costs None, never a
guess.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from .errors import JobError
from .sniff import read_text

# Token counts: an int, or a whole integer column (report.py prices a frame in one call).
N = TypeVar("N")

PICO_PER_USD = 10**12
_PICO_PER_TOKEN_PER_USD_PER_MILLION = 10**6


@dataclass(frozen=True, slots=True)
class Prices:
    """US dollars per million tokens, exact; per-token prices in picodollars are integers.

    ``cached_input_per_million`` is what a prompt token the server served from its prompt cache
    costs (OpenAI bills those at a discount); None: the input price, as a server that publishes
    no cached price bills them.
    """

    input_per_million: Decimal
    output_per_million: Decimal
    cached_input_per_million: Decimal | None = None
    # Per-token prices in picodollars, computed once: ``cost`` runs once per reply.
    input_pico: int = field(init=False, compare=False)
    output_pico: int = field(init=False, compare=False)
    cached_input_pico: int = field(init=False, compare=False)

    def __post_init__(self) -> None:
        cached = (
            self.input_per_million if self.cached_input_per_million is None else self.cached_input_per_million
        )
        for name, value in (
            ("input_pico", self.input_per_million),
            ("output_pico", self.output_per_million),
            ("cached_input_pico", cached),
        ):
            object.__setattr__(self, name, int(value * _PICO_PER_TOKEN_PER_USD_PER_MILLION))

    def with_cached(self, cached_input_per_million: Decimal | None) -> Prices:
        """These prices with another cached-input price (None keeps this one)."""
        if cached_input_per_million is None:
            return self
        return Prices(self.input_per_million, self.output_per_million, cached_input_per_million)

    @classmethod
    def from_dict(cls, d: dict[str, str] | None) -> Prices | None:
        """Prices as ``as_dict`` wrote them (a run summary's), or None."""
        if not d or "input_usd_per_million_tokens" not in d:
            return None
        cached = d.get("cached_input_usd_per_million_tokens")
        return cls(
            Decimal(d["input_usd_per_million_tokens"]),
            Decimal(d["output_usd_per_million_tokens"]),
            None if cached is None else Decimal(cached),
        )

    def as_dict(self) -> dict[str, str]:
        out = {
            "input_usd_per_million_tokens": str(self.input_per_million),
            "output_usd_per_million_tokens": str(self.output_per_million),
        }
        if self.cached_input_per_million is not None:
            out["cached_input_usd_per_million_tokens"] = str(self.cached_input_per_million)
        return out


@dataclass(frozen=True, slots=True)
class Model:
    """A model as one provider serves it. ``prices`` and ``context_window`` may be unknown."""

    name: str
    provider: str
    prices: Prices | None
    context_window: int | None
    batch_prices: Prices | None = None  # a batch API's discounted prices, if the provider has one
    rpm: int | None = None  # the documented rate limit of one key, where there is one
    tpm: int | None = None


def cost(
    prices: Prices | None, prompt_tokens: N, completion_tokens: N, cached_tokens: N | int = 0
) -> tuple[N | None, N | None]:
    """(input, output) cost in picodollars of a usage: exact integers, or None without prices.

    ``cached_tokens`` are the part of ``prompt_tokens`` the server served from its prompt cache,
    billed at the cached-input price. Token counts may be ints or integer arrays (int64 holds up
    to $9.2M per row).
    """
    if prices is None:
        return None, None
    input_cost = (
        prompt_tokens * prices.input_pico  # type: ignore[operator]
        - cached_tokens * (prices.input_pico - prices.cached_input_pico)  # type: ignore[operator]
    )
    return input_cost, completion_tokens * prices.output_pico  # type: ignore[operator,return-value]


def cached_saving(prices: Prices | None, cached_tokens: int) -> int:
    """Picodollars ``cached_tokens`` saved against the input price (0 without prices): the one
    place a saving is priced. A reply's is kept with its row (``Entry.cached_saved_pico``) at the
    prices it was answered at; totals add the rows' (``rows_saving``), never re-price them."""
    return 0 if prices is None else cached_tokens * (prices.input_pico - prices.cached_input_pico)


def rows_saving(kept_pico: int, unkept_tokens: int, discount_pico: int | None) -> int | None:
    """What rows' cached prompt tokens saved: the savings they kept, plus, for the cached tokens
    of rows that kept none (written before rows kept it), ``discount_pico`` a token (the cached
    price's discount now, all that is known of them); None when those need a discount unknown."""
    if not unkept_tokens:
        return kept_pico
    return None if discount_pico is None else kept_pico + unkept_tokens * discount_pico


def _price(raw: object) -> Decimal:
    """``raw`` as a price, or ``ValueError`` saying what is wrong with it (the words after it)."""
    try:
        value = Decimal(str(raw).strip().lstrip("$"))
    except InvalidOperation:
        raise ValueError("is not a number") from None
    try:  # a huge one (1e400) has no remainder Decimal can compute: refused as any bad price
        whole = value.is_finite() and value >= 0 and (value * _PICO_PER_TOKEN_PER_USD_PER_MILLION) % 1 == 0
    except InvalidOperation:
        whole = False
    if not whole or value > 10**9:  # $1,000,000,000 per million tokens: no model costs more
        raise ValueError(
            "must be from 0 to 1,000,000,000 (USD per million tokens) with at most 6 decimal places"
        )
    return value


def parse_price(raw: object, where: str) -> Decimal:
    try:
        return _price(raw)
    except ValueError as exc:
        raise JobError(f"{where}: price {raw!r} {exc}") from None


def price_value(raw: Any) -> Decimal:
    """A job's or a fleet endpoint's ``input_price``/``output_price`` (``ValueError`` if bad; the
    key names it, so the message starts at the value)."""
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise ValueError("must be a price in USD per million tokens, such as 0.31")
    try:
        return _price(raw)
    except ValueError as exc:
        raise ValueError(f"{raw!r} {exc}") from None


def load_models(provider: str | None = None, path: Path | None = None) -> dict[str, Model]:
    """The model table (the packaged ``models.toml`` unless a path is given), for one provider or all."""
    if path is None:
        text = resources.files("batchllm").joinpath("models.toml").read_text("utf-8")
        where = "batchllm/models.toml"
    else:
        try:
            text = read_text(path, "model table")
        except OSError as exc:
            raise JobError(f"{path}: cannot read the model table: {exc.strerror}") from None
        where = str(path)
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise JobError(f"{where}: {exc}") from None
    models: dict[str, Model] = {}
    for prov, section in table.items():
        if provider is not None and prov != provider:
            continue
        for name, spec in section.get("models", {}).items():
            here = f"{where} [{prov}.models.{name!r}]"
            try:
                prices = Prices(
                    parse_price(spec["input_price_per_million"], here),
                    parse_price(spec["output_price_per_million"], here),
                    _optional_price(spec, "cached_input_price_per_million", here),
                )
                window = int(spec["context_window"])
                batch = None
                if "batch_input_price_per_million" in spec:
                    batch = Prices(
                        parse_price(spec["batch_input_price_per_million"], here),
                        parse_price(spec["batch_output_price_per_million"], here),
                        _optional_price(spec, "batch_cached_input_price_per_million", here),
                    )
            except KeyError as exc:
                raise JobError(f"{here}: missing key {exc.args[0]}") from None
            key = name if provider is not None else f"{prov}:{name}"
            rpm, tpm = spec.get("requests_per_minute"), spec.get("tokens_per_minute")
            models[key] = Model(name, prov, prices, window, batch, rpm, tpm)
    return models


def _optional_price(spec: dict[str, object], key: str, where: str) -> Decimal | None:
    return parse_price(spec[key], where) if key in spec else None


def cached_price_problem(cached: Decimal, prices: Prices | None, provider: str, model: str) -> str | None:
    """Why a cached-input price cannot be (it is above the input price: the job's ``prices``,
    else the model table's), said after the flag or key; None when it can, or when there is no
    input price to compare with (``resolve_model`` says that)."""
    if prices is None:
        listed = load_models(provider).get(model)
        prices = listed.prices if listed is not None else None
    if prices is None or cached <= prices.input_per_million:
        return None
    return (
        f"{cached} is above the input price {prices.input_per_million} of {model} (USD per million "
        "tokens): a prompt token served from the cache costs at most an uncached one"
    )


def resolve_model(
    provider: str,
    name: str,
    *,
    prices: Prices | None = None,
    unlisted_ok: bool = False,
    models: dict[str, Model] | None = None,
    cached_input_price: Decimal | None = None,
) -> Model:
    """The model a job runs: the table's entry (explicit ``prices`` win), or an unlisted one.

    A provider that bills by a published table (Dataoorts) refuses unlisted models; an
    OpenAI-compatible server may serve anything, at the prices the user gives or at none.
    ``cached_input_price`` (--cached-input-price) replaces the cached price of either.
    """
    models = load_models(provider) if models is None else models
    model = models.get(name)
    if cached_input_price is not None:
        base = prices or (model.prices if model is not None else None)
        if base is None:
            raise JobError(
                f"--cached-input-price needs the input and output prices: {name!r} has none in the "
                f"{provider} model table, so give --input-price and --output-price too"
            )
        prices = base.with_cached(cached_input_price)
    if model is not None:
        return model if prices is None else replace(model, prices=prices)
    if not unlisted_ok:
        known = ", ".join(sorted(models))
        raise JobError(
            f"unknown model {name!r} for the {provider} provider: batchllm knows {known} "
            "(see `batchllm models`)"
        )
    return Model(name, provider, prices, None)


def to_usd(pico: int) -> float:
    """The float64 stored in Parquet: rounded once, here, from an exact integer."""
    return pico / PICO_PER_USD


def usd_decimal(pico: int) -> Decimal:
    return Decimal(pico) / PICO_PER_USD


def format_usd(pico: int | None) -> str:
    """Exact dollars, trailing zeros trimmed but at least two decimals: $0.00018245, $1.50."""
    if pico is None:
        return "unknown (no price)"
    text = f"{usd_decimal(pico):.12f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"${whole}.{frac.ljust(2, '0')}"


def usd_text(pico: int | None) -> str | None:
    """Exact dollars without the sign, for JSON; None when unknown."""
    return None if pico is None else format_usd(pico).lstrip("$")


def parse_usd(text: str) -> int:
    """A user's dollar amount ("5", "0.25", "$1.50") as picodollars, exactly."""
    try:
        value = Decimal(text.strip().lstrip("$"))
    except InvalidOperation:
        raise JobError(f"{text!r} is not a dollar amount") from None
    if not value.is_finite() or value < 0:  # NaN first: comparing it raises
        raise JobError(f"{text!r} is not a dollar amount >= 0")
    return int(value * PICO_PER_USD)
