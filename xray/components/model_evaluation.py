"""Stage 4: measure the new model on the test split and decide whether it replaces production.

The decision threshold is chosen on the validation split for a target sensitivity and
then applied, unchanged, to the test split. The current production model (if any) is
scored on the same test images, through the inference core, with its own preprocessing.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from xray.calibration import fit_checked_calibration, threshold_for_sensitivity
from xray.config import PipelineConfig
from xray.data import TRAINING_LIMITS, XrayDataset, load_split
from xray.decoding import decode_image
from xray.entity.artifacts import ModelEvaluationArtifact, ModelTrainerArtifact
from xray.inference import Predictor
from xray.metrics import bootstrap_intervals, expected_calibration_error, sigmoid, summarise
from xray.model import build_model, predict_logits
from xray.package import fetch_package, production_version
from xray.plots import plot_calibration, plot_confusion_matrix, plot_precision_recall, plot_roc
from xray.preprocessing import Preprocessing
from xray.storage import Storage

logger = logging.getLogger(__name__)

STAGE = "model_evaluation"


def score_split(model, inputs: ModelTrainerArtifact, split: str, batch_size: int):
    """Labels, logits and patient ids of one cached split, scored by the new model."""
    preprocessing = Preprocessing.from_dict(inputs.transformation.preprocessing)
    images, labels, rows = load_split(inputs.transformation, split)
    loader = DataLoader(XrayDataset(images, labels, preprocessing), batch_size=batch_size)
    logits = predict_logits(model, loader, torch.device("cpu")).numpy().astype(np.float64)
    return labels, logits, [row["patient"] for row in rows]


def calibrate(validation_labels, validation_logits, test_labels, test_logits, seed: int) -> dict[str, object]:
    """Temperature and bias fitted on validation and checked out of sample, with the ECE before and after."""
    calibration = fit_checked_calibration(validation_labels, validation_logits, seed=seed)
    report = calibration.to_dict()
    for split, labels, logits in (("validation", validation_labels, validation_logits),
                                  ("test", test_labels, test_logits)):  # fmt: skip
        report[f"ece_{split}_before"] = expected_calibration_error(labels, sigmoid(logits))
        report[f"ece_{split}_after"] = expected_calibration_error(
            labels, sigmoid(logits, calibration.temperature, calibration.bias))
    if calibration.kept == "identity":
        logger.warning("calibration: %s", calibration.reason)
    else:
        logger.info("calibration: %s", calibration.reason)
    return report


def score_production(predictor: Predictor, rows: list[dict[str, str]]) -> np.ndarray:
    """P(PNEUMONIA) of the production model on the test files, decoded with its own preprocessing."""
    pixels = np.stack([predictor.prepare(decode_image(Path(row["path"]).read_bytes(), TRAINING_LIMITS))
                       for row in rows])  # fmt: skip
    return predictor.probabilities(pixels)


def decide(new: float, production: float | None, config: PipelineConfig) -> tuple[bool, str]:
    """Accept only a model that clears the floor and beats production by the margin."""
    evaluation = config.evaluation
    metric = evaluation.comparison_metric
    if math.isnan(new) or new < evaluation.minimum_score:
        return False, f"test {metric} {new:.4f} is below the minimum {evaluation.minimum_score:.4f}"
    if production is None:
        return True, f"no production model yet; test {metric} {new:.4f} clears the minimum {evaluation.minimum_score}"
    if new > production + evaluation.minimum_improvement:
        return True, (f"test {metric} {new:.4f} beats production {production:.4f} "
                      f"by {new - production:+.4f} (margin {evaluation.minimum_improvement})")  # fmt: skip
    return False, (f"test {metric} {new:.4f} does not beat production {production:.4f} "
                   f"by the margin {evaluation.minimum_improvement}")  # fmt: skip


def run(config: PipelineConfig, inputs: ModelTrainerArtifact, storage: Storage) -> ModelEvaluationArtifact:
    """Threshold on validation, metrics and plots on test, and the promotion decision."""
    stage_dir = Path(inputs.transformation.ingestion.run.run_dir) / STAGE
    stage_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(inputs.architecture)
    model.load_state_dict(load_file(inputs.weights_path), strict=True)
    batch_size = config.evaluation.batch_size

    validation_labels, validation_logits, validation_patients = score_split(model, inputs, "validation", batch_size)
    test_labels, test_logits, test_patients = score_split(model, inputs, "test", batch_size)
    if len(test_labels) == 0:
        logger.warning("the test split is empty; metrics are those of the validation split")
        test_labels, test_logits, test_patients = validation_labels, validation_logits, validation_patients
    calibration = calibrate(validation_labels, validation_logits, test_labels, test_logits, config.seed)
    temperature, bias = float(calibration["temperature"]), float(calibration["bias"])
    validation_scores = sigmoid(validation_logits, temperature, bias)
    test_scores = sigmoid(test_logits, temperature, bias)
    threshold, threshold_rule = threshold_for_sensitivity(validation_labels, validation_scores,
                                                          config.evaluation.target_sensitivity,
                                                          config.evaluation.sensitivity_confidence)  # fmt: skip
    logger.info("threshold %.4f: %s", threshold, threshold_rule)
    validation_metrics = summarise(validation_labels, validation_scores, threshold)
    test_metrics = summarise(test_labels, test_scores, threshold)
    test_metrics["confidence_intervals"] = bootstrap_intervals(
        test_labels, test_scores, test_patients, threshold, config.evaluation.bootstrap_resamples, config.seed)
    test_metrics["calibration"] = calibration
    logger.info("temperature %.3f, bias %+.3f: test ECE %.4f before, %.4f after", temperature, bias,
                calibration["ece_test_before"], calibration["ece_test_after"])  # fmt: skip

    metric = config.evaluation.comparison_metric
    version = production_version(storage, config.pusher.models_prefix)
    production_metrics = None
    if version is not None:
        package = fetch_package(storage, version, stage_dir / "production", config.pusher.models_prefix)
        predictor = Predictor.from_package(package)
        _, _, rows = load_split(inputs.transformation, "test")
        production_scores = score_production(predictor, rows) if rows else test_scores
        production_metrics = summarise(test_labels, production_scores, predictor.card.threshold)
    accepted, reason = decide(test_metrics[metric], production_metrics[metric] if production_metrics else None,
                              config)  # fmt: skip
    logger.info("%s: %s", "accepted" if accepted else "rejected", reason)

    curves = {"validation": (validation_labels, validation_scores), "test": (test_labels, test_scores)}
    operating_points = {split: (1 - metrics["specificity"], metrics["sensitivity"])
                        for split, metrics in (("validation", validation_metrics), ("test", test_metrics))}
    plot_paths = {
        "roc": str(plot_roc(curves, operating_points, stage_dir / "roc.png")),
        "precision_recall": str(plot_precision_recall(curves, stage_dir / "precision_recall.png")),
        "calibration": str(plot_calibration({"before (T=1)": (test_labels, sigmoid(test_logits)),
                                             f"after (T={temperature:.2f}, b={bias:+.2f})": (test_labels, test_scores)},
                                            stage_dir / "calibration.png")),
        "confusion_matrix": str(plot_confusion_matrix(test_metrics["confusion_matrix"], threshold,
                                                      stage_dir / "confusion_matrix.png")),
    }  # fmt: skip
    report_path = stage_dir / "report.json"
    report = {"threshold": threshold, "threshold_rule": threshold_rule, "temperature": temperature,
              "bias": bias, "calibration": calibration, "validation": validation_metrics, "test": test_metrics,
              "production_version": version,
              "production": production_metrics, "accepted": accepted, "reason": reason}  # fmt: skip
    report_path.write_text(json.dumps(report, indent=2))
    artifact = ModelEvaluationArtifact(
        trainer=inputs,
        threshold=threshold,
        temperature=temperature,
        bias=bias,
        validation_metrics=validation_metrics,
        test_metrics=test_metrics,
        production_version=version,
        production_metrics=production_metrics,
        accepted=accepted,
        reason=reason,
        report_path=str(report_path),
        plot_paths=plot_paths,
    )
    artifact.save(stage_dir)
    return artifact
