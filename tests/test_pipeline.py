"""Whole runs: synthetic data on local storage and on S3 over HTTP, and the bundled real X-rays."""

from __future__ import annotations

import dataclasses

import boto3
import numpy as np
import pytest

from tests.conftest import REPO, make_dataset
from xray.package import production_version
from xray.pipeline import run_pipeline
from xray.storage import LocalStorage, S3Storage


def test_smoke_run_on_local_storage_promotes_a_model(smoke_config, seeded_storage):
    events = []
    result = run_pipeline(smoke_config, seeded_storage, progress=events.append)
    assert result.pushed and production_version(seeded_storage) == result.version
    stages = [event["stage"] for event in events if "epoch" not in event]
    assert stages == ["started", "data_ingestion", "data_transformation", "model_trainer", "model_evaluation",
                      "model_pusher"]
    assert result.evaluation.test_metrics["roc_auc"] > 0.8


def test_a_two_channel_input_runs_end_to_end_and_serves_from_its_package(smoke_config, seeded_storage):
    """`intensity: equalize_with_raw`: trained, evaluated, exported to ONNX, served and explained with two channels."""
    from xray.explain import evidence_maps
    from xray.inference import Predictor
    from xray.package import fetch_production

    transformation = dataclasses.replace(smoke_config.transformation, intensity="equalize_with_raw")
    result = run_pipeline(dataclasses.replace(smoke_config, transformation=transformation), seeded_storage)
    assert result.pushed and result.evaluation.test_metrics["roc_auc"] > 0.8
    predictor = Predictor.from_package(fetch_production(seeded_storage, seeded_storage.root / "cache"))
    assert predictor.preprocessing.input_channels == 2 and predictor.card.onnx["file"] == "model.onnx"
    images = [path for path in (seeded_storage.root / "data").rglob("*") if path.suffix == ".jpeg"]
    batch = np.stack([predictor.decode(path.read_bytes()) for path in images])
    assert ((predictor.probabilities(batch) >= 0) & (predictor.probabilities(batch) <= 1)).all()
    maps = evidence_maps(predictor, batch)  # Grad-CAM through the two-channel stem, back to the image
    assert maps.shape == batch.shape and np.isfinite(maps).all() and (maps >= 0).all()
    assert (maps.sum(axis=(1, 2)) > 0).any(), "the gradients must reach the two-channel input"



@pytest.fixture
def moto_endpoint(monkeypatch):
    """A real S3 endpoint over HTTP on 127.0.0.1 (moto's server mode)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
        monkeypatch.setenv(name, value)
    yield f"http://{host}:{port}"
    server.stop()


def test_smoke_run_against_s3_over_http(tmp_path, smoke_config, moto_endpoint):
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket="xrays")
    storage = S3Storage("xrays", "team/pneumonia")
    storage.upload_folder(make_dataset(tmp_path / "images", per_class=16), "data")
    result = run_pipeline(smoke_config, storage)
    assert result.pushed
    keys = boto3.client("s3", endpoint_url=moto_endpoint).list_objects_v2(Bucket="xrays")["Contents"]
    assert f"team/pneumonia/models/{result.version}/model.safetensors" in {item["Key"] for item in keys}
    assert production_version(storage) == result.version


def test_bundled_real_xrays_train_a_useful_model(tmp_path, smoke_config):
    storage = LocalStorage(tmp_path / "store")
    storage.upload_folder(REPO / "data" / "sample", "data")
    config = dataclasses.replace(smoke_config, transformation=dataclasses.replace(
        smoke_config.transformation, image_size=64), trainer=dataclasses.replace(smoke_config.trainer, epochs=3))
    result = run_pipeline(config, storage)
    assert result.evaluation.trainer.transformation.ingestion.class_counts == {"NORMAL": 150, "PNEUMONIA": 150}
    assert result.evaluation.test_metrics["roc_auc"] > 0.85


def test_same_config_and_seed_repeat_the_metrics(tmp_path, smoke_config, seeded_storage):
    first = run_pipeline(smoke_config, seeded_storage, run_id="first")
    again = dataclasses.replace(smoke_config, artifacts_dir=str(tmp_path / "elsewhere"))
    second = run_pipeline(again, seeded_storage, run_id="second")
    for name in ("roc_auc", "pr_auc", "sensitivity", "specificity", "threshold"):
        assert round(first.evaluation.test_metrics[name], 3) == round(second.evaluation.test_metrics[name], 3), name
    assert first.evaluation.trainer.best_validation_roc_auc == pytest.approx(
        second.evaluation.trainer.best_validation_roc_auc, abs=1e-3)
