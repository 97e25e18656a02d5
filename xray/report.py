"""Figures about one finished run, read from its artifacts (for the notebook and reviews).

Everything here reads what the pipeline already wrote under `artifacts/<run_id>/`;
nothing is recomputed except the Grad-CAM example, which goes through the inference core.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from xray.data import CLASS_NAMES, read_manifest
from xray.decoding import decode_image
from xray.entity.artifacts import ModelEvaluationArtifact, ModelPusherArtifact
from xray.explain import explain
from xray.inference import Predictor


def latest_run(artifacts_dir: str | Path = "artifacts") -> Path:
    """The newest run folder that finished all five stages."""
    finished = sorted(path.parent.parent for path in Path(artifacts_dir).glob("*/model_pusher/artifact.json"))
    if not finished:
        raise FileNotFoundError(f"no finished run under {artifacts_dir}: run `python -m xray train` first")
    return finished[-1]


def load_run(run_dir: str | Path) -> ModelPusherArtifact:
    """The last artifact of a run, which embeds those of every earlier stage."""
    return ModelPusherArtifact.load(Path(run_dir) / "model_pusher")


def evaluation_of(run: ModelPusherArtifact) -> ModelEvaluationArtifact:
    return run.evaluation


def sample_images(run: ModelPusherArtifact, per_class: int = 4):
    """A grid of training X-rays, one row per class."""
    rows = read_manifest(run.evaluation.trainer.transformation.splits_path)
    figure, axes = plt.subplots(len(CLASS_NAMES), per_class, figsize=(2.2 * per_class, 2.4 * len(CLASS_NAMES)))
    for row_index, class_name in enumerate(CLASS_NAMES):
        chosen = [row for row in rows if row["class"] == class_name and row["split"] == "train"][:per_class]
        for column, row in enumerate(chosen):
            axis = axes[row_index, column]
            axis.imshow(decode_image(Path(row["path"]).read_bytes()), cmap="gray")
            axis.set_title(f"{class_name}\n{row['patient']}", fontsize=8)
            axis.axis("off")
    figure.tight_layout()
    return figure


def class_balance(run: ModelPusherArtifact):
    """Images per class in each split (bars)."""
    counts = run.evaluation.trainer.transformation.split_counts
    splits = list(counts)
    positions = np.arange(len(splits))
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for offset, class_name in enumerate(CLASS_NAMES):
        values = [counts[split][class_name] for split in splits]
        bars = axis.bar(positions + (offset - 0.5) * 0.4, values, width=0.4, label=class_name)
        axis.bar_label(bars, fontsize=8)
    axis.set(xticks=positions, xticklabels=splits, ylabel="images", title="Class balance per split")
    axis.legend()
    figure.tight_layout()
    return figure


def training_curves(run: ModelPusherArtifact):
    """Loss and validation ROC-AUC per epoch, with the kept epoch marked."""
    trainer = run.evaluation.trainer
    history = json.loads(Path(trainer.history_path).read_text())
    epochs = [record["epoch"] for record in history]
    figure, (loss_axis, auc_axis) = plt.subplots(1, 2, figsize=(10, 3.5))
    loss_axis.plot(epochs, [record["train_loss"] for record in history], marker="o", label="train")
    loss_axis.plot(epochs, [record["validation_loss"] for record in history], marker="o", label="validation")
    loss_axis.set(xlabel="epoch", ylabel="loss", title="Loss")
    loss_axis.legend()
    auc_axis.plot(epochs, [record["validation_roc_auc"] for record in history], marker="o")
    auc_axis.axvline(trainer.best_epoch, color="grey", linestyle="--", label=f"kept: epoch {trainer.best_epoch}")
    auc_axis.set(xlabel="epoch", ylabel="ROC-AUC", title="Validation ROC-AUC")
    auc_axis.legend()
    figure.tight_layout()
    return figure


def evaluation_plots(run: ModelPusherArtifact) -> dict[str, Path]:
    """The PNGs the evaluation stage drew: ROC, precision-recall, calibration, confusion matrix, robustness."""
    return {name: Path(path) for name, path in run.evaluation.plot_paths.items()}


def metrics_table(run: ModelPusherArtifact) -> list[tuple[str, float, float]]:
    """(metric, validation, test) rows at the chosen threshold."""
    evaluation = run.evaluation
    names = ("roc_auc", "pr_auc", "accuracy", "sensitivity", "specificity", "precision", "f1")
    return [(name, evaluation.validation_metrics[name], evaluation.test_metrics[name]) for name in names]


def gradcam_example(run: ModelPusherArtifact, split: str = "test", class_name: str = "PNEUMONIA"):
    """The run's model explaining one held-out X-ray: the image, and the Grad-CAM overlay."""
    weights_dir = Path(run.package_dir) if run.package_dir else None
    if weights_dir is None:
        raise ValueError("this run's model was not pushed, so it has no package to explain with")
    predictor = Predictor.from_package(weights_dir)
    rows = [row for row in read_manifest(run.evaluation.trainer.transformation.splits_path)
            if row["split"] == split and row["class"] == class_name]  # fmt: skip
    image = predictor.decode(Path(rows[0]["path"]).read_bytes())
    png, prediction = explain(predictor, image)
    figure, (left, right) = plt.subplots(1, 2, figsize=(8, 4))
    left.imshow(image, cmap="gray")
    left.set_title(f"{class_name} ({rows[0]['patient']})", fontsize=9)
    right.imshow(Image.open(io.BytesIO(png)))
    right.set_title(f"{prediction.label}, P(PNEUMONIA) = {prediction.probability:.3f}", fontsize=9)
    for axis in (left, right):
        axis.axis("off")
    figure.tight_layout()
    return figure


def robustness_table(run: ModelPusherArtifact) -> list[tuple[str, float, float, float]]:
    """(change, ROC-AUC, sensitivity, specificity at the shipped threshold) rows, unchanged images first."""
    robustness = run.evaluation.test_metrics.get("robustness")
    if not robustness:
        return []
    clean = robustness["clean"]
    return [("unchanged", clean["roc_auc"], clean["sensitivity"], clean["specificity"])] + [
        (row["label"], row["roc_auc"], row["sensitivity"], row["specificity"]) for row in robustness["perturbations"]
    ]
