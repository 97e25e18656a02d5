"""The robustness suite: acquisition changes at two strengths, scored at the shipped threshold."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import encode, synthetic_xray
from xray import robustness
from xray.inference import Predictor
from xray.preprocessing import decode_pixels

FAMILIES = {"contrast", "gamma", "blur", "detail", "noise", "jpeg", "resample", "crop", "pad", "rotation",
            "background_inversion"}  # fmt: skip


def xrays(count: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic X-rays decoded as the model sees them, half of each class."""
    labels = np.arange(count) % 2
    pixels = np.stack([decode_pixels(encode(synthetic_xray("PNEUMONIA" if label else "NORMAL", 500 + index, 64)), size)
                       for index, label in enumerate(labels)])  # fmt: skip
    return pixels, labels


def test_each_change_comes_at_two_strengths_and_strong_moves_the_image_further():
    pixels, _ = xrays(8)
    assert {perturbation.name for perturbation in robustness.PERTURBATIONS} == FAMILIES
    for family in FAMILIES:
        mild, strong = (next(p for p in robustness.PERTURBATIONS if p.name == family and p.strength == strength)
                        for strength in ("mild", "strong"))  # fmt: skip
        distances = []
        for perturbation in (mild, strong):
            changed = robustness.perturb(pixels, perturbation, seed=1)
            assert changed.shape == pixels.shape and changed.dtype == np.uint8
            assert np.array_equal(changed, robustness.perturb(pixels, perturbation, seed=1)), "seeded, so it repeats"
            distances.append(np.abs(changed.astype(float) - pixels).mean())
        assert 0 < distances[0] < distances[1], family


def test_changes_do_what_they_say():
    pixels, _ = xrays(4)
    by_label = {p.label: p for p in robustness.PERTURBATIONS}
    padded = robustness.perturb(pixels, by_label["pad (strong)"])
    assert padded[:, :4, :].max() == 0 and padded[:, :, -4:].max() == 0, "a black border all round"
    softer = robustness.perturb(pixels, by_label["detail (strong)"]).astype(float)
    assert np.abs(np.diff(softer, axis=-1)).mean() < 0.8 * np.abs(np.diff(pixels.astype(float), axis=-1)).mean()
    assert softer.mean() == pytest.approx(pixels.mean(), abs=1.0), "brightness is kept"
    flatter = robustness.perturb(pixels, by_label["contrast (strong)"])
    assert flatter.std() == pytest.approx(pixels.std() * 0.5, rel=0.05)
    inverted = robustness.perturb(pixels, by_label["background_inversion (strong)"])
    darkest = pixels <= np.percentile(pixels.reshape(4, -1), 15, axis=1)[:, None, None]
    assert np.array_equal(inverted[darkest], 255 - pixels[darkest]) and np.array_equal(inverted[~darkest],
                                                                                        pixels[~darkest])


def test_suite_reports_every_change_and_the_worst_case(trained_package):
    predictor = Predictor.from_package(trained_package)
    pixels, labels = xrays(40, predictor.preprocessing.image_size)
    report = robustness.run_suite(predictor, pixels, labels)
    rows = report["perturbations"]
    assert len(rows) == 2 * len(FAMILIES) and report["images"] == 40
    assert report["threshold"] == predictor.card.threshold
    for row in [*rows, report["clean"]]:
        assert 0 <= row["roc_auc"] <= 1 and 0 <= row["specificity"] <= 1 and 0 <= row["sensitivity"] <= 1
    worst = min(rows, key=lambda row: row["specificity"])
    assert report["worst_case"]["specificity"] == worst["specificity"]
    assert report["worst_case"]["specificity_perturbation"] == worst["label"]
    assert report["worst_case"]["roc_auc"] == min(row["roc_auc"] for row in rows)
    inverted = next(row for row in rows if row["label"] == "background_inversion (strong)")
    assert inverted["specificity"] != report["clean"]["specificity"] or inverted["roc_auc"] != report["clean"][
        "roc_auc"], "the strongest intensity change must move some score"


def test_the_suite_depends_only_on_metrics_preprocessing_and_inference():
    tree = ast.parse(Path(robustness.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert {name for name in imported if name.startswith("xray")} <= {"xray.metrics", "xray.preprocessing",
                                                                       "xray.inference"}
