"""The model package (weights + card), its place in storage, and the production pointer.

A package is a folder holding `model.safetensors` (loads without unpickling code) and
`model_card.json` (everything needed to use and to reproduce the model). Storage keeps
packages under `models/<version>/`; `models/production.json` names the one in service
and is written last, so a reader never follows it to a half-written package.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from xray.model import build_model
from xray.preprocessing import Preprocessing
from xray.storage import Storage, StorageNotFoundError

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model_card.json"
PACKAGE_FILES = (WEIGHTS_FILE, CARD_FILE)
PRODUCTION_POINTER = "production.json"


class PackageError(RuntimeError):
    """A model package that is missing, incomplete or inconsistent."""


@dataclass(frozen=True)
class ModelCard:
    """What a model is, how to feed it, how good it is and how it was made."""

    version: str
    architecture: str
    classes: list[str]
    preprocessing: dict[str, Any]
    threshold: float
    temperature: float = 1.0
    bias: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    validation_metrics: dict[str, Any] = field(default_factory=dict)
    data_manifest_sha256: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    code_version: str = ""
    run_id: str = ""
    created_at: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)  # e.g. a site calibration's parent and sample

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelCard:
        """Rebuild from JSON, ignoring keys a newer writer may have added."""
        known = set(cls.__dataclass_fields__)
        return cls(**{key: value for key, value in raw.items() if key in known})

    @property
    def preprocessing_spec(self) -> Preprocessing:
        """The preprocessing as the typed object the inference core uses."""
        return Preprocessing.from_dict(self.preprocessing)


def code_version() -> str:
    """The git commit of the code that made a model, or the package version outside git."""
    from xray import __version__

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True, cwd=Path(__file__).parent,
        ).stdout.strip()  # fmt: skip
        return f"{__version__}+{commit}"
    except (OSError, subprocess.SubprocessError):
        return __version__


def environment() -> dict[str, str]:
    """Library versions and platform that made a model, so a run can be repeated."""
    import platform

    import numpy
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "platform": platform.platform()}  # fmt: skip


def utc_now() -> str:
    """The current time as an ISO 8601 UTC string."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_package(directory: str | Path, model: torch.nn.Module, card: ModelCard) -> Path:
    """Write weights and card into `directory` (created), returning it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"architecture": card.architecture})
    (directory / CARD_FILE).write_text(json.dumps(card.to_dict(), indent=2, sort_keys=True))
    return directory


def read_card(directory: str | Path) -> ModelCard:
    """The card of a package folder."""
    path = Path(directory) / CARD_FILE
    if not path.is_file():
        raise PackageError(f"{directory} is not a model package: {CARD_FILE} is missing")
    return ModelCard.from_dict(json.loads(path.read_text()))


def load_package(directory: str | Path) -> tuple[torch.nn.Module, ModelCard]:
    """The model (eval mode, CPU) and its card, loaded strictly from a package folder."""
    card = read_card(directory)
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise PackageError(f"{directory} is not a model package: {WEIGHTS_FILE} is missing")
    model = build_model(card.architecture, pretrained=False)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval(), card


def publish(storage: Storage, package_dir: str | Path, version: str, models_prefix: str = "models") -> str:
    """Upload a package to `models/<version>/`, then point production at it; returns the key prefix."""
    package_dir = Path(package_dir)
    prefix = f"{models_prefix}/{version}"
    for name in PACKAGE_FILES:
        storage.upload_file(package_dir / name, f"{prefix}/{name}")
    storage.write_json(
        f"{models_prefix}/{PRODUCTION_POINTER}",
        {"version": version, "prefix": prefix, "published_at": utc_now()},
    )
    logger.info("published model %s to %s/%s", version, storage.uri, prefix)
    return prefix


def production_version(storage: Storage, models_prefix: str = "models") -> str | None:
    """The version production points at, or None before the first promotion."""
    try:
        pointer = storage.read_json(f"{models_prefix}/{PRODUCTION_POINTER}")
    except StorageNotFoundError:
        return None
    return pointer.get("version")


def fetch_package(storage: Storage, version: str, cache_dir: str | Path, models_prefix: str = "models") -> Path:
    """Download a published package into `cache_dir/<version>` (reused when already there)."""
    target = Path(cache_dir) / version
    if all((target / name).is_file() for name in PACKAGE_FILES):
        return target
    staging = Path(cache_dir) / f".{version}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    for name in PACKAGE_FILES:
        storage.download_file(f"{models_prefix}/{version}/{name}", staging / name)
    shutil.rmtree(target, ignore_errors=True)
    staging.replace(target)
    return target


def fetch_production(storage: Storage, cache_dir: str | Path, models_prefix: str = "models") -> Path | None:
    """Download the production package, or None when nothing was promoted yet."""
    version = production_version(storage, models_prefix)
    if version is None:
        return None
    return fetch_package(storage, version, cache_dir, models_prefix)


def save_to_bentoml(package_dir: str | Path, card: ModelCard, model_name: str) -> str:
    """Copy a package into the BentoML model store with the card as metadata; returns the tag."""
    import bentoml

    metadata = {
        "version": card.version,
        "architecture": card.architecture,
        "threshold": card.threshold,
        "classes": ",".join(card.classes),
        "data_manifest_sha256": card.data_manifest_sha256,
        "code_version": card.code_version,
        "roc_auc": card.metrics.get("roc_auc"),
    }
    with bentoml.models.create(model_name, labels={"run_id": card.run_id}, metadata=metadata) as store_model:
        for name in PACKAGE_FILES:
            shutil.copy2(Path(package_dir) / name, Path(store_model.path) / name)
    tag = str(store_model.tag)
    logger.info("saved model %s to the BentoML model store as %s", card.version, tag)
    return tag
