"""Stage 4: threshold from validation, metrics and plots on test, and the promotion decision."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from xray.components import data_ingestion, data_transformation, model_evaluation, model_pusher, model_trainer
from xray.package import production_version
from xray.pipeline import start_run

METRICS = {"accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc", "pr_auc", "confusion_matrix"}


def trained(config, storage, run_id="run-1"):
    ingestion = data_ingestion.run(config, start_run(config, storage, run_id), storage)
    transformation = data_transformation.run(config, ingestion, storage)
    return model_trainer.run(config, transformation, storage)


def test_metrics_threshold_and_plots(smoke_config, seeded_storage):
    artifact = model_evaluation.run(smoke_config, trained(smoke_config, seeded_storage), seeded_storage)
    assert set(artifact.test_metrics) >= METRICS
    assert artifact.validation_metrics["sensitivity"] >= smoke_config.evaluation.target_sensitivity
    assert artifact.test_metrics["threshold"] == artifact.threshold
    matrix = artifact.test_metrics["confusion_matrix"]
    assert sum(map(sum, matrix)) == artifact.test_metrics["count"]
    assert set(artifact.plot_paths) == {"roc", "precision_recall", "calibration", "confusion_matrix", "robustness",
                                        "worst_case"}
    for path in artifact.plot_paths.values():
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    intervals = artifact.test_metrics["confidence_intervals"]
    for name in ("roc_auc", "sensitivity", "specificity"):
        assert intervals[name]["low"] <= artifact.test_metrics[name] <= intervals[name]["high"]
    calibration = artifact.test_metrics["calibration"]
    assert calibration["temperature"] == artifact.temperature > 0 and calibration["bias"] == artifact.bias
    assert calibration["kept"] in ("fitted", "identity") and calibration["reason"]
    if calibration["kept"] == "identity":
        assert (artifact.temperature, artifact.bias) == (1.0, 0.0)
    report = json.loads(Path(artifact.report_path).read_text())
    assert report["calibration"]["kept"] == calibration["kept"]
    assert report["accepted"] is True and "no production model" in report["reason"]


def test_a_model_that_does_not_beat_production_is_rejected(smoke_config, seeded_storage):
    first = model_evaluation.run(smoke_config, trained(smoke_config, seeded_storage, "run-1"), seeded_storage)
    model_pusher.run(smoke_config, first, seeded_storage)
    assert production_version(seeded_storage) == "run-1"
    demanding = dataclasses.replace(
        smoke_config, evaluation=dataclasses.replace(smoke_config.evaluation, minimum_improvement=0.5))
    second = model_evaluation.run(demanding, trained(demanding, seeded_storage, "run-2"), seeded_storage)
    assert second.production_version == "run-1"
    assert second.production_metrics["roc_auc"] == pytest.approx(first.test_metrics["roc_auc"], abs=1e-6)
    assert not second.accepted and "does not beat production" in second.reason


@pytest.mark.parametrize(
    ("new", "production", "margin", "accepted"),
    [(0.9, None, 0.0, True), (0.4, None, 0.0, False), (0.91, 0.90, 0.0, True), (0.90, 0.90, 0.0, False),
     (0.905, 0.90, 0.01, False), (0.92, 0.90, 0.01, True)],
)
def test_decision_rule(smoke_config, new, production, margin, accepted):
    config = dataclasses.replace(smoke_config, evaluation=dataclasses.replace(
        smoke_config.evaluation, minimum_improvement=margin, minimum_score=0.5))
    assert model_evaluation.decide(new, production, config)[0] is accepted


def test_the_robustness_suite_runs_on_the_training_gpu_only_when_this_process_has_one(monkeypatch):
    import torch

    from xray.components.model_evaluation import robustness_device

    assert robustness_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert robustness_device("cuda") == torch.device("cpu"), "a GPU-trained run evaluated on a CPU machine"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert robustness_device("cuda:1") == torch.device("cuda", 1)
    assert robustness_device("cuda:5") == torch.device("cuda", 0), "re-evaluated on a machine with fewer GPUs"
    assert robustness_device("mps") == torch.device("cpu"), "MPS: the CPU, as serving"
