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

from xray import robustness
from xray.calibration import fit_checked_calibration, threshold_for_sensitivity
from xray.config import PipelineConfig
from xray.data import CLASS_NAMES, TRAINING_LIMITS, XrayDataset, load_split
from xray.entity.artifacts import ModelEvaluationArtifact, ModelTrainerArtifact
from xray.explain import BORDER_FRACTION, shortcut_measure
from xray.external_sites import decide_sites, load_sites, score_sites
from xray.inference import Predictor
from xray.metrics import bootstrap_intervals, expected_calibration_error, sigmoid, summarise
from xray.model import build_model_for, predict_logits
from xray.package import ModelCard, fetch_package, production_version
from xray.plots import (
    plot_calibration,
    plot_confusion_matrix,
    plot_precision_recall,
    plot_robustness,
    plot_roc,
    plot_worst_case,
)
from xray.preprocessing import Preprocessing
from xray.runtime import TorchForward
from xray.storage import Storage

logger = logging.getLogger(__name__)

STAGE = "model_evaluation"


def robustness_device(trained_on: str) -> torch.device:
    """Where the robustness suite runs: the GPU the model trained on, when this process has it, else the CPU.

    On a GPU machine its 16,000 forward passes took 170 s on 16 CPU cores and 14 s on the GPU. Everything that
    sets or reports the threshold stays on the CPU, computed as serving computes it (the GPU's TF32 convolutions
    moved probabilities by up to 0.0024).
    """
    device = torch.device(trained_on)
    if device.type != "cuda" or not torch.cuda.is_available():
        return torch.device("cpu")
    return device if (device.index or 0) < torch.cuda.device_count() else torch.device("cuda", 0)


def score_split(model, inputs: ModelTrainerArtifact, split: str, batch_size: int):
    """Cached pixels, labels, logits and patient ids of one split, scored by the new model."""
    preprocessing = Preprocessing.from_dict(inputs.transformation.preprocessing)
    images, labels, rows = load_split(inputs.transformation, split)
    loader = DataLoader(XrayDataset(images, labels, preprocessing), batch_size=batch_size)
    logits = predict_logits(model, loader, torch.device("cpu")).numpy().astype(np.float64)
    return images, labels, logits, [row["patient"] for row in rows]


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
    pixels = np.stack([predictor.decode(Path(row["path"]).read_bytes(), TRAINING_LIMITS) for row in rows])
    return predictor.probabilities(pixels)


def decide(new: float, production: float | None, config: PipelineConfig, split: str = "test",
           require_improvement: bool = True) -> tuple[bool, str]:  # fmt: skip
    """Accept only a model that clears the floor and beats production by the margin.

    A re-calibration (`calibrate`) keeps the weights, so it cannot rank better: it is asked only not
    to score worse than production (`require_improvement=False`).
    """
    evaluation = config.evaluation
    metric = evaluation.comparison_metric
    if math.isnan(new) or new < evaluation.minimum_score:
        return False, f"{split} {metric} {new:.4f} is below the minimum {evaluation.minimum_score:.4f}"
    if production is None:
        return True, (f"no production model yet; {split} {metric} {new:.4f} clears the minimum "
                      f"{evaluation.minimum_score}")
    if not require_improvement:
        if new >= production - 1e-12:
            return True, f"{split} {metric} {new:.4f} is not worse than production {production:.4f}"
        return False, f"{split} {metric} {new:.4f} is worse than production {production:.4f}"
    if new > production + evaluation.minimum_improvement:
        return True, (f"test {metric} {new:.4f} beats production {production:.4f} "
                      f"by {new - production:+.4f} (margin {evaluation.minimum_improvement})")  # fmt: skip
    return False, (f"test {metric} {new:.4f} does not beat production {production:.4f} "
                   f"by the margin {evaluation.minimum_improvement}")  # fmt: skip


