"""What a text input (CSV, JSONL) is written in, and what to tell a user whose file does not read.

    encoding_of(path, given)    the encoding to read with: a byte-order mark's, else --encoding, else UTF-8
    check_encoding(name)        --encoding: a text encoding Python knows, or ValueError
    decode_problem(path, enc)   the first line that does not decode, in words, with what to try
    delimiter_hint(...)         the --delimiter that explains a file the current one does not
    unclosed_quote(...)         the line of a quoted value that never closes (a stray quote)

A byte-order mark always wins: it is unambiguous, and ``--encoding`` is for the files without
one (Latin-1, Windows-1252, UTF-16 written without a mark). Everything here reads at most the
first ``SAMPLE`` bytes, except ``decode_problem``, which runs once, after reading already failed,
and ``unclosed_quote``, which reads the file once when its last row holds line breaks.
"""

from __future__ import annotations

import codecs
import csv
import io
from pathlib import Path

from .errors import JobError

SAMPLE = 64 * 1024
# UTF-32 LE starts like UTF-16 LE: the longer marks first.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_DELIMITERS = (
    (",", "','", "--delimiter ','"),
    (";", "';'", "--delimiter ';'"),
    ("\t", "tab", "--delimiter tab"),
    ("|", "'|'", "--delimiter '|'"),
)


def check_encoding(raw: str) -> str:
    """``--encoding``: a text codec Python knows (``latin-1``, ``cp1252``, ``utf-16``...)."""
    try:
        info = codecs.lookup(raw)
    except LookupError:
        raise ValueError(
            f"must be a text encoding such as utf-8, latin-1, cp1252 or utf-16, got {raw!r}"
        ) from None
    if not getattr(info, "_is_text_encoding", True):
        raise ValueError(f"must be a text encoding such as utf-8, latin-1 or utf-16, got {raw!r}")
    return raw


def is_utf8(encoding: str) -> bool:
    return codecs.lookup(encoding).name == "utf-8"


def encoding_of(path: Path, given: str | None) -> str:
    """The encoding to read ``path`` with: its byte-order mark's, else ``given``, else UTF-8."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return given or "utf-8"
    for bom, name in _BOMS:
        if head.startswith(bom):
            return name
    return given or "utf-8"


def read_text(path: Path, kind: str) -> str:
    """A text file batchllm reads besides the input (a job or fleet file, a template, a labels
    file, a JSON schema, a key file...): in its byte-order mark's encoding (the mark dropped),
    else UTF-8; else a ``JobError`` naming the file and the fix (``--encoding`` is the input's
    alone, so it is not offered). ``OSError`` is the caller's to say."""
    raw = path.read_bytes()
    encoding = next((name for bom, name in _BOMS if raw.startswith(bom)), "utf-8")
    try:
        return raw.decode("utf-8-sig" if encoding == "utf-8" else encoding)
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1  # lines counted where "\n" is one byte
        where = f"line {line} is" if encoding == "utf-8" else "is"
        byte = f" (byte 0x{raw[exc.start]:02x})" if exc.start < len(raw) else ""
        raise JobError(
            f"{path}: {where} not {encoding.upper()} text{byte}: save the {kind} as UTF-8"
        ) from None


def nul_hint(path: Path, kind: str | None = None) -> str | None:
    """A text file whose first line holds NUL bytes is UTF-16 written without a byte-order mark
    (UTF-8 text has no NUL); None otherwise. ``kind``: a file other than the input, which
    ``--encoding`` does not apply to."""
    try:
        with open(path, "rb") as fh:
            head = fh.readline(SAMPLE)
    except OSError:
        return None
    if b"\x00" not in head:
        return None
    guess = "utf-16-le" if head[1:2] == b"\x00" else "utf-16-be"
    fix = f"save the {kind} as UTF-8" if kind else f"pass --encoding {guess}"
    return (
        f"{path}: the first line holds NUL bytes: the file looks like UTF-16 without a byte-order mark; "
        + fix
    )


