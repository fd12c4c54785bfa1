"""The budget guard behind ``--max-cost``: the run never spends more than the cap.

Before a request leaves, its worst case (its exact prompt cost plus ``max_tokens`` at the output
price) is reserved against what remains; when the usage comes back the reservation is replaced by
the real cost. Spending can therefore never pass the cap, whatever the replies turn out to be.
Everything is integer picodollars (see pricing.py), so the comparison is exact.

That holds while the server counts a prompt as batchllm does. One that counts more (a chat
template or system prompt of its own, another tokenizer, usage that is simply wrong) bills a reply
past its worst case. The first such reply sets ``margin``, the most a reply has cost over its
reservation: every request reserves that much more from then on (``take``), and one reserved
before leaves only while everything reserved still fits (``short``). Until that first reply, one
request is reserved at a time, so no wave of requests leaves with reservations too small; the cap
is then passed only by a reply that costs more over its worst case than every one before it.

The cap covers the whole output: what earlier runs of the same journal spent counts too, so
``--max-cost 5`` means "this output may cost $5 in all", and a later run with a higher cap resumes.
``--max-cost-per-run`` caps what this run spends, for nightly incremental jobs;
``--max-cost-per-month`` caps what the job spends in a calendar month across its runs: this run
holds a claim on the month in the ledger (ledger.MonthAllowance) and asks for more whenever a
reservation would pass it. All hold at once.
"""

from __future__ import annotations

import asyncio
import math
import re
from decimal import ROUND_CEILING, Decimal
from fractions import Fraction
from typing import TYPE_CHECKING

from ..pricing import PICO_PER_USD
from .counts import plural

if TYPE_CHECKING:
    from ..ledger import MonthAllowance


class Budget:
    def __init__(
        self, cap_pico: int | None, spent_before_pico: int = 0, run_cap_pico: int | None = None
    ) -> None:
        self.cap = cap_pico
        self.run_cap = run_cap_pico
        self.spent = spent_before_pico  # the whole output's, this run's included
        self.spent_run = 0
        self.reserved = 0
        self.in_flight = 0
        self._released = asyncio.Event()
        self.month: MonthAllowance | None = None
        self.month_reached = False  # the month's cap, not this output's or this run's, stopped it
        self.refused = 0  # the worst case of the request that could not fit (the stop's message)
        self.margin = 0  # the most a reply cost over its reservation (see the docstring)
        self.heard = False  # has a request settled (until then, one is reserved at a time)

    @property
    def active(self) -> bool:
        """Is any cap set (so requests reserve their worst case)?"""
        return self.cap is not None or self.run_cap is not None or self.month is not None

    def short(self) -> bool:
        """Replies cost more than reserved and what is reserved no longer fits: a request
        reserved before that must not leave (its reservation was too small)."""
        return bool(self.margin) and not self._fits(0)

    def _fits(self, worst_pico: int) -> bool:
        self.month_reached = False
        if self.cap is not None and self.spent + self.reserved + worst_pico > self.cap:
            return False
        if self.run_cap is not None and self.spent_run + self.reserved + worst_pico > self.run_cap:
            return False
        if self.month is not None:
            need = self.spent_run + self.reserved + worst_pico - self.month.claimed
            if need > 0 and not self.month.extend(need):
                self.month_reached = True
                return False
        return True

    @property
    def run_cap_reached(self) -> bool:
        """Which cap stopped the run: this run's, rather than the output's."""
        return self.run_cap is not None and (
            self.cap is None or self.cap - self.spent > self.run_cap - self.spent_run
        )

    async def reserve(self, worst_pico: int) -> bool:
        """Reserve ``worst_pico``, waiting for in-flight reservations to settle if that helps.

        False when it cannot fit even with nothing in flight: the budget is spent.
        """
        return await self._reserve(worst_pico, False) is not None

    async def take(self, own_pico: int) -> int | None:
        """Reserve a request's own worst case and the margin as it stands once there is room (a
        margin learned while the request waited counts): the amount reserved, for ``settle``;
        None when it cannot fit even with nothing in flight."""
        return await self._reserve(own_pico, True)

    async def _reserve(self, pico: int, with_margin: bool) -> int | None:
        if not self.active:
            return pico
        while True:
            worst = pico + self.margin if with_margin else pico
            # Until the first request settles, one at a time: a server that bills past the worst
            # case shows it on its first reply, before a wave of reservations went out without
            # the margin (one request's round trip, against a cap passed by --concurrency of them).
            if self._fits(worst) and (self.heard or self.in_flight == 0):
                self.reserved += worst
                self.in_flight += 1
                return worst
            if self.in_flight == 0:
                self.refused = worst
                return None
            self._released.clear()
            await self._released.wait()

    def settle(self, reserved_pico: int, actual_pico: int, own_pico: int | None = None) -> None:
        """A request ended: ``actual_pico`` was billed (0 if it failed); release its reservation.
        ``own_pico``: the request's own worst case, the reservation less the margin of its time."""
        self.spent += actual_pico
        self.spent_run += actual_pico
        if not self.active:
            return
        self.margin = grown_margin(self.margin, reserved_pico if own_pico is None else own_pico, actual_pico)
        self.heard = True
        self.reserved -= reserved_pico
        self.in_flight -= 1
        self._released.set()

    def gave_up(self, worst_pico: int, renews: bool = False) -> bool:
        """A request was given up on (a timeout): it may have been billed up to its worst case,
        so that is spent, and its reservation stays for the retry. False when what is reserved
        no longer fits under the caps with it: nothing more may leave. ``renews``: the retry
        reserves again before it leaves (``renew``), so only a request alone in flight stops
        here; the others wait for room as any request does (the requests in flight hold the
        rest of the cap, and most will cost far less than their worst case)."""
        self.spent += worst_pico
        self.spent_run += worst_pico
        return not self.active or self._fits(0) or (renews and self.in_flight > 1)

    async def renew(self, worst_pico: int) -> bool:
        """The retry of a request given up on: its reservation given back and taken again,
        waiting for room like any request. False when it cannot fit even with nothing else in
        flight; the reservation is then held again, for the caller's ``settle`` to release."""
        if not self.active:
            return True
        self.reserved -= worst_pico
        self.in_flight -= 1
        self._released.set()
        try:
            if await self.reserve(worst_pico):
                return True
        except BaseException:
            self.reserved += worst_pico
            self.in_flight += 1
            raise
        self.reserved += worst_pico
        self.in_flight += 1
        return False


