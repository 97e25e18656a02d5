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


def plot_robustness(robustness: dict, path: Path) -> Path:
    """ROC-AUC and specificity at the shipped threshold under each acquisition change, clean as dashed lines."""
    rows = robustness["perturbations"]
    labels = [row["label"] for row in rows]
    positions = np.arange(len(rows))
    figure, axes = plt.subplots(2, 1, figsize=(10, 7), dpi=100, sharex=True)
    for axis, metric, title in ((axes[0], "roc_auc", "ROC-AUC"),
                                (axes[1], "specificity", "specificity at the shipped threshold")):  # fmt: skip
        values = [row[metric] for row in rows]
        colours = ["tab:orange" if row["strength"] == "strong" else "tab:blue" for row in rows]
        axis.bar(positions, values, color=colours)
        axis.axhline(robustness["clean"][metric], color="black", linestyle="--", linewidth=1,
                     label=f"unchanged images ({robustness['clean'][metric]:.3f})")  # fmt: skip
        low = min([value for value in values if value == value] + [robustness["clean"][metric]])
        axis.set(ylabel=title, ylim=(max(0.0, low - 0.05), 1.0))
        axis.legend(loc="lower left", fontsize=8)
    axes[0].set_title(f"Robustness on the test split ({robustness['images']} images; blue mild, orange strong)")
    axes[1].set_xticks(positions, labels, rotation=60, ha="right", fontsize=8)
    return save(figure, path)


def plot_worst_case(robustness: dict, external_sites: dict, path: Path) -> Path:
    """The summary: specificity on unchanged images, the worst per change, and per external site."""
    families: dict[str, float] = {}
    for row in robustness["perturbations"]:
        families[row["name"]] = min(families.get(row["name"], 1.0), row["specificity"])
    names = ["unchanged"] + list(families) + [f"site {site}" for site in external_sites]
    values = ([robustness["clean"]["specificity"]] + list(families.values())
              + [site["new"]["specificity"] for site in external_sites.values()])  # fmt: skip
    figure, axis = plt.subplots(figsize=(7, 0.35 * len(names) + 1.5), dpi=100)
    colours = ["black"] + ["tab:red" if value == min(families.values()) else "tab:blue" for value in families.values()]
    colours += ["tab:green"] * len(external_sites)
    axis.barh(np.arange(len(names)), values, color=colours)
    for index, value in enumerate(values):
        axis.text(min(value, 1.0) + 0.005, index, f"{value:.3f}", va="center", fontsize=8)
    axis.set_yticks(np.arange(len(names)), names, fontsize=8)
    axis.invert_yaxis()
    worst = robustness["worst_case"]
    axis.set(xlim=(0, 1.08), xlabel=f"specificity at threshold {robustness['threshold']:.3f}",
             title=f"Worst-case specificity {worst['specificity']:.3f} ({worst['specificity_perturbation']})")
    return save(figure, path)
