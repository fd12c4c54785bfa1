"""Models and prices as data, and the exact cost of a usage.

Money never touches a float until it is stored. A price of $P per million tokens is P * 10**6
picodollars (1e-12 USD) per token, an integer as long as P has at most six decimal places (checked
when the table is loaded). Costs are integers in picodollars, so sums over a million rows are exact;
``to_usd`` turns one into a float64 only for the Parquet column, and ``format_usd`` into text.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path

from .errors import JobError

PICO_PER_USD = 10**12
_PICO_PER_TOKEN_PER_USD_PER_MILLION = 10**6

DEFAULT_MODEL = "meta/llama-3.1-70b-instruct"


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    input_price_per_million: Decimal
    output_price_per_million: Decimal
    context_window: int

    @property
    def input_pico_per_token(self) -> int:
        return int(self.input_price_per_million * _PICO_PER_TOKEN_PER_USD_PER_MILLION)

    @property
    def output_pico_per_token(self) -> int:
        return int(self.output_price_per_million * _PICO_PER_TOKEN_PER_USD_PER_MILLION)

    def cost_pico(self, prompt_tokens: int, completion_tokens: int) -> tuple[int, int]:
        """(input, output) cost in picodollars of one usage: exact integers."""
        return (
            prompt_tokens * self.input_pico_per_token,
            completion_tokens * self.output_pico_per_token,
        )

    def prices(self) -> dict[str, str]:
        return {
            "input_usd_per_million_tokens": str(self.input_price_per_million),
            "output_usd_per_million_tokens": str(self.output_price_per_million),
        }


def _price(raw: object, where: str) -> Decimal:
    try:
        value = Decimal(str(raw))
    except InvalidOperation:
        raise JobError(f"{where}: price {raw!r} is not a number") from None
    if value < 0 or (value * _PICO_PER_TOKEN_PER_USD_PER_MILLION) % 1 != 0:
        raise JobError(f"{where}: price {raw!r} must be >= 0 with at most 6 decimal places")
    return value


def load_models(path: Path | None = None) -> dict[str, Model]:
    """Read the model table: the packaged ``models.toml`` unless a path is given."""
    if path is None:
        text = resources.files("batchllm").joinpath("models.toml").read_text("utf-8")
        where = "batchllm/models.toml"
    else:
        try:
            text = path.read_text("utf-8")
        except OSError as exc:
            raise JobError(f"{path}: cannot read the model table: {exc.strerror}") from None
        where = str(path)
    try:
        table = tomllib.loads(text).get("models", {})
    except tomllib.TOMLDecodeError as exc:
        raise JobError(f"{where}: {exc}") from None
    models = {}
    for name, spec in table.items():
        here = f"{where} [models.{name!r}]"
        try:
            models[name] = Model(
                name=name,
                input_price_per_million=_price(spec["input_price_per_million"], here),
                output_price_per_million=_price(spec["output_price_per_million"], here),
                context_window=int(spec["context_window"]),
            )
        except KeyError as exc:
            raise JobError(f"{here}: missing key {exc.args[0]}") from None
    return models


def get_model(name: str, models: dict[str, Model] | None = None) -> Model:
    models = load_models() if models is None else models
    try:
        return models[name]
    except KeyError:
        known = ", ".join(sorted(models))
        raise JobError(f"unknown model {name!r}: batchllm knows {known} (see `batchllm models`)") from None


def to_usd(pico: int) -> float:
    """The float64 stored in Parquet: rounded once, here, from an exact integer."""
    return pico / PICO_PER_USD


def usd_decimal(pico: int) -> Decimal:
    return Decimal(pico) / PICO_PER_USD


def format_usd(pico: int) -> str:
    """Exact dollars, trailing zeros trimmed but at least two decimals: $0.00018245, $1.50."""
    text = f"{usd_decimal(pico):.12f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"${whole}.{frac.ljust(2, '0')}"


def parse_usd(text: str) -> int:
    """A user's dollar amount ("5", "0.25", "$1.50") as picodollars, exactly."""
    try:
        value = Decimal(text.strip().lstrip("$"))
    except InvalidOperation:
        raise JobError(f"{text!r} is not a dollar amount") from None
    if value < 0 or not value.is_finite():
        raise JobError(f"{text!r} is not a dollar amount >= 0")
    return int(value * PICO_PER_USD)
