"""The model package (weights + card), its place in storage, and the production pointer.

A package is a folder holding `model.safetensors` (loads without unpickling code) and
`model_card.json` (everything needed to use and to reproduce the model). Storage keeps
packages under `<models_prefix>/<version>/` (the config's `pusher.models_prefix`);
`production.json` there names the one in service. It is written last, so a reader never
follows it to a half-written package, and only over the pointer its writer read (a
conditional write on its ETag), so two promotions racing cannot both win. Every version
read from storage must match `VERSION_PATTERN` before it becomes a key or a folder name.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xray.clock import utc_now
from xray.config import PusherConfig
from xray.preprocessing import Preprocessing
from xray.storage import Storage, StorageNotFoundError

if TYPE_CHECKING:
    import torch

# torch, safetensors and the model factory are imported inside the functions that write or load
# weights: reading the production pointer or a card (the API at start, the CLI) needs none of them.

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model_card.json"
PACKAGE_FILES = (WEIGHTS_FILE, CARD_FILE)
PRODUCTION_POINTER = "production.json"
DEFAULT_MODELS_PREFIX = PusherConfig.models_prefix
# A run id such as 20261129-150809-a1b2c3: letters, digits, '.', '_' and '-', never '..' nor a leading dot.
VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class PackageError(RuntimeError):
    """A model package that is missing, incomplete or inconsistent."""


class PromotionConflictError(PackageError):
    """Production changed between the evaluation that compared against it and the promotion."""


def check_version(version: object) -> str:
    """`version` if it is a safe version name; PackageError otherwise (it becomes a storage key and a folder)."""
    if not isinstance(version, str) or not VERSION_PATTERN.fullmatch(version) or ".." in version:
        raise PackageError(f"refusing model version {str(version)[:80]!r}: a version is 1-128 letters, digits, "
                           "'.', '_' or '-' and starts with a letter or digit")  # fmt: skip
    return version


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
    onnx: dict[str, Any] = field(default_factory=dict)  # the ONNX export shipped beside the weights, and its check

    @property
    def files(self) -> tuple[str, ...]:
        """The files of this model's package: weights and card, and model.onnx when it was exported."""
        return PACKAGE_FILES + ((self.onnx["file"],) if self.onnx.get("file") else ())

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
    import torch
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "platform": platform.platform()}  # fmt: skip


def write_package(directory: str | Path, model: torch.nn.Module, card: ModelCard) -> Path:
    """Write weights, the ONNX export (when it matches torch) and the card into `directory` (created).

    The card records the export and its largest logit difference from torch; a failed or
    mismatching export is logged and left out, and serving then runs the weights in torch.
    """
    from safetensors.torch import save_file

    from xray.runtime import ONNX_FILE, ONNX_OPSET, ONNX_TOLERANCE, export_onnx, on_device

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = on_device(model, "cpu")  # weights and export from the CPU; the caller's model stays where it is
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"architecture": card.architecture})
    onnx: dict[str, Any] = {}
    try:
        difference = export_onnx(model, card.preprocessing_spec, directory / ONNX_FILE)
        onnx = {"file": ONNX_FILE, "opset": ONNX_OPSET, "max_logit_difference": difference,
                "tolerance": ONNX_TOLERANCE}  # fmt: skip
    except RuntimeError as error:
        logger.warning("model %s ships without ONNX (serving runs it in torch): %s", card.version, error)
    card = replace(card, onnx=onnx)
    (directory / CARD_FILE).write_text(json.dumps(card.to_dict(), indent=2, sort_keys=True))
    return directory


def read_card(directory: str | Path) -> ModelCard:
    """The card of a package folder."""
    path = Path(directory) / CARD_FILE
    if not path.is_file():
        raise PackageError(f"{directory} is not a model package: {CARD_FILE} is missing")
    return ModelCard.from_dict(json.loads(path.read_text()))


def check_package(directory: str | Path) -> ModelCard:
    """The card of a package folder, once every file it names is there (PackageError naming the missing one)."""
    card = read_card(directory)
    for name in card.files:
        if not (Path(directory) / name).is_file():
            raise PackageError(f"{directory} is not a model package: {name} is missing")
    return card


def load_package(directory: str | Path) -> tuple[torch.nn.Module, ModelCard]:
    """The model (eval mode, CPU) and its card, loaded strictly from a package folder."""
    from safetensors.torch import load_file

    from xray.model import build_model_for

    card = read_card(directory)
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise PackageError(f"{directory} is not a model package: {WEIGHTS_FILE} is missing")
    model = build_model_for(card.architecture, card.preprocessing)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval(), card


def upload_package(storage: Storage, package_dir: str | Path, version: str,
                   models_prefix: str = DEFAULT_MODELS_PREFIX) -> str:  # fmt: skip
    """Upload a package's files to `<models_prefix>/<version>/`; returns that prefix. Production is unchanged."""
    package_dir = Path(package_dir)
    prefix = f"{models_prefix}/{check_version(version)}"
    for name in read_card(package_dir).files:
        storage.upload_file(package_dir / name, f"{prefix}/{name}")
    return prefix


