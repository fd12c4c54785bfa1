"""batchllm: batch LLM jobs from CSV/Parquet to Parquet, resumable, rate-limited, exactly costed.

Library use mirrors the CLI::

    import asyncio
    from batchllm import build_job, run_job

    job = build_job({"input": "reviews.csv", "output": "out.parquet",
                     "template": "Classify: {review}", "sandbox": True})
    result = asyncio.run(run_job(job))
    print(result.exit_code, result.summary["cost_usd"])

Names are imported on first use, so ``import batchllm.records`` (or the sandbox) stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"
DISTRIBUTION = "batchllm-cli"  # what `pip install` knows it as: `batchllm` on PyPI is another project

_EXPORTS = {
    "BatchLLMError": "errors",
    "ExitCode": "errors",
    "JobError": "errors",
    "Job": "job",
    "build_job": "job",
    "load_job_file": "jobfile",
    "Request": "records",
    "Message": "records",
    "Completion": "records",
    "RunResult": "engine.runner",
    "run_job": "api",
    "get_provider": "providers",
}

if TYPE_CHECKING:
    from .api import run_job
    from .engine.runner import RunResult
    from .errors import BatchLLMError, ExitCode, JobError
    from .job import Job, build_job
    from .jobfile import load_job_file
    from .providers import get_provider
    from .records import Completion, Message, Request


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'batchllm' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = [
    "BatchLLMError",
    "Completion",
    "ExitCode",
    "Job",
    "JobError",
    "Message",
    "Request",
    "RunResult",
    "__version__",
    "build_job",
    "get_provider",
    "load_job_file",
    "run_job",
]
