"""``--notify URL``: POST the run's summary when it ends, so a scheduler's owner hears of it.

The body is the ``--summary-json`` document plus ``text``, one line a person reads (what Slack,
Mattermost and Google Chat webhooks display; Discord takes the same body at its webhook URL with
``/slack`` appended); a healthchecks-style ping URL takes any body, and ``{exit_code}`` in the URL
is replaced so a failing run pings ``/<uuid>/1``. The summary never holds the API key, and the URL
itself (which may hold a webhook's token) is never printed: warnings name its host only.

A notification is best effort: one attempt of up to ``ATTEMPT_S`` seconds, one retry, and the
whole never more than ``TOTAL_S`` seconds, so it never delays the exit by more than that and
never changes the run's exit code.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import orjson

from . import __version__
from .errors import JobError

ATTEMPT_S = 4.0
TOTAL_S = 9.0
RETRY_AFTER_S = 0.5


def text_line(summary: Mapping[str, Any]) -> str:
    """``batchllm job 'nightly': exit 0, 1,000 of 1,000 rows ok, $0.0123 (this run)``."""
    rows = summary.get("rows") or {}
    this = summary.get("this_run") or {}
    code = summary.get("exit_code")
    parts = [f"batchllm job {summary.get('job') or summary.get('output')!r}: exit {code}"]
    if rows:
        parts.append(f"{rows.get('ok', 0):,} of {rows.get('total', 0):,} rows ok")
    if this.get("cost_usd") is not None:
        parts.append(f"${this['cost_usd']} this run")
    if summary.get("message"):
        parts.append(str(summary["message"]))
    return ", ".join(parts)


def target(url: str, exit_code: int | None) -> str:
    return url.replace("{exit_code}", "" if exit_code is None else str(exit_code))


async def notify(url: str, summary: Mapping[str, Any], warn: Callable[[str], None]) -> bool:
    """POST ``summary`` to ``url``; True when a 2xx came back. Failures are one warning."""
    import aiohttp  # here: job.py imports this module for notify_url, and not every command sends

    body = orjson.dumps({**summary, "text": text_line(summary)})
    where = target(url, summary.get("exit_code"))
    host = urlsplit(where).hostname
    headers = {"Content-Type": "application/json", "User-Agent": f"batchllm/{__version__}"}
    deadline = time.monotonic() + TOTAL_S
    problem = ""
    for attempt in range(2):
        left = deadline - time.monotonic()
        if left <= 0.2:
            break
        try:
            timeout = aiohttp.ClientTimeout(total=min(ATTEMPT_S, left))
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.post(where, data=body, headers=headers, allow_redirects=True) as resp,
            ):
                await resp.read()
                if 200 <= resp.status < 300:
                    return True
                problem = f"HTTP {resp.status}"
                if resp.status < 500 and resp.status != 429:
                    break  # the receiver refuses this body: asking again will not help
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            problem = type(exc).__name__ if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
            problem = problem.replace(where, host or "the URL")
        if attempt == 0:
            await asyncio.sleep(min(RETRY_AFTER_S, max(0.0, deadline - time.monotonic())))
    warn(f"--notify: could not POST the summary to {host} ({problem}); the run's result stands")
    return False


_ENV_NAME = re.compile(r"\$?\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


def notify_url(value: str, where: str, environ: Mapping[str, str]) -> str:
    """``--notify``: an http(s) URL, or the name of an environment variable holding one (``NAME``,
    ``$NAME`` or ``${NAME}``), so a webhook's secret need not sit in a job file."""
    named = _ENV_NAME.fullmatch(value.strip())
    if named is not None and "://" not in value:
        name = named.group(1)
        if not environ.get(name):
            raise JobError(f"{where}: the environment variable {name} (the URL to notify) is not set")
        value = environ[name]
        where = f"{where} (from {name})"
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # The URL may carry a secret token: name only its form, never echo it.
        raise JobError(f"{where} is not an http(s) URL with a host")
    return value
