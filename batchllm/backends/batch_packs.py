"""Packed rows (``--pack N``) on the batch path: ``export-batch`` writes one line per pack and
``import-batch`` splits each pack's reply back into its rows, exactly as a live run would.

A pack's ``custom_id`` names its rows without listing them (batch APIs cap it at 64 characters):
``pack<N>-<block>-<mask>``, where the input's rows are cut into blocks of N by position and the
mask's bits say which rows of the block the pack holds (rows done, or refused, are left out). So
an import finds a pack's rows from the input alone, whatever the journal holds by then.

Imported packs are split like live ones (labeling/pack.py): each row gets its item, read and
checked on its own, and its exact share of the pack's tokens and cost. A reply that cannot be
read as a whole leaves its rows pending for ``batchllm run``, their shares of its cost kept as
``split`` attempts (so nothing paid is lost, and importing twice adds nothing).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from ..engine.checks import Prepared
from ..engine.journal import Journal
from ..engine.packed import Packs
from ..labeling import pack as shape
from ..labeling.rows import SPLIT, Attempt
from ..labeling.spec import Labeling
from ..pricing import Prices, cached_saving, cost
from ..records import Entry, Message, Request
from ..tokens import TokenCounter, counter_for
from .openai_batch import batch_line

_ID = re.compile(r"^pack(\d{1,3})-(\d{1,12})-([0-9a-f]{1,25})$")
Row = tuple[int, str, str, Request | None]  # position, row_id, content hash, request (None: refused)


def custom_id(size: int, block: int, offsets: list[int]) -> str:
    return f"pack{size}-{block}-{sum(1 << k for k in offsets):x}"


def positions(cid: str) -> list[int] | None:
    """The input positions a pack's custom_id names, or None when it is not a pack's."""
    m = _ID.match(cid)
    if m is None:
        return None
    size, block, mask = int(m.group(1)), int(m.group(2)), int(m.group(3), 16)
    if mask >> size:
        return None
    return [block * size + k for k in range(size) if mask >> k & 1]


def packed_lines(rows: Iterator[Row], packs: Packs, refused: Callable[[], None]) -> Iterator[bytes]:
    """One request line per pack: the rows of each block of N, in order, cut where a pack would
    pass the window (or --pack-tokens)."""
    size = packs.size
    block = -1
    members: list[tuple[int, Request]] = []
    for position, _, _, request in rows:
        if request is None:
            refused()
            continue
        if position // size != block and members:
            yield from _block_lines(block, members, packs)
            members = []
        block = position // size
        members.append((position % size, request))
    if members:
        yield from _block_lines(block, members, packs)


def _block_lines(block: int, members: list[tuple[int, Request]], packs: Packs) -> Iterator[bytes]:
    texts = [r.messages[-1].content for _, r in members]
    own = own_tokens(packs.admission.counter, texts)
    start = 0
    for end in range(1, len(members) + 1):
        if end == len(members) or not packs.fits(own[start : end + 1]):
            chunk = members[start:end]
            turn = Message("user", shape.numbered(texts[start:end]))
            request = packs.request(chunk[0][1], (turn,), len(chunk))
            yield batch_line(custom_id(packs.size, block, [k for k, _ in chunk]), request)
            start = end


def own_tokens(counter: TokenCounter, texts: list[str]) -> list[int]:
    """Each row's own line's tokens in a packed prompt."""
    return counter.texts_tokens([shape.item_line(n, t) for n, t in enumerate(texts, 1)])


def read_pack(
    cid: str,
    record: dict[str, Any],
    wanted: dict[str, tuple[str, Request | None]],
    order: list[str],
    p: Prepared,
    prices: Prices | None,
    entry_of: Callable[..., Entry | None],
    label: Callable[[Entry, Labeling, tuple[str, int]], Entry],
) -> tuple[list[Entry], list[tuple[str, Attempt]]] | None:
    """A result line of a pack: its rows' entries and split attempts (``split_entry``); ([], [])
    when it stays pending; None when ``cid`` names no pack of this labeling job's input."""
    members = positions(cid)
    if members is None or p.job.labeling is None or any(k >= len(order) for k in members):
        return None
    entry = entry_of(cid, "", None, record, p, prices)  # raises Unreadable for an unreadable success
    if entry is None:
        return [], []
    rows = [(order[k], *wanted[order[k]]) for k in members]
    return split_entry(entry, rows, p.job.labeling, prices, counter_for(p.model.name), label)


def split_entry(
    pack: Entry,
    rows: list[tuple[str, str, Request | None]],
    labeling: Labeling,
    prices: Prices | None,
    counter: TokenCounter,
    label: Callable[[Entry, Labeling, tuple[str, int]], Entry],
) -> tuple[list[Entry], list[tuple[str, Attempt]]]:
    """A pack's result (its parsed reply, or its error) as its rows' entries; a reply that
    cannot be read gives split attempts instead (the rows stay pending)."""
    if pack.status != "ok":
        return [pack._replace(row_id=r, content_hash=h) for r, h, _ in rows], []
    text, pt, ct = pack.response or "", pack.prompt_tokens or 0, pack.completion_tokens or 0
    items, _ = (None, "truncated") if pack.truncated else shape.read_reply(text, len(rows))
    texts = [req.messages[-1].content if req is not None else "" for _, _, req in rows]
    prompt = shape.prompt_shares(pt, own_tokens(counter, texts))
    completion = shape.completion_shares(ct, items or [""] * len(rows))
    cached = shape.cached_shares(pack.cached_tokens or 0, prompt)  # as a live pack shares them
    entries, attempts = [], []
    pid = pack.row_id
    for n, (row_id, content_hash, _) in enumerate(rows):
        ic, oc = cost(prices, prompt[n], completion[n], cached[n])
        if items is None and len(rows) > 1:
            a = Attempt(0, SPLIT, "", prompt[n], completion[n], ic, oc, bool(pack.truncated), pid, n + 1)
            attempts.append((row_id, a._replace(cached_tokens=cached[n])))
            continue
        entry = pack._replace(
            row_id=row_id,
            content_hash=content_hash,
            response=text if items is None else items[n],
            prompt_tokens=prompt[n],
            completion_tokens=completion[n],
            input_cost_pico=ic,
            output_cost_pico=oc,
            cached_tokens=cached[n],
            cached_saved_pico=None if ic is None else cached_saving(prices, cached[n]),
        )
        entries.append(label(entry, labeling, (pid, 0 if items is None else n + 1)))
    return entries, attempts


def add_splits(
    journal: Journal, splits: list[tuple[str, Attempt]], have: dict[str, Entry]
) -> tuple[int, int, int]:
    """Packs whose reply could not be read: each row's share of the cost, as an attempt (once:
    an import done before left the same pack's attempt), the row left pending for the live run.
    Returns what those added cost: prompt and completion tokens, picodollars."""
    pt = ct = pico = 0
    if not splits:
        return pt, ct, pico
    known = journal.attempts_for(list(dict.fromkeys(r for r, _ in splits)))
    for row_id, a in splits:
        tried = known.setdefault(row_id, [])
        if row_id in have or any(t.pack_id == a.pack_id for t in tried):
            continue
        journal.add_attempt(row_id, len(tried), a)
        tried.append(a)
        pt, ct = pt + a.prompt_tokens, ct + a.completion_tokens
        pico += (a.input_cost_pico or 0) + (a.output_cost_pico or 0)
    return pt, ct, pico
