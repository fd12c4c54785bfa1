"""The sandbox's server-side rate limit (``rate_limit``/``rate_burst``): a generic cell rate
algorithm, which answers how long a request waits and what ``x-ratelimit-*`` headers state."""

from __future__ import annotations

import math


class Gcra:
    """Generic cell rate algorithm: ``rate``/s, up to ``burst`` back to back."""

    def __init__(self, rate: float, burst: int) -> None:
        self.interval = 1.0 / rate
        self.tolerance = (max(1, burst) - 1) * self.interval
        self.tat = 0.0

    def admit(self, now: float) -> float:
        """0 when admitted, else seconds until a request would be."""
        allowed_at = self.tat - self.tolerance
        if now < allowed_at:
            return allowed_at - now
        self.tat = max(now, self.tat) + self.interval
        return 0.0

    def remaining(self, now: float) -> tuple[int, float]:
        """(requests that could be admitted back to back now, seconds until all could)."""
        backlog = max(0.0, self.tat - now)
        return max(0, math.floor((self.tolerance - backlog) / self.interval) + 1), backlog
