"""``--engine ray``: the job on Ray Data, and ``complete`` for pipelines that already have a Dataset.

    input files -> ray.data.read_* -> map_batches(Completer, actor pool) -> write_parquet(dir)
                                          |  slots, budget, rows
                                     Coordinator (one actor, on this node, with the journal)

The driver checks the job against the input's schema before Ray starts (a missing column is the
same one-line error as a local run's), starts a local Ray or joins ``--ray-address``, creates the
coordinator next to the journal, and writes the output into a temporary directory that replaces
OUTPUT only when complete. Resume is the journal's: a second run finds every row done and sends
nothing (and rewrites the same output). Ray Data's own checkpointing is not used: it commits per
written block, so every row of a block in flight at a crash would be paid for again, and it needs
a unique id column; the journal keeps each reply as it arrives.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from .. import DISTRIBUTION
from ..access import resolve_api_key
from ..engine.checks import check_columns, check_model
from ..engine.lock import RunLock
from ..engine.observer import Observer, Silent
from ..engine.reopen import restart_notice
from ..engine.runner import Endpoint, RunResult
from ..engine.stats import StopReason
from ..errors import BatchLLMError, ClusterError, JobError
from ..inputs import InputFile
from ..job import Job
from ..ledger import RunRecord, Snapshot, of_job
from ..pricing import Model
from ..prompts import load_examples
from ..providers import Provider, get_provider
from ..sniff import is_utf8
from .coordinator import Coordinator
from .input_files import count_rows, input_files, read_dataset
from .opening import check_servers, journal_snapshot, maybe_billed, open_journal, raise_failure
from .results import ClusterSetup, answered_already, result
from .worker import Completer, fleet_keys, fleet_share, per_actor

RAY_HINT = f"--engine ray needs Ray: pip install '{DISTRIBUTION}[ray]'"


def import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise JobError(RAY_HINT) from None
    return ray


def _absolute(job: Job) -> Job:
    """Actors on other nodes (or in another directory) must see the same paths."""
    return dataclasses.replace(
        job,
        input=Path(os.path.abspath(job.input)),
        output=Path(os.path.abspath(job.output)),
        checkpoint=Path(os.path.abspath(job.journal_dir)),
    )


def check_input(job: Job) -> tuple[list[str], InputFile, Provider, Model]:
    """Everything checked before Ray starts: Ray itself, the files, columns, model and prices."""
    import_ray()
    files, source = input_files(job.input, job.input_format, job.delimiter)
    encoding = job.encoding if source.encoding == "utf-8" and job.encoding else source.encoding
    if source.format == "csv" and not is_utf8(encoding):
        raise JobError(
            f"{source.path}: is {encoding} text; --engine ray reads UTF-8 CSV files: convert it "
            f"(iconv -f {encoding} -t utf-8), or run it on the local engine"
        )
    provider = get_provider(job.provider)
    model = check_model(job, provider)
    check_columns(job, source.columns, str(job.input))
    if job.output.exists() and not job.output.is_dir():
        raise JobError(f"{job.output}: is a file; --engine ray writes a directory of Parquet files there")
    return files, source, provider, model


def complete(
    ds: Any,
    job: Job,
    *,
    endpoint: Endpoint | None = None,
    coordinator: Any = None,
    columns: list[str] | None = None,
    batch_size: int | None = None,
) -> Any:
    """``ds`` with the job's output columns added: a lazy ``ray.data.Dataset``.

    For pipelines: ``complete(ray.data.read_parquet(...), build_job({...}))``. Without a
    coordinator one is started on this node with the journal in ``job.journal_dir``; it lives as
    long as the returned dataset does. ``job.actors`` actors share ``job.concurrency`` requests
    in flight, one rate limit and one budget.
    """
    ray = import_ray()
    job = _absolute(job)
    provider = get_provider(job.provider)
    check_model(job, provider)
    names = columns if columns is not None else list(ds.schema().names)
    check_columns(job, names, str(job.input))
    if endpoint is None:
        endpoint = Endpoint(job.endpoint, resolve_api_key(job))
    if coordinator is None:
        coordinator = start_coordinator(ray, job)
        if (failure := ray.get(coordinator.failed.remote())) is not None:  # its journal refused
            raise failure
    concurrency = per_actor(job.concurrency, job.actors)
    return ds.map_batches(
        Completer,
        fn_constructor_kwargs={
            "job": job,
            "url": endpoint.url,
            "key": endpoint.key,
            "coordinator": coordinator,
            "columns": names,
            "examples": load_examples(job),
            "concurrency": concurrency,
            "fleet": fleet_share(endpoint.fleet or job.fleet, job.actors) if job.fleet else None,
            "keys": fleet_keys(endpoint.fleet or job.fleet, endpoint.keys) if job.fleet else None,
        },
        batch_size=batch_size or min(1024, max(16, 2 * concurrency)),
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(
            size=job.actors, max_tasks_in_flight_per_actor=2, max_concurrent_calls_per_actor=2
        ),
        num_cpus=0.25,  # I/O-bound: leave the CPUs to reading and writing
        udf_modifying_row_count=False,
    )


def start_coordinator(ray: Any, job: Job) -> Any:
    """The coordinator actor, on this node (the journal is on its disk)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    actor = ray.remote(Coordinator).options(
        num_cpus=0,
        max_concurrency=1000,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
    )
    return actor.remote(job)


