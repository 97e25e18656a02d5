"""The typed records each stage emits: paths, keys and scalars only, serialised as JSON.

Each artifact embeds the one it was built from, so a single `artifact.json` tells the
whole story of a stage and data flows one way through the pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

ArtifactType = TypeVar("ArtifactType", bound="Artifact")
ARTIFACT_FILE = "artifact.json"


class Artifact:
    """Shared JSON round-trip for the stage records."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (nested artifacts included)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def save(self, directory: str | Path) -> Path:
        """Write `artifact.json` into the stage folder, atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / ARTIFACT_FILE
        temporary = target.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))
        temporary.replace(target)
        return target

    @classmethod
    def from_dict(cls: type[ArtifactType], raw: dict[str, Any]) -> ArtifactType:
        """Rebuild an artifact (and the artifacts nested in it) from a plain dict."""
        hints = typing.get_type_hints(cls)
        values = {}
        for item in dataclasses.fields(cls):  # type: ignore[arg-type]
            if item.name not in raw and item.default is not dataclasses.MISSING:
                continue  # written before the field existed
            value = raw[item.name]
            hint = hints[item.name]
            if isinstance(hint, type) and issubclass(hint, Artifact) and value is not None:
                value = hint.from_dict(value)
            values[item.name] = value
        return cls(**values)

    @classmethod
    def load(cls: type[ArtifactType], path: str | Path) -> ArtifactType:
        """Read an artifact from its `artifact.json` (or the folder holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / ARTIFACT_FILE
        return cls.from_dict(json.loads(path.read_text()))


@dataclass(frozen=True)
class RunInfo(Artifact):
    """Identity of one pipeline run and the folder its outputs go to."""

    run_id: str
    run_dir: str
    storage_uri: str


@dataclass(frozen=True)
class DataIngestionArtifact(Artifact):
    """The images fetched from storage, checked, with a manifest and a report of what was dropped."""

    run: RunInfo
    image_dir: str
    manifest_path: str
    manifest_sha256: str
    report_path: str
    class_counts: dict[str, int]
    given_split_counts: dict[str, int]
    rejected_count: int
    duplicate_count: int


@dataclass(frozen=True)
class DataTransformationArtifact(Artifact):
    """Patient-level splits, the preprocessing serving must repeat, and the decoded image cache."""

    ingestion: DataIngestionArtifact
    splits_path: str
    cache_path: str
    preprocessing: dict[str, Any]
    augmentation: dict[str, Any]
    split_counts: dict[str, dict[str, int]]
    patient_counts: dict[str, int]


@dataclass(frozen=True)
class ModelTrainerArtifact(Artifact):
    """The best checkpoint by validation ROC-AUC, the resumable last checkpoint, and the history."""

    transformation: DataTransformationArtifact
    architecture: str
    weights_path: str
    checkpoint_path: str
    history_path: str
    best_epoch: int
    best_validation_roc_auc: float
    epochs_run: int
    stopped_early: bool
    device: str
    seconds: float


@dataclass(frozen=True)
class ModelEvaluationArtifact(Artifact):
    """Test-split metrics at a threshold chosen on validation, and whether the model is accepted."""

    trainer: ModelTrainerArtifact
    threshold: float
    temperature: float
    validation_metrics: dict[str, Any]
    test_metrics: dict[str, Any]
    production_version: str | None
    production_metrics: dict[str, Any] | None
    accepted: bool
    reason: str
    report_path: str
    plot_paths: dict[str, str]
    bias: float = 0.0
    external_sites: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class ModelPusherArtifact(Artifact):
    """Where an accepted model was published, or why nothing changed."""

    evaluation: ModelEvaluationArtifact
    pushed: bool
    version: str | None
    package_dir: str | None
    storage_prefix: str | None
    bentoml_tag: str | None
    reason: str
