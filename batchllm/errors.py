"""The exception tree, and the exit codes it maps to.

    BatchLLMError                      anything batchllm raises on purpose
    ├── JobError                       bad flags, job file or input: exit 2, nothing sent
    │   └── SettingsMismatch           the journal was written with other settings
    ├── LockedError                    another run holds the checkpoint: exit 75
    ├── StudioError                    Label Studio unreachable or failing (5xx): exit 75
    │   └── StudioKeyError             it refused LABEL_STUDIO_API_KEY: exit 4
    └── APIError                       raised at the HTTP boundary only: a provider's ``parse``
        │                              (providers/) and the transport (engine/client.py)
        ├── RetryableAPIError          408/409/429/5xx, timeouts, dropped connections, garbled bodies;
        │                              carries ``retry_after`` when the server named a wait
        │   └── RequestTimeout         no answer within --timeout (the server may still be computing)
        └── FatalAPIError              400/404/413 and other client errors: this row fails for good
            └── RunStopError           a rejected key, an exhausted quota or a model the server
                                       does not have (``reason``): no further row can succeed,
                                       so the whole run stops (exit 4)

A row that fails for good is not an exception that escapes: the dispatcher records it on its row
(``status = "error"``) with ``APIError.describe()`` and carries on.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Exit codes, one table for the README, ``--help`` and the scheduler."""

    OK = 0  # every row ok
    ROW_ERRORS = 1  # finished, some rows failed
    USAGE = 2  # usage, configuration or input error
    BUDGET = 3  # --max-cost, --max-cost-per-run or --max-cost-per-month reached
    API_STOP = 4  # stopped by the API: bad key, quota, too many errors
    IO_ERROR = 74  # the checkpoint could not be written (disk full?)
    TEMPFAIL = 75  # locked by another run, or --max-runtime reached: try again later
    INTERRUPTED = 130  # SIGINT / SIGTERM


EXIT_CODE_TABLE = """\
Exit codes:
  0    every row ok (or without a prompt: never sent)
  1    finished, some rows failed (see the error column)
  2    usage, configuration or input error (nothing was sent)
  3    a budget reached (--max-cost, -per-run, -per-month): a later run resumes
  4    stopped by the API: bad key, exhausted quota, or too many errors
  74   the checkpoint could not be written (disk full?): replies were rescued
  75   locked, --max-runtime reached or the Ray job failed: try again later
  130  interrupted (SIGINT/SIGTERM); run the same command again to resume"""

# For click's --help: "\b" keeps the table's lines as they are (one line a code), unwrapped.
EXIT_CODE_HELP = "\b\n" + EXIT_CODE_TABLE


class BatchLLMError(Exception):
    """Base of every error batchllm raises on purpose."""

    exit_code: ExitCode = ExitCode.USAGE


class JobError(BatchLLMError):
    """Bad flags, job file or input; raised before anything is sent (exit 2)."""

    exit_code = ExitCode.USAGE


class SettingsMismatch(JobError):
    """The journal on disk was written by a run with other request settings."""


class LockedError(BatchLLMError):
    """Another live process holds this checkpoint (exit 75)."""

    exit_code = ExitCode.TEMPFAIL


class ClusterError(BatchLLMError):
    """The Ray job itself failed (a lost node or coordinator, not a row): try again later (exit 75);
    every reply received is in the journal, so the next run resumes."""

    exit_code = ExitCode.TEMPFAIL


class APIError(BatchLLMError):
    """A request that did not produce a usable completion.

    ``status`` is the HTTP status (None when no response arrived), ``code`` the API's error code
    when the body carried one, ``message`` the API's own text, kept raw for the row's ``error``.
    """

    exit_code = ExitCode.API_STOP
    kind = "api_error"

    def __init__(self, message: str, status: int | None = None, code: int | str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code

    def describe(self) -> str:
        """One line for the row's ``error`` column: class, HTTP status, API code, message."""
        return f"{type(self).__name__}{' ' if self._head() else ': '}{self.said()}"

    def said(self) -> str:
        """What the server said, for a person reading a stop: HTTP status, API code, message."""
        head = self._head()
        return f"{head}: {self.message}" if head else self.message

    def _head(self) -> str:
        parts = []
        if self.status is not None:
            parts.append(f"HTTP {self.status}")
        if self.code is not None:
            parts.append(f"code {self.code}")
        return " ".join(parts)


class RetryableAPIError(APIError):
    """Transient: the same request may succeed later."""

    kind = "retryable"

    def __init__(
        self,
        message: str,
        status: int | None = None,
        code: int | str | None = None,
        retry_after: float | None = None,
        unsent: bool = False,
    ):
        super().__init__(message, status, code)
        self.retry_after = retry_after
        # The connection could not be made: the server never had it, so it cannot have billed it.
        self.unsent = unsent

    @property
    def throttled(self) -> bool:
        """The server said it is over capacity (429): the whole pool should slow down."""
        return self.status == 429


class RequestTimeout(RetryableAPIError):
    """No answer within ``--timeout``: perhaps a queue at the server (engine/concurrency.py)."""


class FatalAPIError(APIError):
    """The API rejected this request for good; retrying would fail (and maybe bill) again."""

    kind = "fatal"


class RunStopError(FatalAPIError):
    """No request can succeed until a person acts: ``reason`` is "auth" (the key), "quota",
    "model" (the server does not serve the job's model), "structured" (it refuses the
    response_format ``--structured on`` insists on) or "confidence" (it refuses the logprobs
    ``--confidence logprobs`` insists on)."""

    kind = "run_stop"

    def __init__(
        self, message: str, status: int | None = None, code: int | str | None = None, *, reason: str = "auth"
    ):
        super().__init__(message, status, code)
        self.reason = reason


class StudioError(BatchLLMError):
    """Label Studio did not answer, or answered 5xx (``batchllm review``): try again later."""

    exit_code = ExitCode.TEMPFAIL


class StudioKeyError(StudioError):
    """Label Studio refused the key in ``LABEL_STUDIO_API_KEY``."""

    exit_code = ExitCode.API_STOP
