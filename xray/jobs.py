"""Retraining jobs shared by every instance: records and a lease in storage, training in a child process.

- Each job is a JSON record at `jobs/<job_id>.json`, rewritten at each stage and epoch, so any
  instance that shares the storage answers `GET /train/{job_id}`.
- One training at a time across instances: `jobs/lease.json` is created with a conditional
  write (S3 `IfNoneMatch="*"`, or an exclusive local create), renewed and released with a
  write conditional on its ETag, and carries an expiry, so a trainer that died frees it.
- The server starts `python -m xray.jobs run JOB_ID` as a child process with its own torch
  thread count and a lower CPU priority, and only watches it: a crash, an out-of-memory kill or
  SIGKILL ends the child, never the server; the job is then marked failed and the lease freed.

The child runs the same pipeline as `python -m xray train`; serving never imports the trainer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from xray.clock import utc_now
from xray.logs import quiet_libraries
from xray.settings import Settings
from xray.storage import Storage, StorageError, StorageNotFoundError

logger = logging.getLogger(__name__)

JOBS_PREFIX = "jobs"
LEASE_KEY = f"{JOBS_PREFIX}/lease.json"
JOB_ID_PATTERN = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")
ACTIVE = ("queued", "running")
TRAINING_NICENESS = 10  # the child yields the CPU to serving when both want it


def new_job_id() -> str:
    """A sortable, unique job id (also the run id, hence the model version, of the run it starts)."""
    return f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


@dataclass
class TrainingJob:
    """What a client polling `/train/{job_id}` sees; stored as `jobs/<job_id>.json`."""

    job_id: str
    status: str = "queued"
    stage: str | None = None
    run_id: str | None = None
    epoch: int | None = None
    epochs: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    outcome: dict[str, Any] | None = None
    error: str | None = None
    created_at: str = field(default_factory=utc_now)
    finished_at: str | None = None
    host: str | None = None
    pid: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly copy."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainingJob:
        """Rebuild from a record, ignoring keys a newer writer may have added."""
        known = {item.name for item in fields(cls)}
        return cls(**{key: value for key, value in raw.items() if key in known})


class JobConflictError(RuntimeError):
    """A training job is already running somewhere."""

    def __init__(self, job: TrainingJob) -> None:
        super().__init__(f"training job {job.job_id} is already {job.status}")
        self.job = job


class JobStore:
    """Job records in storage, the newest `keep` of them kept."""

    def __init__(self, storage: Storage, keep: int = 50) -> None:
        self.storage = storage
        self.keep = keep

    @staticmethod
    def key(job_id: str) -> str:
        return f"{JOBS_PREFIX}/{job_id}.json"

    def save(self, job: TrainingJob) -> None:
        self.storage.write_json(self.key(job.job_id), job.to_dict())

    def get(self, job_id: str) -> TrainingJob | None:
        """The record of `job_id`, or None when there is none (or the id is not one of ours)."""
        if not JOB_ID_PATTERN.fullmatch(job_id):
            return None
        try:
            return TrainingJob.from_dict(self.storage.read_json(self.key(job_id)))
        except StorageNotFoundError:
            return None

    def job_ids(self) -> list[str]:
        """Every stored job id, oldest first (ids sort by creation time)."""
        names = (key.removeprefix(f"{JOBS_PREFIX}/").removesuffix(".json") for key in self.storage.list(JOBS_PREFIX))
        return sorted(name for name in names if JOB_ID_PATTERN.fullmatch(name))

    def prune(self, protect: str | None = None) -> list[str]:
        """Delete the oldest finished records beyond the newest `keep`; returns the deleted ids."""
        removed = []
        for job_id in self.job_ids()[: -self.keep]:
            job = self.get(job_id)
            if job_id == protect or (job is not None and job.status in ACTIVE):
                continue
            self.storage.delete(self.key(job_id))
            removed.append(job_id)
        return removed


@dataclass(frozen=True)
class Lease:
    """The training lease as its holder last wrote it."""

    job_id: str
    expires_at: float
    etag: str

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires_at


class TrainingLease:
    """At most one trainer across every instance sharing the storage (wall-clock expiry: keep clocks in sync)."""

    def __init__(self, storage: Storage, seconds: float, key: str = LEASE_KEY) -> None:
        self.storage = storage
        self.seconds = seconds
        self.key = key

    def body(self, job_id: str) -> bytes:
        expires_at = time.time() + self.seconds
        return json.dumps({"job_id": job_id, "expires_at": expires_at, "host": socket.gethostname()}).encode()

    def read(self) -> Lease | None:
        """The lease as stored (expired or not), or None when nobody holds it."""
        try:
            data, etag = self.storage.read_bytes_with_etag(self.key)
        except StorageNotFoundError:
            return None
        try:
            raw = json.loads(data)
            return Lease(job_id=str(raw["job_id"]), expires_at=float(raw["expires_at"]), etag=etag)
        except (ValueError, KeyError, TypeError):  # unreadable: treat as expired so it can be taken over
            return Lease(job_id="unknown", expires_at=0.0, etag=etag)

    def acquire(self, job_id: str) -> Lease | None:
        """Take the lease for `job_id`: create it, or take over an expired one; None while another job holds it."""
        data = self.body(job_id)
        for _ in range(3):  # the lease may be released or replaced between our reads and writes
            etag = self.storage.write_bytes_if_absent(self.key, data)
            if etag is not None:
                return Lease(job_id, json.loads(data)["expires_at"], etag)
            current = self.read()
            if current is None:
                continue
            if not current.expired():
                return None
            logger.warning("taking over the training lease of job %s, expired %.0f s ago", current.job_id,
                           time.time() - current.expires_at)  # fmt: skip
            etag = self.storage.write_bytes_if_match(self.key, data, current.etag)
            if etag is not None:
                return Lease(job_id, json.loads(data)["expires_at"], etag)
        return None

    def renew(self, lease: Lease) -> Lease | None:
        """Push the expiry on; None when the lease is no longer ours (expired and taken, or released)."""
        data = self.body(lease.job_id)
        etag = self.storage.write_bytes_if_match(self.key, data, lease.etag)
        return None if etag is None else Lease(lease.job_id, json.loads(data)["expires_at"], etag)

    def release(self, lease: Lease) -> bool:
        """Free the lease if it is still the one we hold."""
        return self.storage.delete_if_match(self.key, lease.etag)

    def release_for(self, job_id: str) -> bool:
        """Free the lease if `job_id` holds it (for the server, when its child died without releasing)."""
        current = self.read()
        return current is not None and current.job_id == job_id and self.storage.delete_if_match(self.key, current.etag)


def describe_exit(returncode: int) -> str:
    """How a training process ended, in words."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (out of memory, or killed)" if -returncode == signal.SIGKILL else ""
        return f"the training process was killed by {name}{hint}"
    return f"the training process exited with code {returncode} before recording an outcome"


