"""The sandbox's structured output: ``response_format`` checked as OpenAI checks it, and replies
held to its schema as a server's grammar holds them.

``problem`` answers what OpenAI's API would refuse with a 400: a malformed ``response_format``,
and in strict mode a schema whose root is not an object, or an object without
``additionalProperties: false`` or with a property left out of ``required``. ``conform`` makes
any value the emulated model means valid under the schema: kept where it already is, otherwise
the nearest valid value (a label outside the enum becomes one of the enum, a missing field is
filled), so even the messy model's answers arrive in shape; what the model meant wrongly stays
wrong, as it does on a real server.
"""

from __future__ import annotations

import hashlib
from typing import Any

_TYPES = {"object", "array", "string", "integer", "number", "boolean", "null"}


def problem(fmt: Any) -> str | None:
    """Why OpenAI would refuse this ``response_format``, or None."""
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        return "Invalid value for 'response_format.type': expected one of text, json_object, json_schema"
    if fmt["type"] != "json_schema":
        return None
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        return "Missing required parameter: 'response_format.json_schema.name'."
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        return "Invalid type for 'response_format.json_schema.schema': expected an object."
    if spec.get("strict") is True:
        if schema.get("type") != "object":
            return f"Invalid schema for response_format '{spec['name']}': schema must be a JSON Schema of 'type: \"object\"'."
        why = _strict(schema, "()")
        if why:
            return f"Invalid schema for response_format '{spec['name']}': In context={why}"
    return None


def _strict(schema: dict[str, Any], where: str) -> str | None:
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else kinds if isinstance(kinds, list) else []
    if not kinds and "enum" not in schema:
        return f"{where}, schema must have a 'type' key."
    if any(k not in _TYPES for k in kinds):
        return f"{where}, unknown type {kinds!r}."
    if "object" in kinds:
        props = schema.get("properties")
        if not isinstance(props, dict):
            return f"{where}, 'properties' is required for an object."
        if schema.get("additionalProperties") is not False:
            return f"{where}, 'additionalProperties' is required to be supplied and to be false."
        required = schema.get("required")
        if not isinstance(required, list) or set(required) != set(props):
            missing = [k for k in props if not isinstance(required, list) or k not in required]
            return (
                f"{where}, 'required' is required to be supplied and to be an array including every "
                f"key in properties. Missing {missing[:1]!r}."
            )
        for name, sub in props.items():
            why = _strict(sub, f"{where[:-1]}'properties', '{name}')") if isinstance(sub, dict) else None
            if why:
                return why
    if "array" in kinds and isinstance(schema.get("items"), dict):
        return _strict(schema["items"], f"{where[:-1]}'items')")
    return None


def schema_of(fmt: Any) -> dict[str, Any] | None:
    """The schema a reply is held to (a json_schema format's), or None."""
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        if isinstance(spec, dict) and isinstance(spec.get("schema"), dict):
            return spec["schema"]
    return None


def _pick(options: list[Any], key: Any) -> Any:
    digest = hashlib.sha256(repr(key).encode()).digest()
    return options[int.from_bytes(digest[:4], "big") % len(options)]


def conform(schema: dict[str, Any], value: Any, key: Any = "") -> Any:
    """``value`` made valid under ``schema``: kept where it is valid, else the nearest valid value
    (chosen deterministically by ``key`` where there is a choice)."""
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else list(kinds) if isinstance(kinds, list) else []
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        if value in enum and (value is not None or None in enum):
            return value
        return _pick([x for x in enum if x is not None] or enum, key)
    if value is None and "null" in kinds:
        return None
    if "object" in kinds:
        props = schema.get("properties") or {}
        given = value if isinstance(value, dict) else {}
        if not isinstance(value, dict) and len(props) == 1:
            given = {next(iter(props)): value}  # a bare answer, in the object's one field
        required = schema.get("required") or list(props)
        return {
            name: conform(sub, given.get(name), (key, name))
            for name, sub in props.items()
            if name in given or name in required
        }
    if "array" in kinds:
        items = schema.get("items") or {}
        values = value if isinstance(value, list) else []
        out = [conform(items, v, (key, i)) for i, v in enumerate(values)]
        low, high = schema.get("minItems", 0), schema.get("maxItems")
        while len(out) < low:
            out.append(conform(items, None, (key, len(out))))
        return out if high is None else out[:high]
    if "string" in kinds:
        return value if isinstance(value, str) else "text"
    if "integer" in kinds:
        return value if isinstance(value, int) and not isinstance(value, bool) else 1
    if "number" in kinds:
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else 1.0
    if "boolean" in kinds:
        return value if isinstance(value, bool) else False
    return None
