"""Background retraining: one pipeline run at a time, observable while it runs.

The job runs in a thread of the serving process (torch releases the GIL, so
predictions keep flowing) and, when it promotes a model, hands it to `on_promoted`.
"""

from __future__ import annotations

import logging
import secrets
import threading
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from xray.config import PipelineConfig
from xray.entity.artifacts import ModelPusherArtifact
from xray.package import utc_now
from xray.storage import Storage

logger = logging.getLogger(__name__)


@dataclass
class TrainingJob:
    """What a client polling `/train/{job_id}` sees."""

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

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly copy."""
        return asdict(self)


class JobConflictError(RuntimeError):
    """A training job is already running."""

    def __init__(self, job: TrainingJob) -> None:
        super().__init__(f"training job {job.job_id} is already {job.status}")
        self.job = job


class TrainingJobs:
    """Starts and tracks pipeline runs; refuses a second while one is active."""

    def __init__(
        self,
        config_loader: Callable[[], PipelineConfig],
        storage: Storage,
        on_promoted: Callable[[ModelPusherArtifact], None] | None = None,
    ) -> None:
        self.config_loader = config_loader
        self.storage = storage
        self.on_promoted = on_promoted
        self.jobs: dict[str, TrainingJob] = {}
        self.lock = threading.Lock()
        self.threads: dict[str, threading.Thread] = {}

    def active(self) -> TrainingJob | None:
        """The queued or running job, if any."""
        return next((job for job in self.jobs.values() if job.status in ("queued", "running")), None)

    def get(self, job_id: str) -> TrainingJob | None:
        return self.jobs.get(job_id)

    def start(self) -> TrainingJob:
        """Start a run in the background, or raise JobConflictError naming the active one."""
        with self.lock:
            running = self.active()
            if running is not None:
                raise JobConflictError(running)
            config = self.config_loader()
            job = TrainingJob(job_id=secrets.token_hex(8))
            self.jobs[job.job_id] = job
            thread = threading.Thread(target=self.work, args=(job, config), name=f"train-{job.job_id}", daemon=True)
            self.threads[job.job_id] = thread
            thread.start()
        return job

    def wait(self, job_id: str, timeout: float | None = None) -> TrainingJob:
        """Block until a job ends (for tests and scripts)."""
        self.threads[job_id].join(timeout)
        return self.jobs[job_id]

    def work(self, job: TrainingJob, config: PipelineConfig) -> None:
        """The thread body: run the pipeline, record progress, promote, record the outcome."""
        job.status = "running"

        def progress(event: dict[str, Any]) -> None:
            job.run_id = event.get("run_id", job.run_id)
            if "epoch" in event:
                job.epoch, job.epochs = event["epoch"], event["epochs"]
                job.history.append({key: value for key, value in event.items() if key not in ("stage", "epochs")})
            elif event.get("stage") != "started":
                job.stage = event["stage"]

        try:
            from xray.pipeline import run_pipeline  # the training stack (torch) loads with the first job

            result = run_pipeline(config, self.storage, progress=progress)
            evaluation = result.evaluation
            job.outcome = {"pushed": result.pushed, "version": result.version, "reason": result.reason,
                           "test_metrics": evaluation.test_metrics, "threshold": evaluation.threshold}  # fmt: skip
            if result.pushed and self.on_promoted is not None:
                self.on_promoted(result)
            job.status = "succeeded"
        except Exception as error:  # the job records every failure; the server keeps serving
            logger.error("training job %s failed: %s\n%s", job.job_id, error, traceback.format_exc())
            job.error = f"{type(error).__name__}: {error}"
            job.status = "failed"
        finally:
            job.stage = None if job.status == "succeeded" else job.stage
            job.finished_at = utc_now()
