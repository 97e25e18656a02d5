"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xray.metrics import average_precision, roc_auc, summarise, threshold_for_sensitivity


def test_roc_auc_extremes_and_ties():
    labels = np.array([0, 0, 1, 1])
    assert roc_auc(labels, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert roc_auc(labels, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert roc_auc(labels, np.full(4, 0.5)) == 0.5
    assert math.isnan(roc_auc(np.ones(3), np.array([0.1, 0.2, 0.3])))


def test_roc_auc_counts_pairs():
    labels = np.array([0, 1, 0, 1, 1])
    scores = np.array([0.3, 0.2, 0.1, 0.8, 0.3])
    # positive/negative pairs ranked correctly: (0.2>0.1), (0.8>both), (0.3>0.1, 0.3=0.3 half) -> 4.5 of 6
    assert roc_auc(labels, scores) == pytest.approx(4.5 / 6)


def test_average_precision_by_hand():
    labels = np.array([1, 0, 1, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    # precision at each recall step: 1/1 at recall 0.5, 2/3 at recall 1.0
    assert average_precision(labels, scores) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_threshold_reaches_target_sensitivity_with_best_specificity():
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.3, 0.6, 0.2, 0.7, 0.8, 0.9])
    threshold = threshold_for_sensitivity(labels, scores, 0.75)
    assert threshold == 0.7
    metrics = summarise(labels, scores, threshold)
    assert metrics["sensitivity"] == 0.75 and metrics["specificity"] == 1.0
    assert summarise(labels, scores, threshold_for_sensitivity(labels, scores, 1.0))["sensitivity"] == 1.0


def test_summary_confusion_matrix_and_ratios():
    metrics = summarise(np.array([0, 0, 1, 1]), np.array([0.2, 0.6, 0.4, 0.9]), 0.5)
    assert metrics["confusion_matrix"] == [[1, 1], [1, 1]]
    assert metrics["accuracy"] == metrics["sensitivity"] == metrics["specificity"] == metrics["f1"] == 0.5
