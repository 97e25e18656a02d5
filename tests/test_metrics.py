"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xray.metrics import average_precision, bootstrap_intervals, roc_auc, sigmoid, summarise, wilson_lower_bound


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


def test_wilson_lower_bound_matches_the_textbook_value():
    # 95 of 100 at one-sided 95% (z = 1.645): 0.9008 by the Wilson score formula
    assert wilson_lower_bound(np.array([95]), 100, 0.95)[0] == pytest.approx(0.9008, abs=1e-4)
    assert wilson_lower_bound(np.array([600]), 600, 0.95)[0] == pytest.approx(0.99551, abs=1e-4)


def test_summary_confusion_matrix_and_ratios():
    metrics = summarise(np.array([0, 0, 1, 1]), np.array([0.2, 0.6, 0.4, 0.9]), 0.5)
    assert metrics["confusion_matrix"] == [[1, 1], [1, 1]]
    assert metrics["accuracy"] == metrics["sensitivity"] == metrics["specificity"] == metrics["f1"] == 0.5


def test_temperature_keeps_the_ranking():
    labels, logits = overconfident_sample(500)
    assert roc_auc(labels, sigmoid(logits, 2.5)) == pytest.approx(roc_auc(labels, sigmoid(logits)))


def test_bootstrap_intervals_bracket_the_estimate_and_shrink_with_more_patients():
    labels, logits = overconfident_sample(3000, seed=1)
    scores = sigmoid(logits)
    small = bootstrap_intervals(labels[:300], scores[:300], [str(i) for i in range(300)], 0.5, resamples=300)
    large = bootstrap_intervals(labels, scores, [str(i) for i in range(3000)], 0.5, resamples=300)
    estimate = roc_auc(labels, scores)
    assert large["roc_auc"]["low"] <= estimate <= large["roc_auc"]["high"]
    width = {name: interval["high"] - interval["low"] for name, interval in large.items()}
    assert all(width[name] < small[name]["high"] - small[name]["low"] for name in width)


def test_bootstrap_resamples_whole_patients():
    # two patients, each with many identical images: resampling patients gives only three possible mixes
    labels = np.array([1] * 50 + [0] * 50)
    scores = np.array([0.9] * 50 + [0.2] * 50)
    intervals = bootstrap_intervals(labels, scores, ["a"] * 50 + ["b"] * 50, 0.5, resamples=200)
    assert intervals["roc_auc"]["resamples"] < 200, "draws with one patient only must be skipped"


def overconfident_sample(count: int = 4000, seed: int = 0):
    """Labels drawn from sigmoid(z), reported as logits 3*z: a model three times too confident."""
    generator = np.random.default_rng(seed)
    true_logits = generator.normal(0, 2, count)
    labels = (generator.random(count) < 1 / (1 + np.exp(-true_logits))).astype(int)
    return labels, 3 * true_logits