def read_pointer(storage: Storage, models_prefix: str = DEFAULT_MODELS_PREFIX) -> tuple[str | None, str | None]:
    """(version, ETag) of the production pointer, or (None, None) before the first promotion; the version checked."""
    try:
        data, etag = storage.read_bytes_with_etag(f"{models_prefix}/{PRODUCTION_POINTER}")
    except StorageNotFoundError:
        return None, None
    return parse_pointer(data), etag


def parse_pointer(data: bytes) -> str:
    """The version a production.json names; PackageError when it is not JSON or names no safe version."""
    try:
        pointer = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise PackageError(f"{PRODUCTION_POINTER} is not valid JSON") from None
    if not isinstance(pointer, dict):
        raise PackageError(f"{PRODUCTION_POINTER} is not a JSON object")
    return check_version(pointer.get("version"))


def promote(storage: Storage, version: str, expected: str | None, models_prefix: str = DEFAULT_MODELS_PREFIX) -> None:
    """Point production at `version`, only if it still names `expected` (None: no production yet).

    The pointer is replaced with a conditional write on the ETag just read, so of two promotions racing
    exactly one wins; the loser gets PromotionConflictError and production names the winner's package.
    """
    check_version(version)
    key = f"{models_prefix}/{PRODUCTION_POINTER}"
    current, etag = read_pointer(storage, models_prefix)
    if current != expected:
        raise PromotionConflictError(f"production moved to {current or 'nothing'} after evaluation compared against "
                                     f"{expected or 'no production model'}")  # fmt: skip
    pointer = {"version": version, "prefix": f"{models_prefix}/{version}", "previous": expected,
               "published_at": utc_now()}  # fmt: skip
    data = (json.dumps(pointer, indent=2, sort_keys=True) + "\n").encode()
    written = (
        storage.write_bytes_if_absent(key, data) if etag is None else storage.write_bytes_if_match(key, data, etag)
    )
    if written is None:
        raise PromotionConflictError(f"another promotion changed {PRODUCTION_POINTER} while {version} was promoted")
    logger.info("production model: %s (was %s) in %s", version, expected or "none", storage.uri)


def publish(storage: Storage, package_dir: str | Path, version: str, models_prefix: str = DEFAULT_MODELS_PREFIX,
            expected: str | None = None) -> str:  # fmt: skip
    """Upload a package, then point production at it if production still names `expected`; returns the prefix."""
    prefix = upload_package(storage, package_dir, version, models_prefix)
    promote(storage, version, expected, models_prefix)
    return prefix


def production_version(storage: Storage, models_prefix: str = DEFAULT_MODELS_PREFIX) -> str | None:
    """The (checked) version production points at, or None before the first promotion."""
    return read_pointer(storage, models_prefix)[0]


def fetch_package(storage: Storage, version: str, cache_dir: str | Path,
                  models_prefix: str = DEFAULT_MODELS_PREFIX) -> Path:  # fmt: skip
    """Download a published package into `cache_dir/<version>` (reused when already there).

    Files arrive in a hidden staging folder that is renamed into place only when complete, so an
    interrupted download leaves nothing under the version's name and the next call starts again.
    """
    target = Path(cache_dir) / check_version(version)
    if (target / CARD_FILE).is_file() and all((target / name).is_file() for name in read_card(target).files):
        return target
    staging = Path(cache_dir) / f".{version}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        storage.download_file(f"{models_prefix}/{version}/{CARD_FILE}", staging / CARD_FILE)
        for name in read_card(staging).files:
            if name == CARD_FILE:
                continue
            storage.download_file(f"{models_prefix}/{version}/{name}", staging / name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    staging.replace(target)
    return target


def fetch_production(
    storage: Storage, cache_dir: str | Path, models_prefix: str = DEFAULT_MODELS_PREFIX
) -> Path | None:
    """Download the production package, or None when nothing was promoted yet."""
    version = production_version(storage, models_prefix)
    if version is None:
        return None
    return fetch_package(storage, version, cache_dir, models_prefix)


def prune_cache(cache_dir: str | Path, keep: set[str]) -> list[str]:
    """Remove cached packages other than the versions in `keep` (the current and the previous); returns the removed."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    removed = []
    for path in sorted(cache_dir.iterdir()):
        if path.is_dir() and not path.name.startswith(".") and path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    if removed:
        logger.info("removed cached model packages %s", ", ".join(removed))
    return removed


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
        for name in read_card(package_dir).files:  # the written card: it names the ONNX export when there is one
            shutil.copy2(Path(package_dir) / name, Path(store_model.path) / name)
    tag = str(store_model.tag)
    logger.info("saved model %s to the BentoML model store as %s", card.version, tag)
    return tag
