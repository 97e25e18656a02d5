"""PNG plots of evaluation results (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from xray.data import CLASS_NAMES  # noqa: E402
from xray.metrics import roc_curve  # noqa: E402


def save(figure, path: Path) -> Path:
    """Lay out, write and close a figure (figures left open leak memory in a long-lived server)."""
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], operating_points: dict[str, tuple[float, float]],
             path: Path) -> Path:  # fmt: skip
    """ROC curves (name -> labels, scores) with each split's operating point marked."""
    figure, axes = plt.subplots(figsize=(5, 5), dpi=100)
    for name, (labels, scores) in curves.items():
        false_positive_rate, true_positive_rate, _ = roc_curve(labels, scores)
        axes.plot(false_positive_rate, true_positive_rate, label=name)
    for name, (false_positive_rate, true_positive_rate) in operating_points.items():
        axes.scatter([false_positive_rate], [true_positive_rate], zorder=3, label=f"threshold ({name})")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    axes.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC curve", xlim=(0, 1), ylim=(0, 1.01))
    axes.legend(loc="lower right", fontsize=8)
    return save(figure, path)


def plot_confusion_matrix(matrix: list[list[int]], threshold: float, path: Path) -> Path:
    """Counts per (true class, predicted class) at the chosen threshold."""
    figure, axes = plt.subplots(figsize=(4, 4), dpi=100)
    values = np.asarray(matrix)
    axes.imshow(values, cmap="Blues")
    for row in range(2):
        for column in range(2):
            colour = "white" if values[row, column] > values.max() / 2 else "black"
            axes.text(column, row, str(values[row, column]), ha="center", va="center", color=colour, fontsize=14)
    axes.set(xticks=[0, 1], yticks=[0, 1], xticklabels=CLASS_NAMES, yticklabels=CLASS_NAMES,
             xlabel="predicted", ylabel="true", title=f"Test split, threshold {threshold:.3f}")  # fmt: skip
    return save(figure, path)


def plot_precision_recall(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """Precision-recall curves (name -> labels, scores)."""
    from xray.metrics import precision_recall_curve

    figure, axes = plt.subplots(figsize=(5, 5), dpi=100)
    for name, (labels, scores) in curves.items():
        precision, recall = precision_recall_curve(labels, scores)
        axes.step(np.r_[0.0, recall], np.r_[1.0, precision], where="post", label=name)
    axes.set(xlabel="recall (sensitivity)", ylabel="precision", title="Precision-recall curve",
             xlim=(0, 1), ylim=(0, 1.01))  # fmt: skip
    axes.legend(loc="lower left", fontsize=8)
    return save(figure, path)


def plot_calibration(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """Reliability diagram: observed PNEUMONIA frequency against predicted probability."""
    from xray.metrics import calibration_bins, expected_calibration_error

    figure, axes = plt.subplots(figsize=(5, 5), dpi=100)
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8, label="perfect calibration")
    for name, (labels, probabilities) in curves.items():
        predicted, observed, _ = calibration_bins(labels, probabilities)
        ece = expected_calibration_error(labels, probabilities)
        axes.plot(predicted, observed, marker="o", label=f"{name} (ECE {ece:.3f})")
    axes.set(xlabel="predicted P(PNEUMONIA)", ylabel="observed frequency", title="Calibration (test split)",
             xlim=(0, 1), ylim=(0, 1.01))  # fmt: skip
    axes.legend(loc="upper left", fontsize=8)
    return save(figure, path)
