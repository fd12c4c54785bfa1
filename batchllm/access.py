"""Where requests go and with which key: the endpoint's form, and the key, never shown.

The key comes from ``--api-key-file`` or an environment variable (the provider's own, or
``--api-key-env``), never from a flag or a job file, so it never reaches a command line, a log,
a journal or an output. It is never sent in clear text across a network: plain http carries one
only to this machine.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from .errors import JobError
from .providers import get_provider
from .sniff import read_text

if TYPE_CHECKING:
    from .job import Job


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_api_key(job: Job, environ: Mapping[str, str] | None = None) -> str | None:
    """The key, from ``--api-key-file`` or the key variable; never logged.

    None when the provider needs none (a local server) and none is set. A key is never sent in
    clear text across a network: plain http carries one only to this machine.
    """
    environ = os.environ if environ is None else environ
    provider = get_provider(job.provider)
    key: str | None
    if job.api_key_file is not None:
        try:
            key = read_text(job.api_key_file, "key file").strip()
        except OSError as exc:
            raise JobError(f"--api-key-file {job.api_key_file}: {exc.strerror}") from None
        if not key:
            raise JobError(f"--api-key-file {job.api_key_file} is empty")
    else:
        key = environ.get(job.key_env, "").strip() or None
    if key is None and (provider.key_required or job.api_key_env):
        raise JobError(
            f"no API key: set the environment variable {job.key_env} (or pass --api-key-file "
            "FILE), or use --sandbox to try batchllm against the built-in emulator"
        )
    parts = urlsplit(job.endpoint)
    if key is not None and parts.scheme == "http" and not is_loopback(parts.hostname or ""):
        raise JobError(
            f"--endpoint {job.endpoint!r}: plain http would send the key in clear text; use https, "
            f"or unset {job.key_env} for a server that needs no key"
        )
    return key


def key_source(job: Job) -> str:
    """Where the key comes from, for messages: never the key itself."""
    if job.api_key_file is not None:
        return f"--api-key-file {job.api_key_file}"
    return f"the environment variable {job.key_env}"
