"""Builds a plan's masters on a Dask cluster through dask.distributed: one task per master.

Every buildable job of the plan is submitted at once as one task (`client.submit`); a flat's
task takes the future of the dark (or bias) it subtracts as an argument, so the scheduler
starts it only once that master is on disk, while independent masters (the bias, the darks
of different exposures) run side by side on different workers. Results are gathered as they
complete: a master that fails does not stop the others.

What travels
------------
A task receives the `Job` (frame paths and header facts), the `Settings` and the work folder;
the worker reads the frames itself from those paths, writes the master into the output
folder (``.name.part``, renamed when complete) and returns a `MasterResult` (statistics, a
few kB) and the log records of the build. No pixel crosses the network. Workers must
therefore see the input and output paths under the same names as the client (a shared
filesystem); each task checks that every input opens before it builds, and says which
worker could not open which path.

Why one task per master and not one per strip
---------------------------------------------
A task that builds a whole master is idempotent: when its worker dies (a nanny restart, a
preempted node) the scheduler runs it again elsewhere, the new attempt recreates the
``.part`` file from scratch, and nothing half-written is ever renamed into place. Spreading
one master's strips over the cluster would let a rerun of the set-up truncate a file that
strips computed by surviving workers had already written (their results are not recomputed),
and would make the in-place normalization of a flat non-idempotent; both need bookkeeping of
their own. A night's calibration has a handful of masters and an archive many, so whole
masters already keep a cluster busy; the cost is that a single master uses one worker.

Memory per worker
-----------------
`memory_limit` is the budget of one worker and the strip height follows from it and the
worker's thread count (`num_workers`, when unset, becomes the worker's ``nthreads``). A
worker builds one master at a time with all its threads: the clusters stacker starts
advertise a resource ``stacker-master=1`` that tasks ask for, so the scheduler never gives a
worker a second master; on other clusters a lock in the worker process keeps the second
task waiting (start workers with ``--resources stacker-master=1`` to avoid that).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stacker.errors import BuildError, ConfigError

if TYPE_CHECKING:
    from distributed import Client

    from stacker.config import Settings
    from stacker.engine import MasterResult, ProgressFn
    from stacker.plan import Job, Plan

log = logging.getLogger("stacker")

#: Worker resource that makes the scheduler give each worker one master at a time.
RESOURCE = "stacker-master"

#: Seconds to wait for a scheduler to answer and for its first worker to join.
CONNECT_TIMEOUT = 30

# A worker process builds one master at a time (see "Memory per worker").
_ONE_MASTER = threading.Lock()


@contextmanager
def connect(scheduler: str, settings: Settings) -> Iterator[Client]:
    """A `distributed.Client` for ``settings.scheduler``, closed (with its cluster) on exit.

    Parameters
    ----------
    scheduler : str
        ``local:N`` starts a `distributed.LocalCluster` of N worker processes on this
        machine, each with ``num_workers`` threads (default: the CPUs shared out) and the
        ``stacker-master`` resource; an address (``tcp://host:8786``) connects to a running
        scheduler.
    settings : Settings
        For ``num_workers``.

    Raises
    ------
    ConfigError
        When the scheduler cannot be reached or has no worker, with the address.
    """
    from distributed import Client, LocalCluster

    if scheduler.startswith("local:"):
        n = int(scheduler.split(":", 1)[1])
        threads = settings.num_workers or max(1, (os.cpu_count() or 1) // n)
        cluster = LocalCluster(n_workers=n, threads_per_worker=threads, processes=True,
                               resources={RESOURCE: 1})
        try:
            with Client(cluster) as client:
                yield client
        finally:
            cluster.close()
        return
    try:
        client = Client(scheduler, timeout=f"{CONNECT_TIMEOUT}s")
    except (OSError, TimeoutError) as exc:
        raise ConfigError(f"master_frames.scheduler: cannot connect to {scheduler}: {exc}; is "
                          "`dask scheduler` running there?") from None
    try:
        try:
            client.wait_for_workers(1, timeout=CONNECT_TIMEOUT)
        except TimeoutError:
            raise ConfigError(f"master_frames.scheduler: {scheduler} has no worker after "
                              f"{CONNECT_TIMEOUT} s; start some with `dask worker "
                              f"{scheduler}`") from None
        yield client
    finally:
        client.close()


def describe(client: Client) -> str:
    """One line about the cluster: workers, threads and the dashboard link."""
    import importlib.util

    nthreads = client.nthreads()
    link = client.dashboard_link
    if client.cluster is not None and importlib.util.find_spec("bokeh") is None:
        # A LocalCluster's scheduler runs here: without bokeh it serves no dashboard.
        link = f"{link} (needs bokeh: pip install 'stacker[cluster]')"
    return (f"Dask cluster at {client.scheduler.address}: {len(nthreads)} workers, "
            f"{sum(nthreads.values())} threads; dashboard {link}")


def budget_settings(client: Client, settings: Settings) -> Settings:
    """`settings` as the largest worker sees them, for checking the budget before a run.

    Also warns when `memory_limit` is above what Dask lets a worker use (its nanny would
    restart the worker, again and again).
    """
    info = client.scheduler_info()["workers"]
    for address, worker in info.items():
        dask_limit = worker.get("memory_limit") or 0
        if dask_limit and settings.memory_limit > 0.8 * dask_limit:
            log.warning("memory_limit %.2f GB is over 80 %% of the %.2f GB Dask gives worker "
                        "%s; lower memory_limit or give workers more memory",
                        settings.memory_limit / 1e9, dask_limit / 1e9, address)
    most = max((w["nthreads"] for w in info.values()), default=1)
    return settings.replace(num_workers=settings.num_workers or most)


def run_jobs(client: Client, plan: Plan, settings: Settings, work_dir: Path,
             progress: ProgressFn | None = None, *, digests: dict[str, str] | None = None,
             done: dict[str, MasterResult] | None = None) -> list[MasterResult]:
    """Build every job of `plan` on the cluster; results in plan order.

    Parameters
    ----------
    client : distributed.Client
        Connected to a scheduler whose workers see the inputs and `work_dir`.
    plan, settings, work_dir
        As for the threaded engine (`stacker.engine.run_plan`).
    progress : callable, optional
        ``progress(job_id, done, total)``; strips finished on the workers arrive as
        scheduler events, so the count is live.
    digests : dict, optional
        Each job's fingerprint, recorded in its master (`stacker.outdir`).
    done : dict, optional
        Results of jobs whose masters are already up to date: not submitted; a flat that
        subtracts one gets its path.
    """
    from distributed import as_completed

    from stacker.engine import settled

    run = uuid.uuid4().hex[:8]
    topic = f"stacker-progress-{run}"
    if progress is not None:
        client.subscribe_topic(topic, _ProgressRelay(progress))
    workers = client.scheduler_info()["workers"].values()
    resources = {RESOURCE: 1} if workers and all(
        w.get("resources", {}).get(RESOURCE, 0) >= 1 for w in workers) else None
    results: dict[str, MasterResult] = {}
    futures = {}
    done = done or {}
    digests = digests or {}
    for job in plan.jobs:
        result = settled(job, done)
        if result is not None:
            results[job.id] = result
            continue
        known = {d: done[d].path for d in job.depends_on if d in done}
        deps = [futures[d] for d in job.depends_on if d in futures]
        futures[job.id] = client.submit(
            build_job, job, settings, work_dir, topic if progress else None, os.getpid(),
            known, digests.get(job.id), *deps,
            key=f"stacker-{job.id}-{run}", pure=False, resources=resources)
    jobs = {futures[j.id].key: j for j in plan.jobs if j.id in futures}
    try:
        for future in as_completed(futures.values()):
            job = jobs[future.key]
            results[job.id] = _collect(future, job)
    finally:
        if progress is not None:
            client.unsubscribe_topic(topic)
    return [results[j.id] for j in plan.jobs]


def _collect(future, job: Job) -> MasterResult:
    from stacker.engine import _result

    if future.status == "error":
        exc = future.exception()
        # A flat whose dark's task was lost fails with the dark's exception: say so.
        why = f"{type(exc).__name__}: {exc}"
        log.error("%s failed on the cluster: %s", job.id, why)
        return _result(job, "failed", error=f"cluster: {why}")
    if future.status == "cancelled":
        log.error("%s failed: its task was cancelled", job.id)
        return _result(job, "failed", error="cluster: task cancelled")
    result, records, address = future.result()
    for level, message in records:
        log.log(level, "%s", message)
    log.debug("%s was built on worker %s", job.id, address)
    return result


class _ProgressRelay:
    """Scheduler events ``(timestamp, [job_id, done, total])`` -> the caller's progress."""

    def __init__(self, progress: ProgressFn) -> None:
        self.progress = progress

    def __call__(self, event: tuple[float, Any]) -> None:
        _, (job_id, done, total) = event
        try:
            self.progress(job_id, done, total)
        except Exception:  # a progress display must never break a run
            log.debug("progress callback failed", exc_info=True)


# --------------------------------------------------------------------------------------------
# On the worker


def build_job(job: Job, settings: Settings, work_dir: Path, topic: str | None,
              client_pid: int, known: dict[str, Path], digest: str | None,
              *deps: tuple[MasterResult, list, str]
              ) -> tuple[MasterResult, list[tuple[int, str]], str]:
    """The task run on a worker: build one master with the worker's threads.

    Parameters
    ----------
    job, settings, work_dir
        As for `stacker.engine.build_master`; paths are the client's and must be visible.
    topic : str or None
        Scheduler event topic for strip progress (None: no progress).
    client_pid : int
        Process id of the client: log records are returned to it, except when the worker
        runs in the client's own process (they reach its handlers directly).
    known : dict
        Paths of masters this job subtracts that were already up to date (no task).
    digest : str or None
        The job's fingerprint, recorded in its master.
    *deps : tuple
        What the tasks of the masters this job subtracts returned (the scheduler passes
        them when those tasks are done).

    Returns
    -------
    result : MasterResult
        Built or failed (failures are results, not exceptions, like in the threaded run).
    records : list of (level, message)
        What the build logged, for the client's log.
    address : str
        The worker's address.
    """
    from distributed import get_worker

    from stacker.engine import _result, _run_job

    worker = get_worker()
    done = [dep[0] for dep in deps]
    built = {**known, **{r.job_id: r.path for r in done
                         if r.status == "built" and r.path is not None}}
    settings = settings.replace(num_workers=settings.num_workers or worker.state.nthreads)
    progress = _EventProgress(worker, topic) if topic else None
    with _captured(os.getpid() != client_pid) as records:
        try:
            check_paths(job, built, work_dir, worker.address)
        except BuildError as exc:
            log.error("%s failed: %s", job.id, exc)
            result = _result(job, "failed", error=str(exc))
        else:
            with _ONE_MASTER:
                result = _run_job(job, settings, work_dir, built, progress, digest)
    return result, records, worker.address


def check_paths(job: Job, built: dict[str, Path], work_dir: Path, address: str) -> None:
    """Fail with the worker and the path when an input or the output folder is not visible.

    Raises
    ------
    BuildError
        ``worker tcp://...: cannot open /path: reason``.
    """
    paths = [f.path for f in job.frames]
    cal = job.calibration
    if cal is not None:
        paths.append(cal.path if cal.path is not None else built.get(cal.job_id))
    for path in paths:
        if path is None:
            continue  # a calibration that was not built: the engine says so
        try:
            os.close(os.open(path, os.O_RDONLY))
        except OSError as exc:
            raise BuildError(f"worker {address}: cannot open {path}: {exc.strerror}; workers "
                             "must see the input paths (shared filesystem)") from None
    if not os.path.isdir(work_dir):
        raise BuildError(f"worker {address}: cannot see the output folder {work_dir}; "
                         "workers must see it under the same path (shared filesystem)")


class _EventProgress:
    """``progress(job_id, done, total)`` on a worker, sent to the client as scheduler events.

    At most ~10 events a second per job (and always the last one): the scheduler keeps a
    bounded event log and the bar needs no more.
    """

    def __init__(self, worker, topic: str) -> None:
        self.worker = worker
        self.topic = topic
        self.last = 0.0

    def __call__(self, job_id: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done in (0, total) or now - self.last >= 0.1:
            self.last = now
            self.worker.log_event(self.topic, [job_id, done, total])


@contextmanager
def _captured(enabled: bool) -> Iterator[list[tuple[int, str]]]:
    """Records that stacker logs in this thread, kept to be sent back to the client."""
    records: list[tuple[int, str]] = []
    if not enabled:
        yield records
        return
    handler = _ListHandler(records, threading.get_ident())
    old_level = log.level
    log.addHandler(handler)
    if log.level == logging.NOTSET or log.level > logging.DEBUG:
        log.setLevel(logging.DEBUG)  # the client's log file takes DEBUG
    try:
        yield records
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)


class _ListHandler(logging.Handler):
    def __init__(self, records: list[tuple[int, str]], thread: int) -> None:
        super().__init__(logging.DEBUG)
        self.records = records
        self.thread = thread

    def emit(self, record: logging.LogRecord) -> None:
        # Another master may log from another thread of this process at the same time.
        if record.thread == self.thread:
            self.records.append((record.levelno, record.getMessage()))


