"""Folders for the files batchllm writes: missing ones are made only inside an existing folder the
user may write, never at the top of the file system, and the CLI says which it made.

A mistyped ``-o /nonexistent/dir/x.parquet`` is refused with the folder to make by hand, while
``-o out/x.parquet`` in a fresh checkout makes ``out`` and says so. Every file batchllm writes
(the output, ``--summary-json``, ``--html``, a review export, a batch file...) goes through
``make_folders`` before it is written: the same rule and the same messages for all, and a folder
that takes no files (``/proc``) is said in one line before anything is written.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from .errors import JobError


def data_dir(environ: Mapping[str, str] | None = None) -> Path:
    """batchllm's folder for what it keeps across outputs (the ledger, the export book):
    ``$XDG_DATA_HOME/batchllm``, else ``~/.local/share/batchllm``."""
    environ = os.environ if environ is None else environ
    return Path(environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")) / "batchllm"


def folders_to_make(path: Path, what: str) -> list[Path]:
    """The missing folders above ``path``, outermost first; a ``JobError`` naming ``what`` (the
    flag or key, e.g. ``-o``) when they may not be made."""
    missing: list[Path] = []
    folder = path.parent
    while not folder.exists() and folder.parent != folder:  # bounded by the path's depth
        missing.append(folder)
        folder = folder.parent
    if not folder.is_dir():
        raise JobError(f"{what} {path}: {folder} is a file, not a folder")
    if not missing:
        return []
    top = missing[-1]
    if folder.resolve().parent == folder.resolve():
        raise JobError(
            f"{what} {path}: there is no folder {top}; batchllm makes no folder at the top of the "
            f"file system: make it first (mkdir -p {path.parent}) or check the path"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise JobError(f"{what} {path}: there is no folder {top}, and {folder} is not writable")
    return missing[::-1]


def make_folders(path: Path, what: str) -> Path | None:
    """Make the folders ``path`` needs (``folders_to_make``); the outermost one made, or None."""
    missing = folders_to_make(path, what)
    if missing:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise JobError(f"{what} {path}: cannot make the folder {missing[0]}: {exc.strerror}") from None
    # Writable as the write will find it: os.access says yes to root anywhere, even in /proc.
    try:
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=".batchllm-probe-")
    except OSError as exc:
        raise JobError(f"{what} {path}: cannot write in the folder {path.parent} ({exc.strerror})") from None
    os.close(fd)
    os.unlink(probe)
    return missing[0] if missing else None


def made_note(made: Path, path: Path) -> str:
    """What every command says, as a warning, when it made a folder for ``path``: the one wording."""
    return f"made the folder {made} for {path}"


def write_atomic(path: Path, data: bytes, what: str) -> None:
    """Write ``path`` whole or not at all; ``what`` (the flag) names it if its folder may not
    be made or written."""
    make_folders(path, what)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