def run(config: PipelineConfig, inputs: ModelTrainerArtifact, storage: Storage) -> ModelEvaluationArtifact:
    """Threshold on validation; metrics, robustness, shortcut measure and plots on test; external sites; the gate."""
    evaluation = config.evaluation
    stage_dir = Path(inputs.transformation.ingestion.run.run_dir) / STAGE
    stage_dir.mkdir(parents=True, exist_ok=True)
    model = build_model_for(inputs.architecture, inputs.transformation.preprocessing)
    model.load_state_dict(load_file(inputs.weights_path), strict=True)

    _, validation_labels, validation_logits, validation_patients = score_split(model, inputs, "validation",
                                                                               evaluation.batch_size)  # fmt: skip
    test_pixels, test_labels, test_logits, test_patients = score_split(model, inputs, "test", evaluation.batch_size)
    if len(test_labels) == 0:
        logger.warning("the test split is empty; metrics are those of the validation split")
        test_pixels, _, _, _ = score_split(model, inputs, "validation", evaluation.batch_size)
        test_labels, test_logits, test_patients = validation_labels, validation_logits, validation_patients
    calibration = calibrate(validation_labels, validation_logits, test_labels, test_logits, config.seed)
    temperature, bias = float(calibration["temperature"]), float(calibration["bias"])
    validation_scores = sigmoid(validation_logits, temperature, bias)
    test_scores = sigmoid(test_logits, temperature, bias)
    threshold, threshold_rule = threshold_for_sensitivity(validation_labels, validation_scores,
                                                          evaluation.target_sensitivity,
                                                          evaluation.sensitivity_confidence)  # fmt: skip
    logger.info("threshold %.4f: %s", threshold, threshold_rule)
    validation_metrics = summarise(validation_labels, validation_scores, threshold)
    test_metrics = summarise(test_labels, test_scores, threshold)
    test_metrics["confidence_intervals"] = bootstrap_intervals(
        test_labels, test_scores, test_patients, threshold, evaluation.bootstrap_resamples, config.seed)
    test_metrics["calibration"] = calibration

    card = ModelCard(version="candidate", architecture=inputs.architecture, classes=list(CLASS_NAMES),
                     preprocessing=inputs.transformation.preprocessing, threshold=threshold,
                     temperature=temperature, bias=bias)  # fmt: skip
    candidate = Predictor(model, card)  # its default batch size: EfficientNet slows past 16 images a batch
    if evaluation.robustness or evaluation.shortcut_measure:  # the held-out split, read once from the mapping
        size = candidate.preprocessing.image_size
        test_pixels = np.stack(list(test_pixels)) if len(test_pixels) else np.empty((0, size, size), np.uint8)
    if evaluation.robustness:
        device = robustness_device(inputs.device)
        scorer = candidate if device.type == "cpu" else Predictor(model, card, forward=TorchForward(model, device))
        logger.info("robustness suite on %s", device)
        test_metrics["robustness"] = robustness.run_suite(scorer, test_pixels, test_labels, seed=config.seed)
    if evaluation.shortcut_measure:
        test_metrics["shortcut"] = shortcut_measure(candidate, test_pixels, test_labels)
        logger.info("shortcut measure: %.3f of Grad-CAM mass in the outer %.0f%% (%.3f if spread evenly)",
                    test_metrics["shortcut"]["share"], 100 * BORDER_FRACTION,
                    test_metrics["shortcut"]["uniform_share"])  # fmt: skip

    metric = evaluation.comparison_metric
    version = production_version(storage, config.pusher.models_prefix)
    production_metrics, production = None, None
    if version is not None:
        package = fetch_package(storage, version, stage_dir / "production", config.pusher.models_prefix)
        production = Predictor.from_package(package)
        _, _, rows = load_split(inputs.transformation, "test")
        production_scores = score_production(production, rows) if rows else test_scores
        production_metrics = summarise(test_labels, production_scores, production.card.threshold)
    accepted, reason = decide(test_metrics[metric], production_metrics[metric] if production_metrics else None,
                              config)  # fmt: skip
    sites = score_sites(candidate, production, load_sites(storage, config))
    if accepted and sites:
        accepted, site_reason = decide_sites(sites, config)
        reason = f"{reason}; {site_reason}"
    logger.info("%s: %s", "accepted" if accepted else "rejected", reason)

    plot_paths = draw_plots(stage_dir, validation_labels, validation_scores, validation_metrics, test_labels,
                            test_logits, test_scores, test_metrics, calibration, sites)  # fmt: skip
    report_path = stage_dir / "report.json"
    report = {"threshold": threshold, "threshold_rule": threshold_rule, "temperature": temperature, "bias": bias,
              "calibration": calibration, "validation": validation_metrics, "test": test_metrics,
              "robustness": test_metrics.get("robustness"), "shortcut": test_metrics.get("shortcut"),
              "external_sites": sites, "production_version": version, "production": production_metrics,
              "accepted": accepted, "reason": reason}  # fmt: skip
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
        external_sites=sites,
    )
    artifact.save(stage_dir)
    return artifact


def draw_plots(stage_dir: Path, validation_labels, validation_scores, validation_metrics, test_labels, test_logits,
               test_scores, test_metrics, calibration, sites) -> dict[str, str]:  # fmt: skip
    """The evaluation's PNGs: ROC, precision-recall, calibration, confusion matrix, robustness and worst case."""
    temperature, bias, threshold = calibration["temperature"], calibration["bias"], test_metrics["threshold"]
    curves = {"validation": (validation_labels, validation_scores), "test": (test_labels, test_scores)}
    operating_points = {split: (1 - metrics["specificity"], metrics["sensitivity"])
                        for split, metrics in (("validation", validation_metrics), ("test", test_metrics))}
    after = f"{calibration['kept']} (T={temperature:.2f}, b={bias:+.2f})"
    paths = {
        "roc": plot_roc(curves, operating_points, stage_dir / "roc.png"),
        "precision_recall": plot_precision_recall(curves, stage_dir / "precision_recall.png"),
        "calibration": plot_calibration({"before (T=1)": (test_labels, sigmoid(test_logits)),
                                         after: (test_labels, test_scores)}, stage_dir / "calibration.png"),
        "confusion_matrix": plot_confusion_matrix(test_metrics["confusion_matrix"], threshold,
                                                  stage_dir / "confusion_matrix.png"),
    }  # fmt: skip
    if "robustness" in test_metrics:
        paths["robustness"] = plot_robustness(test_metrics["robustness"], stage_dir / "robustness.png")
        paths["worst_case"] = plot_worst_case(test_metrics["robustness"], sites, stage_dir / "worst_case.png")
    return {name: str(path) for name, path in paths.items()}
