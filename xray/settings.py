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
from typing import Any

from xray.config import ConfigError

DEFAULT_STORAGE_URI = "store"
DEFAULT_CONFIG_PATH = "configs/config.yaml"


def variable(name: str, default: Any, help: str, minimum: float | None = None) -> Any:
    """A settings field read from environment variable `name` (empty means the default)."""
    return field(default=default, metadata={"variable": name, "help": help, "minimum": minimum})


@dataclass(frozen=True)
class Settings:
    """Deployment settings read from the environment (never from a config file)."""

    storage_uri: str = variable(
        "XRAY_STORAGE_URI", DEFAULT_STORAGE_URI, "where data, models and jobs live: a folder, file:// or s3://bucket/prefix"
    )
    config_path: str = variable("XRAY_CONFIG", DEFAULT_CONFIG_PATH, "the experiment YAML that retraining uses")
    api_token: str | None = variable(
        "XRAY_API_TOKEN", None, "bearer token for /train (training over HTTP is off without it)"
    )
    max_upload_bytes: int = variable("XRAY_MAX_UPLOAD_BYTES", 20 * 1024 * 1024, "largest accepted upload, in bytes", 1)
    max_batch_files: int = variable("XRAY_MAX_BATCH_FILES", 32, "most files in one /predict/batch request", 1)
    model_cache_dir: str = variable("XRAY_MODEL_CACHE", "artifacts/cache/models", "local copy of downloaded models")
    bentoml_model: str | None = variable(
        "XRAY_BENTOML_MODEL", None, "model store tag `bentoml serve` loads (default: the config's pusher name)"
    )

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
        return cls(**values)


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
    return raw
