"""Stage 5: an accepted model becomes production in storage and BentoML; a rejected one changes nothing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import bentoml

from xray.components import data_ingestion, data_transformation, model_evaluation, model_pusher, model_trainer
from xray.package import load_package, production_version
from xray.pipeline import start_run


def evaluated(config, storage, run_id="run-1"):
    ingestion = data_ingestion.run(config, start_run(config, storage, run_id), storage)
    transformation = data_transformation.run(config, ingestion, storage)
    return model_evaluation.run(config, model_trainer.run(config, transformation, storage), storage)


def test_accepted_model_is_published_and_in_the_bentoml_store(tmp_path, smoke_config, seeded_storage):
    artifact = model_pusher.run(smoke_config, evaluated(smoke_config, seeded_storage), seeded_storage)
    assert artifact.pushed and artifact.version == "run-1"
    assert seeded_storage.list("models/") == [
        "models/production.json", "models/run-1/model.onnx", "models/run-1/model.safetensors",
        "models/run-1/model_card.json"]  # fmt: skip
    assert production_version(seeded_storage) == "run-1"
    seeded_storage.download_prefix("models/run-1", tmp_path / "package")
    model, card = load_package(tmp_path / "package")
    assert card.version == "run-1" and card.architecture == "small_cnn"
    assert card.classes == ["NORMAL", "PNEUMONIA"]
    assert card.preprocessing["image_size"] == smoke_config.transformation.image_size
    assert len(card.data_manifest_sha256) == 64 and card.config["seed"] == smoke_config.seed
    assert 0 < card.threshold < 1 and "roc_auc" in card.metrics
    assert card.temperature == artifact.evaluation.temperature and card.bias == artifact.evaluation.bias
    assert card.environment["torch"] and card.code_version and card.training["split_counts"]["test"]
    stored = bentoml.models.get(artifact.bentoml_tag)
    assert stored.info.metadata["version"] == "run-1"
    assert (stored.path_of("model.safetensors"))
    assert card.onnx["max_logit_difference"] <= 1e-4 and Path(stored.path_of("model.onnx")).is_file()


def test_rejected_model_changes_nothing(smoke_config, seeded_storage):
    model_pusher.run(smoke_config, evaluated(smoke_config, seeded_storage, "run-1"), seeded_storage)
    before = {key: seeded_storage.read_bytes(key) for key in seeded_storage.list("models/")}
    bentoml_models = len(bentoml.models.list("xray-pneumonia"))
    strict = dataclasses.replace(smoke_config, evaluation=dataclasses.replace(
        smoke_config.evaluation, minimum_improvement=1.0))
    artifact = model_pusher.run(strict, evaluated(strict, seeded_storage, "run-2"), seeded_storage)
    assert not artifact.pushed and artifact.reason.startswith("not pushed")
    assert {key: seeded_storage.read_bytes(key) for key in seeded_storage.list("models/")} == before
    assert len(bentoml.models.list("xray-pneumonia")) == bentoml_models


def test_production_that_moved_after_evaluation_is_not_overwritten(tmp_path, smoke_config, seeded_storage):
    evaluation = evaluated(smoke_config, seeded_storage, "run-1")
    assert evaluation.accepted and evaluation.production_version is None
    other = model_pusher.run(smoke_config, evaluated(smoke_config, seeded_storage, "run-2"), seeded_storage)
    assert other.pushed  # e.g. a CLI run promoted its model meanwhile
    artifact = model_pusher.run(smoke_config, evaluation, seeded_storage)
    assert not artifact.pushed
    assert "production moved to run-2 after evaluation compared against no production model" in artifact.reason
    assert production_version(seeded_storage) == "run-2"


def test_a_failed_bentoml_copy_does_not_fail_the_promotion(smoke_config, seeded_storage, monkeypatch):
    def broken_store(*arguments):
        raise OSError("disk full")

    monkeypatch.setattr(model_pusher.package, "save_to_bentoml", broken_store)
    artifact = model_pusher.run(smoke_config, evaluated(smoke_config, seeded_storage), seeded_storage)
    assert artifact.pushed and artifact.bentoml_tag is None
    assert "BentoML model store copy failed: OSError: disk full" in artifact.reason
    assert production_version(seeded_storage) == "run-1"
