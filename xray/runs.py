"""Past pipeline runs, read back from their artifact folders and the production pointer.

A run folder is `<artifacts_dir>/<run_id>/` with the run's `config.json` and one folder per stage,
each holding `artifact.json` once the stage has finished. Nothing here imports torch, so
`python -m xray runs` answers at once.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from xray.entity.artifacts import ARTIFACT_FILE

STAGES = ("data_ingestion", "data_transformation", "model_trainer", "model_evaluation", "model_pusher")
RUN_MARKER = "config.json"
RUN_ID_TIME_FORMAT = "%Y%m%d-%H%M%S"
REPORTED_METRICS = ("roc_auc", "sensitivity", "specificity")


class RunNotFoundError(LookupError):
    """A run id with no run folder, explained with the runs that do exist."""


@dataclass(frozen=True)
class RunSummary:
    """What `python -m xray runs` shows about one run."""

    run_id: str
    started: str
    last_stage: str
    finished: bool
    test_metrics: dict[str, float] = field(default_factory=dict)
    version: str | None = None
    promotion: str = "not evaluated"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for `--json`."""
        return asdict(self)


def new_run_id() -> str:
    """A sortable, unique run id: UTC time plus a random suffix (`started_at` reads the time back)."""
    return f"{datetime.now(UTC):{RUN_ID_TIME_FORMAT}}-{secrets.token_hex(3)}"


def is_run(directory: Path) -> bool:
    """Whether a folder of the artifacts directory is a run (the cache folder is not)."""
    return (directory / RUN_MARKER).is_file()


def started_at(run_dir: Path) -> datetime:
    """When a run started: from its id when it is a generated one, else its oldest file."""
    try:
        return datetime.strptime(run_dir.name[: len("YYYYmmdd-HHMMSS")], RUN_ID_TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        oldest = min((path.stat().st_mtime for path in run_dir.rglob("*") if path.is_file()), default=0.0)
        return datetime.fromtimestamp(oldest or run_dir.stat().st_mtime, UTC)


def read_artifact(run_dir: Path, stage: str) -> dict[str, Any] | None:
    """A stage's artifact as a dict, or None when the stage has not finished."""
    path = run_dir / stage / ARTIFACT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def summarise_run(run_dir: Path, production_version: str | None) -> RunSummary:
    """One run's id, start, furthest stage, test metrics and promotion, from its folder alone."""
    artifacts = {stage: read_artifact(run_dir, stage) for stage in STAGES}
    finished = [stage for stage in STAGES if artifacts[stage] is not None]
    started_stages = [stage for stage in STAGES if (run_dir / stage).is_dir()]
    if finished and finished[-1] == STAGES[-1]:
        last_stage, complete = STAGES[-1], True
    elif started_stages and (not finished or STAGES.index(started_stages[-1]) > STAGES.index(finished[-1])):
        last_stage, complete = f"{started_stages[-1]} (unfinished)", False
    else:
        last_stage, complete = (finished[-1] if finished else "started"), False
    evaluation = artifacts["model_evaluation"] or {}
    metrics = {name: evaluation["test_metrics"][name] for name in REPORTED_METRICS
               if name in evaluation.get("test_metrics", {})}  # fmt: skip
    pusher = artifacts["model_pusher"] or {}
    version = pusher.get("version")
    if pusher.get("pushed") and version is not None and version == production_version:
        promotion = "in production"
    elif pusher.get("pushed"):
        promotion = "promoted, since replaced"
    elif evaluation:
        promotion = "not promoted" if evaluation.get("accepted") is False or pusher else "evaluated"
    else:
        promotion = "not evaluated"
    return RunSummary(run_id=run_dir.name, started=started_at(run_dir).isoformat(timespec="seconds"),
                      last_stage=last_stage, finished=complete, test_metrics=metrics, version=version,
                      promotion=promotion)  # fmt: skip


def list_runs(
    artifacts_dir: str | Path, production_version: str | None = None, limit: int | None = 10
) -> list[RunSummary]:
    """The most recent runs first (at most `limit`; None for all)."""
    root = Path(artifacts_dir)
    folders = [path for path in root.iterdir() if path.is_dir() and is_run(path)] if root.is_dir() else []
    folders.sort(key=lambda path: (started_at(path), path.name), reverse=True)
    return [summarise_run(path, production_version) for path in folders[:limit]]


def require_run(artifacts_dir: str | Path, run_id: str) -> Path:
    """The folder of an existing run; a RunNotFoundError listing recent runs when there is none."""
    run_dir = Path(artifacts_dir) / run_id
    if run_id and Path(run_id).name == run_id and is_run(run_dir):
        return run_dir
    recent = [run.run_id for run in list_runs(artifacts_dir, limit=5)]
    known = f"recent runs: {', '.join(recent)}" if recent else "there are no runs yet"
    raise RunNotFoundError(f"no run {run_id!r} in {artifacts_dir} to resume ({known}); leave out --run-id to start one")


def format_runs(runs: list[RunSummary]) -> str:
    """A plain-text table of runs, one line each, for the terminal."""
    if not runs:
        return "no runs yet: start one with `python -m xray train`"
    header = ("run id", "started (UTC)", "last stage", "test ROC-AUC / sens / spec", "promotion")
    rows = [header]
    for run in runs:
        metrics = " / ".join(f"{run.test_metrics[name]:.3f}" for name in REPORTED_METRICS if name in run.test_metrics)
        rows.append((run.run_id, run.started.replace("+00:00", ""), run.last_stage, metrics or "-", run.promotion))
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in rows)  # fmt: skip
