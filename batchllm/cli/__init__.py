"""The command line: parse flags, call the library, turn errors into exit codes. Nothing else.

Every command is a thin client of the library (``batchllm.api.run_job``, ``reports.estimate``,
``reports.report``...); ``asyncio.run`` appears here and nowhere else. Every command maps errors
the same way (``handles_errors``): a ``BatchLLMError`` found before anything was sent is printed
as one line (no traceback, or one JSON object with ``--log-format json``) with its exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shlex
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TypeVar

import click

from .. import __version__
from ..errors import EXIT_CODE_HELP, BatchLLMError, ExitCode, JobError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
T = TypeVar("T")


def fail(message: str, code: int = ExitCode.USAGE) -> int:
    for line in message.splitlines() or [""]:  # several problems found at once: a line each
        click.echo(f"batchllm: error: {line}", err=True)
    return int(code)


def report_error(exc: BatchLLMError, log_format: str | None = "text") -> int:
    if log_format == "json":
        from .progress import JsonReporter

        JsonReporter().error(str(exc))
        return int(exc.exit_code)
    return fail(str(exc), exc.exit_code)


def handles_errors(command: Callable[..., int]) -> Callable[..., int]:
    """The one place a command's ``BatchLLMError`` becomes its exit code, text or JSON."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        try:
            return command(*args, **kwargs)
        except BatchLLMError as exc:
            return report_error(exc, kwargs.get("log_format"))

    return wrapper


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run on the standard asyncio loop. uvloop was tried and measured slower here, for the run
    (20,000 rows at zero latency, and 2,000 in flight at 200 ms) and for the sandbox alike."""
    return asyncio.run(coro)


def command_line(argv: list[str] | None = None) -> str:
    """The command to resume with: as typed, less ``--restart`` (which would discard the journal).

    It never contains the key: keys come from the environment or a file, never from a flag.
    """
    args = sys.argv[1:] if argv is None else argv
    return " ".join(shlex.quote(a) for a in ["batchllm", *(a for a in args if a != "--restart")])


@click.group(
    context_settings=CONTEXT,
    epilog=EXIT_CODE_HELP
    + "\n\nExample:\n\n  batchllm run sample_data/reviews.csv -o out/reviews.parquet --template 'Classify: {review}' --sandbox",
)
@click.version_option(__version__, prog_name="batchllm")
def cli() -> None:
    """Run a file of prompts through an LLM API: resumable, rate-limited, exactly costed.

    Reads CSV, Parquet or JSON Lines (rows, or a batch request file), sends one request per row to the Dataoorts API, any OpenAI-compatible
    server (--provider openai), or the built-in sandbox, and writes every input row back to
    Parquet with its response, token usage and cost.
    """


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    _leave(_main())


def _main() -> int:
    # Until a run installs its graceful handlers, SIGTERM stops like Ctrl-C: exit 130, no traceback.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        code = cli.main(standalone_mode=False, prog_name="batchllm")
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("batchllm: aborted", err=True)
        return int(ExitCode.INTERRUPTED)
    except click.UsageError as exc:
        # One line, like every other error: what is wrong and where to read more.
        command = exc.ctx.command_path if exc.ctx is not None else "batchllm"
        return _refuse(f"{exc.format_message()} (see `{command} --help`)", exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except JobError as exc:
        return _refuse(str(exc), ExitCode.USAGE)
    return code if isinstance(code, int) else 0


def _refuse(message: str, code: int) -> int:
    """An error found while the command line was read: JSON when the line asked for JSON logs,
    though it could not be read (a scheduler parsing stderr must not meet a plain line)."""
    args = sys.argv[1:]
    asked = "--log-format=json" in args or any(
        a == "--log-format" and b == "json" for a, b in zip(args, args[1:], strict=False)
    )
    if asked:
        from .progress import JsonReporter

        JsonReporter().error(message)
        return int(code)
    return fail(message, code)


def _leave(code: int) -> NoReturn:
    """Exit with ``code`` once the command is done, without tearing the interpreter down.

    Arrow's native thread pools can abort a process during interpreter teardown ("terminate called
    without an active exception", exit -6: apache/arrow#34314), rarely, and after the command's work
    and exit code are settled; a cron job must never see that. Everything a command writes goes
    through file descriptors it has closed or synced (journal, output, ledger) before it returns,
    so the streams and log handlers are all that is left to flush.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more to say
            stream.flush()
    os._exit(code)


# The commands register themselves on ``cli``.
from . import batch as _batch  # noqa: E402,F401
from . import review as _review  # noqa: E402,F401
from . import run as _run  # noqa: E402,F401
from . import sandbox as _sandbox  # noqa: E402,F401
from . import spend as _spend  # noqa: E402,F401
from . import start as _start  # noqa: E402,F401
from . import tools as _tools  # noqa: E402,F401

if __name__ == "__main__":
    main()
