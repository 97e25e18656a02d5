"""Deployment settings from the environment: each variable's name, default and meaning, defined once.

Experiment settings live in the YAML configs (`xray.config`); these are the knobs of a
deployment (where storage is, limits, tokens). Every `XRAY_*` variable the code reads is a
field of `Settings` below, so the README, the error messages and the code share one list.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xray.config import ConfigError

DEFAULT_STORAGE_URI = "store"
DEFAULT_CONFIG_PATH = "configs/config.yaml"
INFERENCE_RUNTIMES = ("auto", "onnx", "torch")  # XRAY_INFERENCE_RUNTIME; xray.runtime.load_forward


def variable(name: str, default: Any, help: str, minimum: float | None = None, path: bool = False,
             choices: tuple[str, ...] = ()) -> Any:  # fmt: skip
    """A settings field read from environment variable `name` (empty means the default).

    A `path` field holding a relative path is resolved from XRAY_HOME, so the command's folder does not matter;
    a field with `choices` accepts only those words.
    """
    metadata = {"variable": name, "help": help, "minimum": minimum, "path": path, "choices": choices}
    return field(default=default, metadata=metadata)


def resolve_path(path: str | Path, home: str | Path) -> Path:
    """`path` itself when absolute (or `~/...`), else `home/path`: the one rule for relative paths."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else Path(home).expanduser().absolute() / path


def is_local_path(uri: str) -> bool:
    """Whether a storage URI is a plain folder (not `s3://`, `file://` or another scheme)."""
    return "://" not in uri


