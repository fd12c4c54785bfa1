"""Structured output (``--structured``): the ``response_format`` a labeling request carries.

Servers that speak OpenAI's chat completions (OpenAI, vLLM, llama.cpp, SGLang, LiteLLM) take
``response_format: {"type": "json_schema", "json_schema": {"name", "strict", "schema"}}`` and
constrain the reply to the schema (llama.cpp and vLLM with a grammar, OpenAI in strict mode), so
a small model answers in shape where free text would wander:

    a label set     {"label": <one of the labels>}
    --json-schema   the job's schema, compiled to what OpenAI's strict mode requires: the root an
                    object, every property required, ``additionalProperties: false``, the
                    optional ones nullable (their type a list with "null"; null in their enum)
    a pack of n     {"1": <item>, ..., "n": <item>}, each item the label enum or the row schema

The instruction in the system prompt stays as it is, and every reply is still read and checked by
labeling/parse.py (which takes ``{"label": ...}`` as well as a bare label): a server may ignore
the schema. ``Formats`` is built once per run; a pack's format once per pack size.
"""

from __future__ import annotations

from typing import Any

from .parse import LABEL_FIELD
from .spec import Labeling

PARAM = "response_format"  # the request field, as the openai provider sends it


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """A labeling schema (labeling/spec.py's subset: one object of flat properties) as OpenAI's
    strict mode takes it. The properties keep the job's own keywords (descriptions, ``maxItems``
    ...): they are the job's to choose."""
    required = set(schema.get("required") or ())
    properties: dict[str, Any] = {}
    for name, spec in (schema.get("properties") or {}).items():
        prop = dict(spec)
        enum = prop.get("enum")
        if "type" not in prop and isinstance(enum, list) and all(isinstance(x, str) for x in enum):
            prop["type"] = "string"  # an enum alone reads as strings (labeling/spec.py)
        if name not in required:
            kind = prop.get("type")
            if isinstance(kind, str):
                prop["type"] = [kind, "null"]
            elif isinstance(kind, list) and "null" not in kind:
                prop["type"] = [*kind, "null"]
            if isinstance(enum, list) and None not in enum:
                prop["enum"] = [*enum, None]
        properties[name] = prop
    out: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }
    if isinstance(schema.get("description"), str):
        out["description"] = schema["description"]
    return out


def label_item(labels: tuple[str, ...]) -> dict[str, Any]:
    return {"type": "string", "enum": list(labels)}


def item_schema(labeling: Labeling) -> dict[str, Any]:
    """What one row's answer is: a label of the set, or an object of the job's schema."""
    return strict(labeling.schema) if labeling.is_schema else label_item(labeling.labels)


def row_schema(labeling: Labeling) -> dict[str, Any]:
    """One row's reply: the job's schema, or an object whose label field is the label enum."""
    if labeling.is_schema:
        return strict(labeling.schema)
    return {
        "type": "object",
        "properties": {LABEL_FIELD: label_item(labeling.labels)},
        "required": [LABEL_FIELD],
        "additionalProperties": False,
    }


def pack_schema(item: dict[str, Any], rows: int) -> dict[str, Any]:
    """A packed reply of ``rows`` items (labeling/pack.py): keys "1" to "rows", each an item."""
    keys = [str(n) for n in range(1, rows + 1)]
    return {
        "type": "object",
        "properties": dict.fromkeys(keys, item),
        "required": keys,
        "additionalProperties": False,
    }


def response_format(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "strict": True, "schema": schema}}


class Formats:
    """One run's response formats: a row's, and a pack's for each size asked (at most --pack)."""

    def __init__(self, labeling: Labeling) -> None:
        self.row = response_format("answer", row_schema(labeling))
        self._item = item_schema(labeling)
        self._packs: dict[int, dict[str, Any]] = {}

    def pack(self, rows: int) -> dict[str, Any]:
        found = self._packs.get(rows)
        if found is None:
            found = self._packs[rows] = response_format("answers", pack_schema(self._item, rows))
        return found
