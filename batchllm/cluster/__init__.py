"""The same job on Ray Data: ``batchllm run --engine ray``, and ``complete`` for pipelines.

Optional: ``pip install 'batchllm-cli[ray]'``; nothing here is imported by a local run.

    driver.py       the run: check, start or join Ray, read, complete, write, summarise
    opening.py      the journal and servers checked before Ray starts; our errors from the cluster
    worker.py       the map_batches UDF: the local engine's dispatcher behind leased seams
    seams.py        those seams: leased slots and budget, a row gate, a ledger sent to the journal
    results.py      the run's result and summary; the answer when nothing is left to send
    coordinator.py  one actor: the cluster's rate limit, budget and journal
"""

from __future__ import annotations

from typing import Any

__all__ = ["complete", "run_on_ray"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import driver

        return getattr(driver, name)
    raise AttributeError(name)
