"""What the driver checks before Ray starts, as a local run does before it sends anything
(engine/reopen.py), and how an error of ours raised on the cluster reaches the user.

- ``open_journal``: the journal opened here with this run's settings, so a journal written with
  other settings is refused (``SettingsMismatch``, exit 2, the full message) before a cluster is
  started or joined; ``--restart`` discards it here, once (the coordinator opens what is left).
- ``check_servers``: an output's answers are all play money or all real (``refuse_mixed_answers``,
  the local engine's own check and words); the journal and the ledger are then marked with whose
  answers they get (``answers_mark``): ``status``, ``report`` and the summary say play money.
- ``own_error``: a ``BatchLLMError`` raised inside the Ray job (the coordinator, an actor) is
  raised again as itself, its own message and exit code, never as "the Ray job failed" (exit 75:
  try again later), which a scheduler would retry for ever. The coordinator keeps the first one
  (``Coordinator.fail``), since Ray reports an actor that failed to start only as text; Ray's own
  wrapping (``RayTaskError.cause``) is read too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..engine.client import Client
from ..engine.counts import plural
from ..engine.journal import Journal
from ..engine.journal_schema import DB_NAME
from ..engine.reopen import answers_mark, refuse_mixed_answers
from ..engine.runner import Endpoint
from ..errors import BatchLLMError
from ..job import Job
from ..ledger import Snapshot
from ..providers import Provider, get_provider

ASK_FOR = 10.0  # seconds the coordinator has to say what failed, after the job did


def open_journal(job: Job, warn: Callable[[str], None]) -> Journal:
    """The run's journal, open, refused as a local run's is when written with other settings."""
    journal = Journal.open(job.journal_dir, job.request_settings(), restart=job.restart)
    if journal.discarded is not None:  # failed rows only, nothing paid: gone, as locally
        failed, diffs = journal.discarded
        warn(
            f"discarded the {plural(failed, 'failed row')} of {job.journal_dir} written with other "
            f"settings ({diffs}): nothing in it was answered or paid for; sent again with these"
        )
    return journal


async def check_servers(job: Job, journal: Journal, endpoint: Endpoint, provider: Provider) -> bool | None:
    """Refuse servers whose answers would mix play money with real ones in the output, asking a
    server on this machine or its network whether it is batchllm's sandbox; then mark the journal
    with whose answers this run brings, before any is sent. Returns that mark, for the ledger's
    record (``RunRecord.mark_sandbox``): None when no server said and the run is not --sandbox."""
    fleet = endpoint.fleet or job.fleet
    if fleet is not None:
        clients = [Client(get_provider(e.provider), e.endpoint, None, concurrency=1, timeout=job.timeout)
                   for e in fleet]  # fmt: skip
    else:
        clients = [Client(provider, endpoint.url, None, concurrency=1, timeout=job.timeout)]
    async with contextlib.AsyncExitStack() as stack:
        for client in clients:
            await stack.enter_async_context(client)
        await refuse_mixed_answers(journal, clients, job.output, job.sandbox)
    # A public host is never the sandbox (as its first answer would say); a server here that did
    # not answer the question is not known yet.
    said = [c.played if c.played is not None else None if c.local else False for c in clients]
    answered = [played for played in said if played is not None]
    if not answered and not job.sandbox:
        return None
    marked: list[bool] = []  # as a local run's first answers mark it (client.watch_played)
    answers_mark(journal, marked.append, job.sandbox)(bool(answered) and all(answered))
    return marked[0]


def own_error(exc: BaseException) -> BatchLLMError | None:
    """The ``BatchLLMError`` behind an error Ray raised, if one is: Ray's ``RayTaskError`` keeps
    the exception a task raised as ``cause`` (and poses as its class), Ray Data chains its own."""
    from ray.exceptions import RayError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, BatchLLMError) and not isinstance(current, RayError):
            return current
        cause = getattr(current, "cause", None)
        current = cause if isinstance(cause, BaseException) else current.__cause__ or current.__context__
    return None


async def raise_failure(coordinator: Any, exc: BaseException | None = None) -> None:
    """Raise the ``BatchLLMError`` the Ray job met (the coordinator's, or ``exc``'s own), if any."""
    from ray.exceptions import RayError

    failure: BatchLLMError | None = None
    # The coordinator gone with the cluster (or past answering): Ray's error stands.
    with contextlib.suppress(RayError, TimeoutError):
        failure = await asyncio.wait_for(coordinator.failed.remote(), ASK_FOR)
    failure = failure or (own_error(exc) if exc is not None else None)
    if failure is not None:
        raise failure from None


def journal_snapshot(directory: Path) -> Snapshot:
    """The journal's totals now (read-only; the coordinator owns it while Ray runs), zeros if none."""
    if not (directory / DB_NAME).is_file():
        return Snapshot()
    journal = Journal.open_readonly(directory)
    try:
        return Snapshot.of(journal.totals())
    finally:
        journal.conn.close()


def maybe_billed(directory: Path) -> dict[str, int]:
    """Requests the journal counts as maybe billed now, a dead run's in flight among them."""
    if not (directory / DB_NAME).is_file():
        return {"requests": 0, "worst_pico": 0}
    journal = Journal.open_readonly(directory)
    try:
        return journal.maybe_billed()
    finally:
        journal.conn.close()