@dataclass(frozen=True)
class Settings:
    """Deployment settings read from the environment (never from a config file)."""

    home: str = variable(
        "XRAY_HOME", ".", "the folder relative paths in settings and configs start from (default: the current folder)"
    )
    storage_uri: str = variable(
        "XRAY_STORAGE_URI", DEFAULT_STORAGE_URI,
        "where data, models and jobs live: a folder, file:// or s3://bucket/prefix", path=True,
    )  # fmt: skip
    config_path: str = variable(
        "XRAY_CONFIG", DEFAULT_CONFIG_PATH,
        "the experiment YAML that retraining uses (a relative path missing under XRAY_HOME is looked up in the "
        "project's configs/)",
    )  # fmt: skip
    api_token: str | None = variable(
        "XRAY_API_TOKEN", None, "bearer token for /train (training over HTTP is off without it)"
    )
    max_upload_bytes: int = variable("XRAY_MAX_UPLOAD_BYTES", 20 * 1024 * 1024, "largest accepted upload, in bytes", 1)
    max_batch_files: int = variable("XRAY_MAX_BATCH_FILES", 32, "most files in one /predict/batch request", 1)
    max_batch_request_bytes: int = variable(
        "XRAY_MAX_BATCH_REQUEST_BYTES", 64 * 1024 * 1024, "largest /predict/batch request body, in bytes", 1
    )
    max_image_pixels: int = variable(
        "XRAY_MAX_IMAGE_PIXELS", 25_000_000, "most pixels (width x height) an upload may have; bounds decode memory", 1
    )
    max_queued_images: int = variable(
        "XRAY_MAX_QUEUED_IMAGES", 128, "images waiting for the model before requests are shed with 503", 1
    )
    max_queued_explanations: int = variable(
        "XRAY_MAX_QUEUED_EXPLANATIONS", 8,
        "/explain requests decoding, waiting for or running Grad-CAM before more are shed with 503", 1,
    )  # fmt: skip
    batch_size: int = variable("XRAY_BATCH_SIZE", 16, "most images the micro-batcher scores in one forward pass", 1)
    batch_wait_ms: float = variable(
        "XRAY_BATCH_WAIT_MS", 2.0, "how long the micro-batcher waits for more images before a forward pass", 0
    )
    torch_threads: int = variable(
        "XRAY_TORCH_THREADS",
        0,
        "serving's forward-pass threads, ONNX Runtime or torch (0: half the cores)",
        0,
    )
    inference_runtime: str = variable(
        "XRAY_INFERENCE_RUNTIME", "auto",
        "what runs the model's forward pass: onnx (ONNX Runtime, from the package's model.onnx), torch, or auto "
        "(onnx when the package has it and onnxruntime is installed)", choices=INFERENCE_RUNTIMES,
    )  # fmt: skip
    decode_workers: int = variable(
        "XRAY_DECODE_WORKERS", 0, "uploads decoded at once (0: one per core); bounds decode CPU and memory", 0
    )
    model_cache_dir: str = variable(
        "XRAY_MODEL_CACHE", "artifacts/cache/models", "local copy of downloaded models", path=True
    )
    bentoml_model: str | None = variable(
        "XRAY_BENTOML_MODEL", None, "model store tag `bentoml serve` loads (default: the config's pusher name)"
    )
    model_poll_seconds: float = variable(
        "XRAY_MODEL_POLL_SECONDS", 30.0, "how often each instance checks production.json for a new model", 0.05
    )
    storage_timeout_seconds: float = variable(
        "XRAY_STORAGE_TIMEOUT_SECONDS", 5.0, "the server's connect and read timeout on S3 (two attempts)", 0.1
    )
    training_lease_seconds: float = variable(
        "XRAY_TRAINING_LEASE_SECONDS", 120.0, "training lease lifetime: a trainer that stops renewing frees it", 1
    )
    training_threads: int = variable(
        "XRAY_TRAINING_THREADS", 0, "torch threads of a training process started by /train (0: half the cores)", 0
    )
    jobs_kept: int = variable("XRAY_JOBS_KEPT", 50, "newest training job records kept in storage", 1)

    @classmethod
    def variables(cls) -> dict[str, dataclasses.Field]:
        """Environment variable name -> its settings field, for docs, errors and tests."""
        return {item.metadata["variable"]: item for item in dataclasses.fields(cls)}

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every `XRAY_*` variable; a malformed value is a ConfigError naming the variable."""
        environ = os.environ if environ is None else environ
        hints = typing.get_type_hints(cls)
        values = {}
        for item in dataclasses.fields(cls):
            raw = environ.get(item.metadata["variable"])
            if raw is None or raw.strip() == "":
                continue
            values[item.name] = parse(item, hints[item.name], raw.strip())
        settings = cls(**values)
        home = settings.home_dir
        resolved = {item.name: str(resolve_path(getattr(settings, item.name), home))
                    for item in dataclasses.fields(cls)
                    if item.metadata["path"] and is_local_path(getattr(settings, item.name))}  # fmt: skip
        return dataclasses.replace(settings, home=str(home), **resolved)

    @property
    def home_dir(self) -> Path:
        """XRAY_HOME as an absolute folder: where relative paths in settings and configs start."""
        return Path(self.home).expanduser().absolute()


def parse(item: dataclasses.Field, expected: Any, raw: str) -> Any:
    """One variable's text as its field's type, checked against its minimum."""
    name, minimum = item.metadata["variable"], item.metadata["minimum"]
    options = [option for option in typing.get_args(expected) if option is not type(None)]
    kind = options[0] if options else expected
    if kind is bool:
        if raw.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise ConfigError(f"environment variable {name}={raw!r} must be true or false")
        return raw.lower() in ("1", "true", "yes", "on")
    if kind in (int, float):
        try:
            value = kind(raw)
        except ValueError:
            noun = "a whole number" if kind is int else "a number"
            raise ConfigError(f"environment variable {name}={raw!r} must be {noun}") from None
        if minimum is not None and value < minimum:
            raise ConfigError(f"environment variable {name}={raw!r} must be at least {minimum:g}")
        return value
    choices = item.metadata["choices"]
    if choices and raw.lower() not in choices:
        raise ConfigError(f"environment variable {name}={raw!r} must be one of {', '.join(choices)}")
    return raw.lower() if choices else raw
