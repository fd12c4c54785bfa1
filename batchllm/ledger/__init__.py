"""The spend ledger: every run's record across outputs, jobs and months (see store.py)."""

from .record import MonthAllowance, RunRecord, of_job
from .recover import Sent
from .store import Snapshot, ledger_path, month_bounds, open_readonly

__all__ = [
    "MonthAllowance",
    "RunRecord",
    "Sent",
    "of_job",
    "Snapshot",
    "ledger_path",
    "month_bounds",
    "open_readonly",
]
