"""``estimate --pack N``: what packing rows changes in an estimate (engine/packed.py).

From the rows' exact unpacked counts: each row's own line (its count less the unpacked prefix),
the packed prefix once per pack. The first pass is ceil(rows / N) packs. The worst case is every
pack's reply unreadable at every size (N, N/2, ... 2), then every row alone, asked and re-asked
to the limit, every reply as long as allowed, for each sample: a bound, not a forecast.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..engine.packed import Packs
from ..labeling.spec import Labeling


def packed_figures(
    packs: Packs, counts: np.ndarray, overhead: int, labeling: Labeling, growth: int
) -> dict[str, Any]:
    """The packed first pass and worst case of ``counts`` (rows' unpacked prompt tokens)."""
    rows = int(counts.size)
    own = int(np.maximum(1, counts.astype(np.int64) - overhead + 4).sum())
    size, shared = packs.size, packs.shared
    first = math.ceil(rows / size) if rows else 0
    prompt = own + first * shared
    worst_prompt = worst_out = worst_requests = 0
    s = size
    while s > 1:
        k = math.ceil(rows / s)
        worst_prompt += own + k * shared
        worst_out += k * packs.max_tokens(s)
        worst_requests += k
        s //= 2
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
        "worst_prompt_tokens": k * worst_prompt,
        "worst_completion_tokens": k * worst_out,
        "worst_requests": k * worst_requests,
    }
