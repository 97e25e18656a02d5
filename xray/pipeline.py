"""The training pipeline: five stages, each fed the artifact of the one before."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xray import distributed
from xray.components import data_ingestion, data_transformation, model_evaluation, model_pusher, model_trainer
from xray.config import PipelineConfig
from xray.entity.artifacts import ModelPusherArtifact, RunInfo
from xray.runs import new_run_id
from xray.storage import Storage

logger = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]


@dataclass
class StageTimer:
    """Wall time of each stage, reported at the end of a run."""

    seconds: dict[str, float] = field(default_factory=dict)


def start_run(config: PipelineConfig, storage: Storage, run_id: str | None = None) -> RunInfo:
    """Create (or reopen, to resume) the run folder and record the config in it."""
    run_id = run_id or new_run_id()
    run_dir = Path(config.artifacts_dir) / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    return RunInfo(run_id=run_id, run_dir=str(run_dir), storage_uri=storage.uri)


def run_pipeline(
    config: PipelineConfig,
    storage: Storage,
    run_id: str | None = None,
    progress: Progress | None = None,
    timer: StageTimer | None = None,
) -> ModelPusherArtifact:
    """Ingest, transform, train, evaluate and push; `progress` hears each stage and epoch.

    Under torchrun, every rank trains; rank 0 alone runs the other stages while the rest wait.
    """
    timer = timer or StageTimer()
    report = progress or (lambda event: None)
    with distributed.session(use_cuda=config.trainer.device in ("auto", "cuda")):
        run = distributed.main_only(lambda: start_run(config, storage, run_id))
        report({"stage": "started", "run_id": run.run_id})

        def timed(name: str, step: Callable[[], Any]) -> Any:
            report({"stage": name, "run_id": run.run_id})
            started = time.perf_counter()
            result = step()
            timer.seconds[name] = time.perf_counter() - started
            logger.info("stage %s finished in %.1f s", name, timer.seconds[name])
            return result

        def main_only(name: str, step: Callable[[], Any]) -> Any:
            return distributed.main_only(lambda: timed(name, step))

        ingestion = main_only("data_ingestion", lambda: data_ingestion.run(config, run, storage))
        transformation = main_only("data_transformation", lambda: data_transformation.run(config, ingestion, storage))
        trainer = timed("model_trainer", lambda: model_trainer.run(config, transformation, storage, progress=progress))
        evaluation = main_only("model_evaluation", lambda: model_evaluation.run(config, trainer, storage))
        return main_only("model_pusher", lambda: model_pusher.run(config, evaluation, storage))
