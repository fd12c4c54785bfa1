"""The budget guard behind ``--max-cost``: the run never spends more than the cap.

Before a request leaves, its worst case (its exact prompt cost plus ``max_tokens`` at the output
price) is reserved against what remains; when the usage comes back the reservation is replaced by
the real cost. Spending can therefore never pass the cap, whatever the replies turn out to be.
Everything is integer picodollars (see pricing.py), so the comparison is exact.

The cap covers the whole output: what earlier runs of the same journal spent counts too, so
``--max-cost 5`` means "this output may cost $5 in all", and a later run with a higher cap resumes.
"""

from __future__ import annotations

import asyncio


class Budget:
    def __init__(self, cap_pico: int | None, spent_before_pico: int = 0) -> None:
        self.cap = cap_pico
        self.spent = spent_before_pico
        self.reserved = 0
        self.in_flight = 0
        self._released = asyncio.Event()

    @property
    def remaining(self) -> int | None:
        return None if self.cap is None else self.cap - self.spent - self.reserved

    async def reserve(self, worst_pico: int) -> bool:
        """Reserve ``worst_pico``, waiting for in-flight reservations to settle if that helps.

        False when it cannot fit even with nothing in flight: the budget is spent.
        """
        if self.cap is None:
            return True
        while True:
            if self.spent + self.reserved + worst_pico <= self.cap:
                self.reserved += worst_pico
                self.in_flight += 1
                return True
            if self.in_flight == 0:
                return False
            self._released.clear()
            await self._released.wait()

    def settle(self, reserved_pico: int, actual_pico: int) -> None:
        """A reserved request ended: ``actual_pico`` was billed (0 if it failed)."""
        if self.cap is None:
            self.spent += actual_pico
            return
        self.reserved -= reserved_pico
        self.in_flight -= 1
        self.spent += actual_pico
        self._released.set()
