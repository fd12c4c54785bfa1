"""``--deadline`` over a fleet: the pace each endpoint gets so that the requests left end in time
at the least cost (router.py asks again every few seconds, from what is left then).

Endpoints in order of price, each given what it carries now until the pace the deadline needs is
covered: the cheapest always at their full limit, whatever the deadline (holding an endpoint back
saves money only when its requests go to a cheaper one instead, and none is cheaper than they
are), the next at the pace the rest needs, the dearer ones idle. The same greedy fill as the plan
``estimate --fleet --deadline`` prints (reports/fleet_plan.py), optimal for linear costs.
"""

from __future__ import annotations

from collections.abc import Sequence


def paces(prices: Sequence[int], carries: Sequence[float], need: float) -> list[float | None] | None:
    """Each endpoint's pace in requests a second, cheapest first: None at its full limit, 0 idle.
    ``carries``: what each carries now (0 while benched); ``need``: the requests a second the
    deadline needs. None when even every endpoint at its full limit carries less."""
    if need > sum(carries):
        return None
    out: list[float | None] = []
    for price, carry in zip(prices, carries, strict=True):
        share = carry if price == prices[0] else min(carry, need)
        need = max(0.0, need - share)
        if price == prices[0] or (share > 0 and share >= carry * 0.999):
            out.append(None)
        else:
            out.append(share)
    return out
