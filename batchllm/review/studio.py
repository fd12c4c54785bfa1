"""Label Studio's side of a review: the labeling config that fits a job, and one task per row.

The config shows the columns the prompt template uses (``Text``) and one control per answer: a
label set as ``Choices``; a schema field by field (enum and boolean as ``Choices``, integer and
number as ``Number``, string as ``TextArea``, an array of strings as multiple ``Choices`` when its
items have an enum, else ``TextArea``). A task's ``data`` holds those columns, the ``row_id``
and why the row was picked; its ``predictions`` hold the model's answer pre-filled (nothing for
an invalid row), with ``score`` = the samples' agreement where there is one and
``model_version`` = the model and a hash of the request settings.
"""

from __future__ import annotations

import hashlib
from typing import Any
from xml.sax.saxutils import quoteattr

import orjson

from ..labeling.spec import Field, Labeling
from .picks import sure

LABEL = "label"  # the control of a label set


def label_config(labeling: Labeling, columns: list[str]) -> str:
    """The labeling config (XML) for this job's answers over these input columns."""
    target = columns[0]
    lines = ["<View>"]
    for column in columns:
        lines.append(f"  <Header value={quoteattr(column)}/>")
        lines.append(f"  <Text name={quoteattr(column)} value={quoteattr('$' + column)}/>")
    if not labeling.is_schema:
        lines += _choices(LABEL, target, labeling.labels, multiple=False)
    for f in labeling.fields:
        lines.append(f"  <Header value={quoteattr(f.name)}/>")
        if f.type == "boolean":
            lines += _choices(f.name, target, ("true", "false"), multiple=False)
        elif f.enum is not None:
            lines += _choices(f.name, target, tuple(str(x) for x in f.enum), multiple=f.type == "array")
        elif f.type in ("integer", "number"):
            lines.append(f"  <Number name={quoteattr(f.name)} toName={quoteattr(target)}/>")
        else:
            lines.append(f"  <TextArea name={quoteattr(f.name)} toName={quoteattr(target)}/>")
    lines.append("</View>")
    return "\n".join(lines) + "\n"


def _choices(name: str, target: str, values: tuple[str, ...], multiple: bool) -> list[str]:
    kind = "multiple" if multiple else "single"
    out = [f"  <Choices name={quoteattr(name)} toName={quoteattr(target)} choice={quoteattr(kind)}>"]
    out += [f"    <Choice value={quoteattr(v)}/>" for v in values]
    return [*out, "  </Choices>"]


def model_version(model: str, settings: dict[str, Any]) -> str:
    digest = hashlib.blake2b(orjson.dumps(settings, option=orjson.OPT_SORT_KEYS), digest_size=4).hexdigest()
    return f"{model} {digest}"


def task(
    row: dict[str, Any], columns: list[str], labeling: Labeling, why: str, version: str
) -> dict[str, Any]:
    """One Label Studio task for an output row, its prediction pre-filled."""
    data = {c: None if row.get(c) is None else str(row[c]) for c in columns}
    data.update(row_id=row["row_id"], pick=why)
    result = [] if row.get("status") != "ok" else _result(row, columns[0], labeling)
    prediction: dict[str, Any] = {"model_version": version, "result": result}
    score = sure(row)  # the model's own probability, else its samples' agreement
    if score is None:
        score = row.get("agreement")
    if score is not None:
        prediction["score"] = score
    return {"data": data, "predictions": [prediction]}


def _result(row: dict[str, Any], target: str, labeling: Labeling) -> list[dict[str, Any]]:
    if not labeling.is_schema:
        return [_choice(LABEL, target, [row[LABEL]])] if row.get(LABEL) is not None else []
    out = []
    for f in labeling.fields:
        value = row.get(f.name)
        if value is None:
            continue
        out.append(_control(f, target, value))
    return out


def _control(f: Field, target: str, value: Any) -> dict[str, Any]:
    if f.type == "boolean":
        return _choice(f.name, target, ["true" if value else "false"])
    if f.enum is not None:
        return _choice(f.name, target, [str(x) for x in (value if f.type == "array" else [value])])
    if f.type in ("integer", "number"):
        return {"from_name": f.name, "to_name": target, "type": "number", "value": {"number": value}}
    text = ", ".join(value) if f.type == "array" else str(value)
    return {"from_name": f.name, "to_name": target, "type": "textarea", "value": {"text": [text]}}


def _choice(name: str, target: str, choices: list[str]) -> dict[str, Any]:
    return {"from_name": name, "to_name": target, "type": "choices", "value": {"choices": choices}}