def settings_environment(settings: Settings) -> dict[str, str]:
    """The XRAY_* variables that give a child process these settings."""
    environment = {}
    for name, item in Settings.variables().items():
        value = getattr(settings, item.name)
        if value is not None:
            environment[name] = str(value).lower() if isinstance(value, bool) else str(value)
    return environment


def training_threads(settings: Settings) -> int:
    """Torch threads for a training child: the setting, or half the cores so serving keeps the rest."""
    return settings.training_threads or max(1, (os.cpu_count() or 2) // 2)


class TrainingJobs:
    """The server's side: start a training child under the lease, watch it, answer for any job in storage."""

    def __init__(self, settings: Settings, storage: Storage, on_finished: Callable[[TrainingJob], None] | None = None,
                 command: list[str] | None = None) -> None:  # fmt: skip
        self.settings = settings
        self.storage = storage
        self.store = JobStore(storage, settings.jobs_kept)
        self.lease = TrainingLease(storage, settings.training_lease_seconds)
        self.on_finished = on_finished
        self.command = command or [sys.executable, "-m", "xray.jobs", "run"]
        self.processes: dict[str, subprocess.Popen] = {}
        self.watchers: dict[str, threading.Thread] = {}
        self.lock = threading.Lock()

    def active(self) -> TrainingJob | None:
        """The job holding the lease, if its lease is live."""
        current = self.lease.read()
        if current is None or current.expired():
            return None
        return self.store.get(current.job_id) or TrainingJob(job_id=current.job_id, status="running")

    def start(self) -> TrainingJob:
        """Take the lease, record the job and start its process; JobConflictError naming the job that holds it."""
        with self.lock:
            job = TrainingJob(job_id=new_job_id(), run_id=None)
            lease = self.lease.acquire(job.job_id)
            if lease is None:
                running = self.active()
                raise JobConflictError(running or TrainingJob(job_id="unknown", status="running"))
            try:
                self.store.save(job)
                environment = {**os.environ, **settings_environment(self.settings)}
                threads = str(training_threads(self.settings))
                environment.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
                process = subprocess.Popen([*self.command, job.job_id], env=environment, start_new_session=True)
            except BaseException as error:
                job.status, job.error, job.finished_at = "failed", f"could not start training: {error}", utc_now()
                self.store.save(job)
                self.lease.release(lease)
                raise
            self.processes[job.job_id] = process
            watcher = threading.Thread(target=self.watch, args=(job.job_id, process), name=f"watch-{job.job_id}",
                                       daemon=True)  # fmt: skip
            self.watchers[job.job_id] = watcher
            watcher.start()
        try:
            self.store.prune(protect=job.job_id)
        except StorageError as error:
            logger.warning("could not prune old job records: %s", error)
        logger.info("started training job %s (pid %d, %s threads)", job.job_id, process.pid, threads)
        return job

    def watch(self, job_id: str, process: subprocess.Popen) -> None:
        """Wait for a training process; if it died without an outcome, mark its job failed and free the lease."""
        returncode = process.wait()
        self.processes.pop(job_id, None)
        job = None
        for attempt in range(5):  # storage may be briefly unreachable; the lease expires anyway
            try:
                job = self.store.get(job_id)
                if job is not None and job.status in ACTIVE:
                    job.status, job.error, job.finished_at = "failed", describe_exit(returncode), utc_now()
                    self.store.save(job)
                    logger.error("training job %s failed: %s", job_id, job.error)
                if self.lease.release_for(job_id):
                    logger.warning("freed the training lease job %s left behind", job_id)
                break
            except StorageError as error:
                logger.warning("could not record the end of job %s (attempt %d): %s", job_id, attempt + 1, error)
                time.sleep(2**attempt)
        if self.on_finished is not None and job is not None:
            self.on_finished(job)

    def get(self, job_id: str) -> TrainingJob | None:
        """The job's record; an active job whose lease is gone (its trainer died unseen) is marked failed."""
        job = self.store.get(job_id)
        if job is None or job.status not in ACTIVE:
            return job
        current = self.lease.read()
        if current is not None and current.job_id == job_id and not current.expired():
            return job
        job = self.store.get(job_id)  # the trainer may have recorded its outcome, then released, since we read
        if job is not None and job.status in ACTIVE:
            job.status, job.finished_at = "failed", utc_now()
            job.error = "the training process stopped renewing its lease (it died, or its instance went away)"
            self.store.save(job)
        return job

    def wait(self, job_id: str, timeout: float | None = None) -> TrainingJob | None:
        """Block until this server's process for `job_id` ends (for tests and scripts)."""
        watcher = self.watchers.get(job_id)
        if watcher is not None:
            watcher.join(timeout)
        return self.get(job_id)

    def stop(self, grace: float = 10.0) -> None:
        """Stop the training processes this server started (it is shutting down); their jobs are marked failed."""
        for job_id, process in list(self.processes.items()):
            logger.warning("stopping training job %s: the server is shutting down", job_id)
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            watcher = self.watchers.get(job_id)
            if watcher is not None:
                watcher.join(grace)


class LeaseKeeper(threading.Thread):
    """The trainer's heartbeat: renews the lease every third of its lifetime; notes when it was lost."""

    def __init__(self, lease_store: TrainingLease, lease: Lease) -> None:
        super().__init__(name="lease-keeper", daemon=True)
        self.lease_store = lease_store
        self.lease: Lease | None = lease
        self.lost = threading.Event()
        self.stopped = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self.stopped.wait(self.lease_store.seconds / 3):
            with self.lock:
                if self.lease is None:
                    return
                try:
                    renewed = self.lease_store.renew(self.lease)
                except StorageError as error:  # try again next beat; the expiry leaves room for two misses
                    logger.warning("could not renew the training lease: %s", error)
                    continue
                if renewed is None:
                    logger.error("lost the training lease of job %s", self.lease.job_id)
                    self.lease = None
                    self.lost.set()
                    return
                self.lease = renewed

    def release(self) -> None:
        """Stop renewing and free the lease if it is still ours."""
        self.stopped.set()
        with self.lock:
            if self.lease is not None:
                try:
                    self.lease_store.release(self.lease)
                except StorageError as error:
                    logger.warning("could not release the training lease (it expires on its own): %s", error)
                self.lease = None


class LeaseLostError(RuntimeError):
    """Another trainer took the lease: this one stops rather than train alongside it."""


class TrainingBusyError(RuntimeError):
    """Another training holds the lease: `python -m xray train` refuses to train alongside it."""


def record_outcome(job: TrainingJob, result: Any) -> None:
    """What a finished run (a `ModelPusherArtifact`) did, as `GET /train/{job_id}` shows it."""
    evaluation = result.evaluation
    job.outcome = {"pushed": result.pushed, "version": result.version, "reason": result.reason,
                   "test_metrics": evaluation.test_metrics, "threshold": evaluation.threshold}  # fmt: skip


@contextlib.contextmanager
def recorded_training(store: JobStore | None, job: TrainingJob,
                      keeper: LeaseKeeper) -> Iterator[Callable[[dict[str, Any]], None]]:  # fmt: skip
    """Run a job's training in the block, under `keeper`'s lease; yields the pipeline's progress callback.

    The callback saves each stage and epoch to the job's record (none when `store` is None) and stops the run once
    the lease is lost. Leaving the block records how it ended, an error or Ctrl-C included, and frees the lease.
    """
    job.status, job.pid, job.host = "running", os.getpid(), socket.gethostname()
    job.run_id = job.run_id or job.job_id
    save = store.save if store is not None else (lambda job: None)

    def progress(event: dict[str, Any]) -> None:
        if keeper.lost.is_set():
            raise LeaseLostError("another trainer took the training lease (this one stopped renewing it in time)")
        if "epoch" in event:
            job.epoch, job.epochs = event["epoch"], event["epochs"]
            job.history.append({key: value for key, value in event.items() if key not in ("stage", "epochs")})
        elif event.get("stage") != "started":
            job.stage = event["stage"]
        try:
            save(job)
        except StorageError as error:  # the record lags; the training goes on (the next event writes it again)
            logger.warning("could not record the progress of job %s: %s", job.job_id, error)

    try:
        save(job)
        yield progress
        job.status = "succeeded"
    except BaseException as error:  # the record says why; the caller decides what the failure means
        job.error, job.status = f"{type(error).__name__}: {error}".rstrip(": "), "failed"
        raise
    finally:
        job.stage = None if job.status == "succeeded" else job.stage
        job.finished_at = utc_now()
        try:
            save(job)
        finally:
            keeper.release()


@contextlib.contextmanager
def exclusive_training(storage: Storage, settings: Settings,
                       run_id: str) -> Iterator[tuple[TrainingJob, Callable[[dict[str, Any]], None]]]:  # fmt: skip
    """`python -m xray train`'s claim: the training lease a `GET /train` job takes, and a job record under the run id.

    So a `GET /train` on any instance answers 409 naming this run while it trains, `GET /train/<run id>` follows it,
    and this refuses (TrainingBusyError) while another training holds the lease. Yields the job and the
    progress callback.
    """
    store = JobStore(storage, settings.jobs_kept) if JOB_ID_PATTERN.fullmatch(run_id) else None
    previous = store.get(run_id) if store is not None else None  # a resumed run keeps its record's history
    lease_store = TrainingLease(storage, settings.training_lease_seconds)
    lease = lease_store.acquire(run_id)
    if lease is None:
        holder = lease_store.read()
        name = holder.job_id if holder is not None else "unknown"
        until = (f", its lease runs to {datetime.fromtimestamp(holder.expires_at, UTC):%Y-%m-%d %H:%M:%S} UTC"
                 if holder is not None else "")  # fmt: skip
        raise TrainingBusyError(
            f"training job {name} holds the training lease of {storage.uri}{until}: one training at a time. "
            f"Wait for it (GET /train/{name} on the service); a trainer that died frees the lease when it expires"
        )
    job = previous or TrainingJob(job_id=run_id, run_id=run_id)
    keeper = LeaseKeeper(lease_store, lease)
    keeper.start()
    job.error, job.outcome, job.finished_at = None, None, None
    with recorded_training(store, job, keeper) as progress:
        if store is not None:
            with contextlib.suppress(StorageError):
                store.prune(protect=run_id)
        yield job, progress


def run_job(job_id: str, settings: Settings) -> int:
    """The training process: run the pipeline for `job_id` under its lease, recording each stage and epoch.

    The lease keeper starts before torch and the pipeline are imported, which can take long on a busy machine.
    """
    from xray.storage import open_storage

    storage = open_storage(settings.storage_uri)
    store = JobStore(storage, settings.jobs_kept)
    lease_store = TrainingLease(storage, settings.training_lease_seconds)
    lease = lease_store.read()
    job = store.get(job_id)
    if job is None or lease is None or lease.job_id != job_id or lease.expired():
        logger.error("job %s does not hold the training lease: not training", job_id)
        return 3
    keeper = LeaseKeeper(lease_store, lease)
    keeper.start()
    try:
        with recorded_training(store, job, keeper) as progress:
            import torch

            from xray.config import load_config
            from xray.pipeline import run_pipeline

            torch.set_num_threads(training_threads(settings))
            with contextlib.suppress(PermissionError):  # some platforms forbid it
                os.nice(TRAINING_NICENESS)
            result = run_pipeline(load_config(settings.config_path), storage, run_id=job_id, progress=progress)
            record_outcome(job, result)
    except Exception:  # the record says why; the exit code says it failed
        logger.exception("training job %s failed", job_id)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m xray.jobs run JOB_ID`: what `GET /train` starts; settings come from the XRAY_* environment."""
    parser = argparse.ArgumentParser(prog="python -m xray.jobs", description="Run one recorded training job.")
    commands = parser.add_subparsers(dest="command", required=True)
    run_command = commands.add_parser("run", help="train for a job whose record and lease GET /train created")
    run_command.add_argument("job_id")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s[train]: %(message)s")
    quiet_libraries()
    return run_job(arguments.job_id, Settings.from_environment())


if __name__ == "__main__":
    sys.exit(main())
