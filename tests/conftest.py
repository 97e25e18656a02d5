"""Shared fixtures: tiny synthetic X-ray folders, isolated storage, artifacts and BentoML home."""

from __future__ import annotations

import dataclasses
import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

# BentoML reads its home once, at import: point it at a throw-away folder before anything imports it.
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="xray-bentoml-home-")
os.environ["BENTOML_DO_NOT_TRACK"] = "true"

from xray.config import PipelineConfig, load_config  # noqa: E402
from xray.storage import LocalStorage  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "kermany224"


def load_script(name: str):
    """scripts/<name>.py as a module, loaded once, without putting scripts/ on the import path."""
    import importlib.util
    import sys

    module = sys.modules.get(f"scripts_{name}")  # its own name: never an installed module of the same name
    if module is None:
        spec = importlib.util.spec_from_file_location(f"scripts_{name}", REPO / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
    return module


def hostile_uploads() -> list:
    """scripts/hostile_uploads.py's uploads (issue 9), each with the status and error it must get."""
    return load_script("hostile_uploads").hostile_uploads()


def synthetic_xray(class_name: str, seed: int, size: int = 48) -> Image.Image:
    """A noisy gray square; PNEUMONIA ones carry a bright blob, so a model can learn the classes."""
    generator = np.random.default_rng(seed)
    pixels = generator.normal(90, 25, (size, size))
    if class_name == "PNEUMONIA":
        rows, columns = np.mgrid[:size, :size]
        centre = generator.integers(size // 4, 3 * size // 4, 2)
        pixels += 110 * np.exp(-((rows - centre[0]) ** 2 + (columns - centre[1]) ** 2) / (2 * (size / 8) ** 2))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L")


def encode(image: Image.Image, image_format: str = "JPEG") -> bytes:
    """Image to file bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def make_dataset(root: Path, per_class: int = 24, split: str | None = None, start: int = 0) -> Path:
    """Write `[split/]CLASS/file` images named like the Kermany set (two images for some patients)."""
    base = root / split if split else root
    for index in range(start, start + per_class):
        patient = index // 2 if index % 3 == 0 else index + 1000
        normal = base / "NORMAL" / f"IM-{patient:04d}-{index:04d}.jpeg"
        pneumonia = base / "PNEUMONIA" / f"person{patient}_bacteria_{index}.jpeg"
        for path, class_name in ((normal, "NORMAL"), (pneumonia, "PNEUMONIA")):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode(synthetic_xray(class_name, seed=index * 2 + (class_name == "PNEUMONIA"))))
    return root


def write_kermany_like(root, names_by_class):
    for class_name, names in names_by_class.items():
        for index, name in enumerate(names):
            path = root / class_name / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode(synthetic_xray(class_name, seed=index * 2 + (class_name == "PNEUMONIA"))))


def kermany_like(root, per_class=16):
    """`train/` with early and late patients of both classes, and a `val/` of late ones beside it."""
    normal = [f"IM-{100 + index:04d}-0001.jpeg" for index in range(per_class // 2)]
    normal += [f"NORMAL2-IM-{1146 + index:04d}-0001.jpeg" for index in range(per_class // 2)]
    pneumonia = [f"person{1340 + index}_bacteria_{index}.jpeg" for index in range(per_class)]
    write_kermany_like(root / "train", {"NORMAL": normal, "PNEUMONIA": pneumonia})
    write_kermany_like(root / "val", {"NORMAL": ["NORMAL2-IM-1427-0001.jpeg"],
                                      "PNEUMONIA": ["person1946_bacteria_4874.jpeg"]})  # fmt: skip
    return root / "train"


REQUIRE_ALL_TESTS = os.environ.get("XRAY_REQUIRE_ALL_TESTS", "").lower() in ("1", "true", "yes")
"""CI sets XRAY_REQUIRE_ALL_TESTS=1: a skipped test is then a failure, unless it only lacks the shared X-rays."""


def is_optional_skip(reason: str) -> bool:
    """Skips CI may have: the tests that read the shared Kermany X-rays beside the repository."""
    return str(SHARED_DATA.parent) in reason or "shared" in reason.lower()


def fail_required_skip(report, prefix: str = "") -> None:
    """With XRAY_REQUIRE_ALL_TESTS, turn a skip for a missing tool (browser, linter) into a failure that says so."""
    if REQUIRE_ALL_TESTS and report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        if not is_optional_skip(reason):
            report.outcome = "failed"
            report.longrepr = f"{prefix}skipped, but XRAY_REQUIRE_ALL_TESTS is set: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A skipped test fails when every test is required."""
    outcome = yield
    fail_required_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """The same for a whole module skipped at import (the web-page test without a browser)."""
    outcome = yield
    report = outcome.get_result()
    fail_required_skip(report, f"{report.nodeid} ")


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep every test off the user's store, token, AWS settings and the repository's folders."""
    monkeypatch.chdir(tmp_path)
    for name in ("XRAY_STORAGE_URI", "XRAY_API_TOKEN", "XRAY_CONFIG", "XRAY_HOME", "XRAY_MODEL_CACHE", "AWS_PROFILE",
                 "AWS_ENDPOINT_URL"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def smoke_config(tmp_path: Path) -> PipelineConfig:
    """The smoke config with its artifacts under the test's own folder."""
    config = load_config(REPO / "configs" / "smoke.yaml")
    return dataclasses.replace(config, artifacts_dir=str(tmp_path / "artifacts"))


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    """An empty local store."""
    return LocalStorage(tmp_path / "store")


@pytest.fixture
def seeded_storage(tmp_path: Path, storage: LocalStorage) -> LocalStorage:
    """A local store holding a small synthetic labelled set under `data/`."""
    storage.upload_folder(make_dataset(tmp_path / "images"), "data")
    return storage


@pytest.fixture(scope="session")
def trained_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local store (and BentoML model store entry) with a promoted smoke model, trained once per session.

    Returns the store's folder; `models/production.json` names the version and the
    package sits under `models/<version>/`. Treat it as read-only: copy it to change it.
    """
    from xray.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("trained")
    storage = LocalStorage(root / "store")
    storage.upload_folder(make_dataset(root / "images"), "data")
    config = dataclasses.replace(load_config(REPO / "configs" / "smoke.yaml"), artifacts_dir=str(root / "artifacts"))
    result = run_pipeline(config, storage, run_id="smoke-model")
    assert result.pushed
    return root / "store"


@pytest.fixture(scope="session")
def trained_package(trained_store: Path) -> Path:
    """The promoted smoke model's package folder (model.safetensors + model_card.json)."""
    return trained_store / "models" / "smoke-model"


class MotoServer:
    """moto's S3 server on one 127.0.0.1 port, speaking real HTTP; it can stop and start again on the same port.

    moto keeps its buckets in this process, so they outlive a stop: a restart is storage coming back.
    """

    def __init__(self) -> None:
        self.port = 0
        self.server = None
        self.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.port = self.server.get_host_and_port()[1]

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@pytest.fixture(scope="session")
def moto_server():
    """One moto S3 server for the session (see MotoServer)."""
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def moto_endpoint_up(moto_server):
    """The session's moto server, started again after the test if the test stopped it."""
    yield moto_server
    if moto_server.server is None:
        moto_server.start()


@pytest.fixture
def moto_bucket(moto_endpoint_up, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """A fresh bucket on the moto server, with fake credentials and the endpoint in the environment; its s3:// URI."""
    import uuid

    import boto3

    empty = tmp_path / "aws-empty"
    empty.write_text("")
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": moto_endpoint_up.endpoint,
                        "AWS_SHARED_CREDENTIALS_FILE": str(empty), "AWS_CONFIG_FILE": str(empty),
                        "AWS_EC2_METADATA_DISABLED": "true"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    bucket = f"xray-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}"


class ServingClient(TestClient):
    """A TestClient that, once the app has started, waits for its first look at production.

    The app loads its model in the background (so /health answers at once); tests that predict
    right away wait here for that first check, whatever it found.
    """

    def __enter__(self) -> ServingClient:
        client = super().__enter__()
        follower = self.app.state.follower
        if follower is not None:
            assert follower.checked.wait(120), "the app's first check of production did not end within 120 s"
        return client
