"""``estimate --pack N``: what packing rows changes in an estimate (engine/packed.py).

From the rows' exact unpacked counts: each row's own line (its count less the unpacked prefix),
the packed prefix once per pack. The first pass cuts the rows into packs as a run does
(engine/packed.py ``_cut``): at most N rows, in groups of the run's, and no more tokens than
``--pack-tokens`` (or the context window) with their reply allowance; a row too long for any pack
is refused, as the run refuses it. The worst case is every pack's reply unreadable at every size
(N, N/2, ... 2), then every row alone, asked and re-asked to the limit, every reply as long as
allowed, for each sample: a bound, not a forecast.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..engine.packed import Packs
from ..labeling.spec import Labeling


def packed_figures(
    packs: Packs, counts: np.ndarray, overhead: int, labeling: Labeling, growth: int
) -> dict[str, Any]:
    """The packed first pass and worst case of ``counts`` (rows' unpacked prompt tokens)."""
    lines = np.maximum(1, counts.astype(np.int64) - overhead + 4)
    fitting = lines
    if packs.limit is not None:  # a row too long for a pack of one is refused (not sent)
        fitting = lines[packs.shared + lines + packs.max_tokens(1) <= packs.limit]
    rows, own = int(fitting.size), int(fitting.sum())
    size, shared = packs.size, packs.shared
    cuts = [pack_lengths(packs, fitting, s) for s in _halvings(size)]
    first = len(cuts[0]) if cuts else rows
    prompt = own + first * shared
    worst_prompt = worst_out = worst_requests = 0
    for lengths in cuts:
        worst_prompt += own + len(lengths) * shared
        worst_out += sum(packs.max_tokens(n) for n in lengths)
        worst_requests += len(lengths)
    r = labeling.reask
    worst_prompt += (r + 1) * (own + rows * shared) + rows * growth * r * (r + 1) // 2
    worst_out += (r + 1) * rows * packs.max_tokens(1)
    worst_requests += (r + 1) * rows
    k = labeling.samples
    return {
        "pack": size,
        "requests": first,
        "prompt_tokens": prompt,
        "prompt_tokens_one_row_a_request": int(counts.sum()),
        "rows_too_long_for_a_pack": int(lines.size) - rows,
        "worst_prompt_tokens": k * worst_prompt,
        "worst_completion_tokens": k * worst_out,
        "worst_requests": k * worst_requests,
    }


def _halvings(size: int) -> list[int]:
    """The pack sizes a pack whose reply is unreadable is split into: N, N/2, ... 2."""
    sizes = []
    while size > 1:
        sizes.append(size)
        size //= 2
    return sizes


def pack_lengths(packs: Packs, lines: np.ndarray, size: int) -> list[int]:
    """The rows in each pack of at most ``size`` rows a run makes of rows of these own line
    tokens: groups of the run's (``Packs.group``), each cut by count and tokens."""
    rows = int(lines.size)
    if not rows:
        return []
    # The common case, decided at once: no pack of ``size`` of the longest rows passes the limit.
    longest = int(lines.max())
    if packs.limit is None or packs.shared + size * longest + packs.max_tokens(size) <= packs.limit:
        group = packs.group
        full, rest = divmod(rows, group)
        per_group = [size] * (group // size) + ([group % size] if group % size else [])
        tail = [size] * (rest // size) + ([rest % size] if rest % size else [])
        return per_group * full + tail
    lengths: list[int] = []
    limit, shared = packs.limit, packs.shared
    for start in range(0, rows, packs.group):
        count, tokens = 0, shared
        for own in lines[start : start + packs.group].tolist():
            if count and (count >= size or tokens + own + packs.max_tokens(count + 1) > limit):
                lengths.append(count)
                count, tokens = 0, shared
            count, tokens = count + 1, tokens + own
        if count:
            lengths.append(count)
    return lengths