def _init_ray(ray: Any, address: str | None) -> None:
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "error"}
    if address is None:
        # "local": a new Ray even when a cluster runs on this machine (``ray start``), which a
        # bare ray.init() would join.
        address = "local"
        # A private Ray for this run, on loopback only; actors take a quarter CPU each.
        options["num_cpus"] = max(4, os.cpu_count() or 1)
        options["_node_ip_address"] = "127.0.0.1"
    try:
        ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise JobError(f"--ray-address {address}: cannot join the cluster ({exc})") from None


def _quiet() -> None:
    """Ray Data reports progress and advice of its own on stderr; the CLI's observer reports ours.

    Ray's C++ core worker logs at error level that Ray Data's actors keep their constructor
    arguments in the object store (ray-project/ray#53727): true of every run, and no error of
    ours; a failed run is reported by the driver (``ClusterError``) all the same. Ray Data's
    errors are said by the driver too (an error of ours as itself, opening.py): not twice.
    """
    logging.getLogger("ray").setLevel(logging.ERROR)
    for name in ("ray.data", "ray.data._internal"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module=r"ray\..*")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")


def _replace_dir(tmp: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


async def run_on_ray(
    job: Job,
    *,
    endpoint: Endpoint,
    observer: Observer | None = None,
    command: str = "batchllm run",
    handle_signals: bool = False,
) -> RunResult:
    """Run a job on Ray to the end (or a stop) and write OUTPUT as a directory of Parquet files."""
    ray = import_ray()
    given, job = job, _absolute(job)  # the paths as given, for messages as a local run's
    files, source, provider, model = check_input(job)
    observer = observer or Silent()
    lock = RunLock(job.journal_dir)
    lock.acquire(command)
    try:
        if discarded := restart_notice(job):
            observer.warning(discarded)
        # Checked here, before Ray starts, as a local run checks before it sends (opening.py).
        journal = open_journal(given, observer.warning)  # written with other settings: exit 2
        try:
            played = await check_servers(given, journal, endpoint, provider)  # play money, or real
        finally:
            journal.close()  # the coordinator's on the cluster
        start = Snapshot() if job.restart else journal_snapshot(job.journal_dir)
        billed_before = {"requests": 0, "worst_pico": 0} if job.restart else maybe_billed(job.journal_dir)
        record = RunRecord.begin(
            **of_job(job), kind="run", provider=provider.name, model=model.name, engine="ray",
            endpoint="sandbox" if job.sandbox else endpoint.url, rows_total=None, start=start,
            lost=(0, 0), warn=observer.warning, priced=model.prices is not None,
        )  # fmt: skip
        if played is not None:
            record.mark_sandbox(played)
        if job.max_cost_per_month_pico is not None:
            # The actors lease from one budget: the month's rest is held once, as this run's cap.
            month = record.month_allowance(job.name, job.max_cost_per_month_pico, 0)
            room = month.claim_rest()
            run_cap = room if job.max_cost_per_run_pico is None else min(room, job.max_cost_per_run_pico)
            job = dataclasses.replace(job, max_cost_per_run_pico=run_cap)
        try:
            done = await _send(ray, job, files, source, provider, model, endpoint, observer, command,
                               handle_signals)  # fmt: skip
        except BaseException as exc:
            code = int(exc.exit_code) if isinstance(exc, BatchLLMError) else None  # as a local run's
            failed = {"message": f"the run failed: {exc}" if code else "the run failed", "exit_code": code}
            record.finish(failed, start, journal_snapshot(job.journal_dir), billed_before)
            raise
        record.finish(done.summary, start, journal_snapshot(job.journal_dir), billed_before)
        return done
    finally:
        lock.release()


async def _send(
    ray: Any,
    job: Job,
    files: list[str],
    source: InputFile,
    provider: Provider,
    model: Model,
    endpoint: Endpoint,
    observer: Observer,
    command: str,
    handle_signals: bool,
) -> RunResult:
    try:
        answered = answered_already(job, files, source)
        if answered is not None:  # nothing left to send: no cluster to start
            observer.warning("every row is in the journal already: nothing to send (Ray not started)")
            return answered
        return await _run(ray, job, files, source, ClusterSetup(job, provider, model), endpoint, observer,
                          command, handle_signals)  # fmt: skip
    except ray.exceptions.RayError as exc:  # the cluster failed, not a row: one line, exit 75
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1].split(". ")[0][:200]
        raise ClusterError(
            f"the Ray job failed ({first}); every reply received is in {job.journal_dir}: "
            "run the same command again to resume"
        ) from None