def advice(
    spent_pico: int,
    refused_pico: int,
    rows: tuple[int, int],
    cost_pico: int,
    paid_rows: int,
    command: str,
    cap_pico: int | None = None,
) -> tuple[str, str] | None:
    """After a --max-cost stop: what to do, and the command to do it with (``command`` with a
    cap that finishes the rows left), or None when nothing is left or there is nothing to
    project from. ``rows``: the rows pending and the rows to send again (engine/left.py: the
    invalid and failed rows under --retry-errors, the changed ones under --refresh-changed,
    which keep their entries until replaced). ``spent_pico`` is what the output has spent in
    all (``Budget.spent``), ``refused_pico`` the worst case of the request that did not fit
    (``Budget.refused``), ``cap_pico`` the cap that stopped the run; one machine's run and a
    cluster's (cluster/results.py) give the same advice.

    The cap is what is spent (never less than the cap that stopped it), the pending rows at the
    output's cost a paid row so far (rows an identical row or the cache answered cost nothing
    and are left out) plus a quarter, the rows to send again at the worst case of the request
    that did not fit (an invalid row took every re-ask, a changed row's text is new: neither is
    a row like the others), and room for that worst case: a cap stops a run only when one more
    request cannot fit. Before any row was paid for, every row left is counted at that
    request's worst case (every reply max_tokens long), which is sure to finish them. So the
    cap is higher than the one that stopped the run by at least what the rows left need, and
    running the command it gives does not stop at the same cap again."""
    pending, again = rows
    if pending + again == 0 or (paid_rows == 0 and refused_pico == 0):
        return None
    # A quarter more than the mean paid row, exact: picodollars as a fraction (no float).
    per_row = Fraction(cost_pico * 5, paid_rows * 4) if paid_rows else Fraction(refused_pico)
    need = pending * per_row + again * max(per_row, Fraction(refused_pico))
    cap = _two_figures_up(max(spent_pico + refused_pico, cap_pico or 0) + need)
    left = plural(pending + again, "row")
    if not paid_rows:
        said = f"${cap} covers the {left} left at the next one's worst case, every reply max_tokens long"
    elif not again:
        said = f"about ${cap} finishes the {left} left, at this output's cost a row so far"
    else:
        worst = (
            "at the next request's worst case"
            if refused_pico > per_row
            else "at this output's cost a row so far"
        )
        sent = f"{plural(again, 'row')} to send again, {worst}"
        said = (
            f"about ${cap} finishes the {left} left: {pending:,} pending at this output's cost a row so far "
            f"and {sent}"
            if pending
            else f"${cap} covers the {sent}"
        )
    return f"to continue, run it with a higher --max-cost ({said})", with_max_cost(command, cap)


def grown_margin(margin: int, worst_pico: int, actual_pico: int) -> int:
    """The margin after a reply that cost ``actual_pico`` against its own worst case
    ``worst_pico`` (without the margin its reservation carried): the most any reply cost over
    its worst case. Never the excess over the reservation plus today's margin: the requests
    reserved before the margin grew would then each add theirs to it (a first wave of 128
    replies 128 times one reply's excess, and a run stopped at a quarter of its cap)."""
    return max(margin, actual_pico - worst_pico)


def _two_figures_up(pico: Fraction | int) -> str:
    """Dollars to two significant figures, rounded up: 0.00313 -> 0.0032."""
    usd = Decimal(math.ceil(pico)) / PICO_PER_USD
    step = Decimal(1).scaleb(usd.adjusted() - 1)
    return format(((usd / step).to_integral_value(ROUND_CEILING) * step).normalize(), "f")


def with_max_cost(command: str, cap: str) -> str:
    """The command again with ``--max-cost`` set to ``cap`` (added when a job file set it)."""
    replaced, n = _MAX_COST.subn(lambda m: f"{m.group(1)}{cap}", command)
    return replaced if n else f"{command} --max-cost {cap}"


_MAX_COST = re.compile(r"(--max-cost(?:=|\s+))'?[^\s']+'?")
