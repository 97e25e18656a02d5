"""Binary classification metrics in plain numpy: labels are 0/1, scores are P(PNEUMONIA)."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np


def ranked_counts(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """At each distinct score, highest first: the score, true positives and predicted positives at or above it."""
    labels = np.asarray(labels, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_labels = scores[order], labels[order]
    distinct = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(sorted_scores) - 1]
    return labels, sorted_scores[distinct], np.cumsum(sorted_labels)[distinct], distinct + 1


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False-positive rates, true-positive rates and thresholds, highest threshold first."""
    labels, distinct_scores, true_positives, predicted_positive = ranked_counts(labels, scores)
    false_positives = predicted_positive - true_positives
    positives, negatives = max(labels.sum(), 1), max(len(labels) - labels.sum(), 1)
    false_positive_rate = np.r_[0.0, false_positives / negatives]
    true_positive_rate = np.r_[0.0, true_positives / positives]
    thresholds = np.r_[np.inf, distinct_scores]
    return false_positive_rate, true_positive_rate, thresholds


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (ties count half); NaN when only one class is present."""
    labels = np.asarray(labels)
    if labels.min(initial=1) == labels.max(initial=0):
        return float("nan")
    false_positive_rate, true_positive_rate, _ = roc_curve(labels, scores)
    return float(np.trapezoid(true_positive_rate, false_positive_rate))


def precision_recall_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at each distinct threshold, highest threshold first."""
    labels, _, true_positives, predicted_positive = ranked_counts(labels, scores)
    precision = true_positives / predicted_positive
    recall = true_positives / max(labels.sum(), 1)
    return precision, recall


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """PR-AUC as average precision (step-wise, no interpolation), as scikit-learn computes it."""
    labels = np.asarray(labels)
    if labels.sum() == 0:
        return float("nan")
    precision, recall = precision_recall_curve(labels, scores)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def wilson_lower_bound(successes: np.ndarray, trials: int, confidence: float) -> np.ndarray:
    """One-sided lower confidence bound of a proportion (Wilson score interval), element-wise."""
    z = NormalDist().inv_cdf(confidence)
    proportion = np.asarray(successes, dtype=np.float64) / trials
    spread = z * z / trials
    centre = (proportion + spread / 2) / (1 + spread)
    margin = z / (1 + spread) * np.sqrt(proportion * (1 - proportion) / trials + spread / (4 * trials))
    return centre - margin


def confusion_matrix(labels: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """[[TN, FP], [FN, TP]] with PNEUMONIA predicted when score >= threshold."""
    labels = np.asarray(labels, dtype=bool)
    predicted = np.asarray(scores) >= threshold
    return np.array(
        [
            [int(np.sum(~labels & ~predicted)), int(np.sum(~labels & predicted))],
            [int(np.sum(labels & ~predicted)), int(np.sum(labels & predicted))],
        ]
    )


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when the denominator is zero."""
    return float(numerator / denominator) if denominator else float("nan")


def summarise(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, object]:
    """Every reported metric at one threshold, as JSON-friendly scalars."""
    (true_negatives, false_positives), (false_negatives, true_positives) = confusion_matrix(labels, scores, threshold)
    precision = ratio(true_positives, true_positives + false_positives)
    sensitivity = ratio(true_positives, true_positives + false_negatives)
    return {
        "count": int(len(labels)),
        "threshold": float(threshold),
        "accuracy": ratio(true_positives + true_negatives, len(labels)),
        "sensitivity": sensitivity,
        "specificity": ratio(true_negatives, true_negatives + false_positives),
        "precision": precision,
        "f1": ratio(2 * precision * sensitivity, precision + sensitivity),
        "roc_auc": roc_auc(labels, scores),
        "pr_auc": average_precision(labels, scores),
        "confusion_matrix": [[int(true_negatives), int(false_positives)], [int(false_negatives), int(true_positives)]],
    }


def sigmoid(logits: np.ndarray, temperature: float = 1.0, bias: float = 0.0) -> np.ndarray:
    """P(PNEUMONIA) from logits, calibrated as logits / temperature + bias first."""
    return 1.0 / (1.0 + np.exp(-(np.asarray(logits, dtype=np.float64) / temperature + bias)))


def calibration_bins(labels: np.ndarray, probabilities: np.ndarray, bins: int = 15):
    """Per equal-width bin of P(PNEUMONIA): mean predicted probability, observed frequency, count."""
    labels, probabilities = np.asarray(labels, dtype=np.float64), np.asarray(probabilities, dtype=np.float64)
    index = np.minimum((probabilities * bins).astype(int), bins - 1)
    counts = np.bincount(index, minlength=bins)
    predicted = np.bincount(index, weights=probabilities, minlength=bins)
    observed = np.bincount(index, weights=labels, minlength=bins)
    filled = counts > 0
    return predicted[filled] / counts[filled], observed[filled] / counts[filled], counts[filled]


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = 15) -> float:
    """ECE of P(PNEUMONIA): count-weighted gap between predicted and observed frequency, 15 bins."""
    predicted, observed, counts = calibration_bins(labels, probabilities, bins)
    return float(np.sum(counts * np.abs(predicted - observed)) / max(counts.sum(), 1))


def bootstrap_intervals(
    labels: np.ndarray,
    scores: np.ndarray,
    groups: list[str],
    threshold: float,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """95% percentile intervals for ROC-AUC, sensitivity and specificity, resampling patients.

    Images of one patient are correlated, so whole patients are drawn with replacement.
    """
    labels, scores = np.asarray(labels), np.asarray(scores)
    patients, inverse = np.unique(np.asarray(groups), return_inverse=True)
    members = [np.flatnonzero(inverse == index) for index in range(len(patients))]
    generator = np.random.default_rng(seed)
    values: dict[str, list[float]] = {"roc_auc": [], "sensitivity": [], "specificity": []}
    predicted = scores >= threshold
    for _ in range(resamples):
        chosen = np.concatenate([members[index] for index in generator.integers(0, len(patients), len(patients))])
        sample_labels = labels[chosen]
        positives, negatives = sample_labels == 1, sample_labels == 0
        if not positives.any() or not negatives.any():
            continue
        values["roc_auc"].append(roc_auc(sample_labels, scores[chosen]))
        values["sensitivity"].append(float(predicted[chosen][positives].mean()))
        values["specificity"].append(float((~predicted[chosen][negatives]).mean()))
    return {name: {"low": float(np.percentile(found, 2.5)), "high": float(np.percentile(found, 97.5)),
                   "resamples": len(found)} for name, found in values.items()}  # fmt: skip
