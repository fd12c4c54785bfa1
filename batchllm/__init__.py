"""batchllm: batch LLM jobs from CSV/Parquet to Parquet, resumable, rate-limited, exactly costed.

Library use mirrors the CLI::

    import asyncio
    from batchllm import build_job, run_job

    job = build_job({"input": "reviews.csv", "output": "out.parquet",
                     "template": "Classify: {review}", "sandbox": True})
    result = asyncio.run(run_job(job))
    print(result.exit_code, result.summary["cost_usd"])
"""

__version__ = "0.1.0"

from .errors import BatchLLMError, ExitCode, JobError  # noqa: E402
from .job import Job, build_job  # noqa: E402
from .runner import RunResult, run_job  # noqa: E402

__all__ = ["BatchLLMError", "ExitCode", "Job", "JobError", "RunResult", "__version__", "build_job", "run_job"]
