"""Job files: TOML with the keys ``build_job`` takes (job.py), paths relative to the file.

``load_job_file`` reads one for a run (the first problem is the error); ``job_file_problems``
lists every problem of one for ``batchllm validate``: unknown keys with the nearest allowed one,
each bad value quoted, then what the good keys say together.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

from .errors import JobError
from .job import build_job
from .job_keys import JOB_KEYS
from .values import read_toml

_PATH_KEYS = {
    "input",
    "output",
    "template_file",
    "system_file",
    "api_key_file",
    "checkpoint",
    "summary_json",
    "labels_file",
    "json_schema",
    "examples",
    "ledger",
    "fleet",
}
_NO_KEY = "key 'api_key': a job file must not hold the key; name the environment variable that holds it with api_key_env"


def _read(path: Path) -> dict[str, Any]:
    return read_toml(path, "job file")


def load_job_file(path: Path) -> dict[str, Any]:
    """Read a TOML job file into raw values, paths made relative to the file's folder."""
    raw = _read(path)
    if "api_key" in raw:
        raise JobError(f"{path}: {_NO_KEY}")
    unknown = sorted(set(raw) - set(JOB_KEYS))
    if unknown:
        raise JobError(unknown_key(path, unknown[0]))
    return _relative_to(raw, path)


def _relative_to(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """Paths in a job file are relative to its folder, as ``run --job`` reads them."""
    for key in _PATH_KEYS & set(raw):
        if isinstance(raw[key], str) and raw[key] != "off":
            raw[key] = os.path.normpath(path.parent / Path(raw[key]).expanduser())
    return raw


def unknown_key(path: Path, key: str) -> str:
    """The message for a key a job file may not have, with the nearest allowed key."""
    near = difflib.get_close_matches(key, JOB_KEYS, n=1, cutoff=0.6)
    hint = f"; did you mean {near[0]!r}?" if near else f"; allowed keys: {', '.join(sorted(JOB_KEYS))}"
    return f"{path}: unknown key {key!r}{hint}"


def job_file_problems(path: Path) -> list[str]:
    """Every problem of a job file, one line each: unknown keys, each bad value (quoted), then
    what the keys that are good say together."""
    try:
        raw = _read(path)
    except JobError as exc:
        return [str(exc)]
    problems = [f"{path}: {_NO_KEY}"] if "api_key" in raw else []
    raw = _relative_to(raw, path)  # a fleet file's path, as run reads it (not from the shell's folder)
    for key in sorted(set(raw) - {"api_key"}):
        if key not in JOB_KEYS:
            problems.append(unknown_key(path, key))
            continue
        try:
            build_job({key: raw[key]}, job_file=path, partial=True)
        except JobError as exc:
            problems.append(str(exc))
    if not problems:
        try:
            build_job(load_job_file(path), job_file=path)
        except JobError as exc:
            problems.append(str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}")
    return problems