def decode_problem(path: Path, encoding: str, kind: str | None = None) -> str | None:
    """The first line of ``path`` that does not decode as ``encoding``, and what to try; None
    when it decodes. Line numbers are counted for encodings that keep ``\\n`` one byte (not UTF-16)."""
    name = codecs.lookup(encoding).name
    by_lines = not name.startswith(("utf-16", "utf-32"))
    decoder = codecs.getincrementaldecoder(encoding)()
    try:
        with open(path, "rb") as fh:
            if by_lines:
                for number, raw in enumerate(fh, 1):  # bounded by the file's lines
                    try:
                        decoder.decode(raw)
                    except UnicodeDecodeError as exc:
                        return _say(
                            path, name, encoding, f"line {number}", raw[exc.start : exc.start + 1], kind
                        )
                decoder.decode(b"", final=True)
            else:
                decoder.decode(fh.read(), final=True)
    except UnicodeDecodeError as exc:
        return _say(path, name, encoding, "", exc.object[exc.start : exc.start + 2], kind)
    except OSError:
        return None
    return None


def _say(path: Path, name: str, given: str, where: str, bad: bytes, kind: str | None) -> str:
    at = f"{where} is not" if where else "is not"
    byte = f" (byte 0x{bad[0]:02x})" if bad else ""
    if kind:  # not the input: --encoding is not for it
        return f"{path}: {at} {given.upper()} text{byte}: save the {kind} as UTF-8"
    if name == "utf-8":
        # 0x80-0x9f are control codes in Latin-1 but letters and quotes in Windows-1252.
        guess = "cp1252" if bad and 0x80 <= bad[0] <= 0x9F else "latin-1"
        return (
            f"{path}: {at} UTF-8 text{byte}: give the file's encoding, e.g. --encoding {guess} "
            "(job key: encoding)"
        )
    return f"{path}: {at} {given} text{byte}: check --encoding (job key: encoding)"


def delimiter_hint(path: Path, encoding: str, current: str, wanted: list[str] | None = None) -> str:
    """`` (is the file separated by ';'? pass --delimiter ';')`` when another delimiter reads the
    file's first lines into more columns than ``current``, every line as wide as the header (and,
    with ``wanted``, a header holding those columns); else ""."""
    sample = _sample(path, encoding)
    if sample is None:
        return ""
    text, whole = sample
    current_records = _records(text, current, whole)
    width = len(current_records[0]) if current_records else 0
    for sep, name, flag in _DELIMITERS:
        if sep == current:
            continue
        header = _consistent_header(_records(text, sep, whole))
        if header is None or len(header) <= max(width, 1):
            continue
        if wanted and not all(w in header for w in wanted):
            continue
        return f" (is the file separated by {name}? pass {flag})"
    return ""


def _sample(path: Path, encoding: str) -> tuple[str, bool] | None:
    try:
        with open(path, "rb") as fh:
            raw = fh.read(SAMPLE + 1)
    except OSError:
        return None
    whole = len(raw) <= SAMPLE
    text = raw[:SAMPLE].decode("utf-8-sig" if is_utf8(encoding) else encoding, "replace")
    return text, whole


def _records(text: str, sep: str, whole: bool) -> list[list[str]]:
    try:
        records = [r for r in csv.reader(io.StringIO(text), delimiter=sep) if r]
    except csv.Error:
        return []
    return records if whole else records[:-1]  # a sample's last record may be cut short


def _consistent_header(records: list[list[str]]) -> list[str] | None:
    if len(records) < 2 or len(records[0]) < 2:
        return None
    header = records[0]
    if any(len(r) != len(header) for r in records[1:]):
        return None
    return header


def unclosed_quote(path: Path, encoding: str, delimiter: str) -> int | None:
    """The line on which a quoted value opens and never closes, or None.

    Arrow takes a quote left open to the end of the file as one last value: ``2,"stray`` makes
    every later line part of row 2's prompt, paid for as one request, without a word. Python's
    reader, strict, says "unexpected end of data" there (a literal ``12" screen`` inside an
    unquoted value it reads as Arrow does). A whole pass: the caller asks only when the last row
    holds line breaks, as such a value does.
    """
    with open(path, encoding=encoding, errors="replace", newline="") as fh:
        reader = csv.reader(fh, delimiter=delimiter, strict=True)
        start = 1
        try:
            for _ in reader:
                start = reader.line_num + 1
        except csv.Error as exc:
            return start if "end of data" in str(exc) else None
    return None