async def _run(
    ray: Any,
    job: Job,
    files: list[str],
    source: InputFile,
    setup: ClusterSetup,
    endpoint: Endpoint,
    observer: Observer,
    command: str,
    handle_signals: bool,
) -> RunResult:
    started_at, t0 = time.time(), time.monotonic()
    _quiet()
    own = not ray.is_initialized()
    if own:
        await asyncio.to_thread(_init_ray, ray, job.ray_address)
    coordinator = None
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # the output in input order
        ctx.enable_progress_bars = False
        # The driver opened the journal (and discarded it for --restart) already: opening.py.
        coordinator = start_coordinator(ray, dataclasses.replace(job, restart=False))
        await raise_failure(coordinator)
        ds = complete(read_dataset(ray, files, source), job, endpoint=endpoint, coordinator=coordinator,
                      columns=source.columns)  # fmt: skip
        rows = count_rows(files, source)
        await coordinator.note_run.remote(command, rows)
        done_before = await coordinator.done_before.remote()
        observer.start(
            {
                "input": str(job.input),
                "output": str(job.output),
                "rows": rows,
                "todo": max(0, rows - done_before),
                "done_before": done_before,
                "provider": setup.provider.name,
                "model": setup.model.name,
                "endpoint": endpoint.url,
                "checkpoint": str(job.journal_dir),
                "engine": f"ray ({job.actors} actors)",
                "startup_s": round(time.monotonic() - t0, 3),
            }
        )
        tmp = job.output.with_name(f".{job.output.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        stop = _Stopper(coordinator, job)
        uninstall = stop.install(handle_signals)
        writer = asyncio.ensure_future(asyncio.to_thread(ds.write_parquet, str(tmp)))
        try:
            while not writer.done():
                await asyncio.wait({writer}, timeout=observer.interval)
                observer.progress(await coordinator.snapshot.remote())
            writer.result()
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            uninstall()
        _replace_dir(tmp, job.output)
        done = await coordinator.finish.remote()
    except ray.exceptions.RayError as exc:  # an error of ours inside the job is said as itself
        if coordinator is not None:
            await raise_failure(coordinator, exc)
        raise
    finally:
        if own:
            ray.shutdown()
    return result(job, setup, done, started_at, command, observer)


class _Stopper:
    """Signals and ``--max-runtime`` stop the whole cluster through the coordinator."""

    def __init__(self, coordinator: Any, job: Job) -> None:
        self.coordinator = coordinator
        self.job = job

    def install(self, handle_signals: bool) -> Any:
        loop = asyncio.get_running_loop()
        installed: list[int] = []
        timer = None
        if self.job.max_runtime is not None:
            timer = loop.call_later(
                self.job.max_runtime,
                lambda: self.coordinator.stop.remote(
                    StopReason.RUNTIME.value, f"--max-runtime {self.job.max_runtime:g} s reached"
                ),
            )
        if handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._on_signal, sig)
                installed.append(sig)

        def uninstall() -> None:
            for sig in installed:
                loop.remove_signal_handler(sig)
            if timer is not None:
                timer.cancel()

        return uninstall

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        self.coordinator.stop.remote(StopReason.INTERRUPTED.value, f"interrupted by {name}")
