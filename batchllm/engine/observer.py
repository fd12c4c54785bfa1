"""What the engine tells whoever watches a run; the CLI's progress display is one such observer.

The engine calls these methods and never imports a display: a library user passes nothing and
hears nothing, or passes an object with the same methods.
"""

from __future__ import annotations

from typing import Any, Protocol


class Observer(Protocol):
    interval: float  # seconds between progress snapshots

    def start(self, info: dict[str, Any]) -> None: ...
    def progress(self, snapshot: dict[str, Any]) -> None: ...
    def warning(self, message: str) -> None: ...
    def stopped(self, reason: str, message: str) -> None: ...


class Silent:
    """The observer of a library call that passed none."""

    interval = 1.0

    def start(self, info: dict[str, Any]) -> None:
        pass

    def progress(self, snapshot: dict[str, Any]) -> None:
        pass

    def warning(self, message: str) -> None:
        pass

    def stopped(self, reason: str, message: str) -> None:
        pass
