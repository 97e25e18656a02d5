"""Calibration fitting: temperature, bias and threshold, and the out-of-sample check that keeps the identity."""

from __future__ import annotations

import numpy as np
import pytest

from xray.calibration import (
    fit_calibration,
    fit_checked_calibration,
    golden_section,
    minimum_positives,
    misses_allowed,
    negative_log_likelihood,
    positives_for_misses,
    threshold_for_sensitivity,
)
from xray.metrics import expected_calibration_error, sigmoid, summarise, wilson_lower_bound


def overconfident_sample(count: int = 4000, seed: int = 0):
    """Labels drawn from sigmoid(z), reported as logits 3*z: a model three times too confident."""
    generator = np.random.default_rng(seed)
    true_logits = generator.normal(0, 2, count)
    labels = (generator.random(count) < 1 / (1 + np.exp(-true_logits))).astype(int)
    return labels, 3 * true_logits


def test_threshold_reaches_target_sensitivity_with_best_specificity():
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.3, 0.6, 0.2, 0.7, 0.8, 0.9])
    threshold, rule = threshold_for_sensitivity(labels, scores, 0.75)
    assert threshold == 0.7 and rule == "validation sensitivity >= 0.75"
    metrics = summarise(labels, scores, threshold)
    assert metrics["sensitivity"] == 0.75 and metrics["specificity"] == 1.0
    assert summarise(labels, scores, threshold_for_sensitivity(labels, scores, 1.0)[0])["sensitivity"] == 1.0


def test_confident_threshold_keeps_the_target_on_new_images():
    """The point-estimate threshold sits exactly on the target, so about half of new samples fall short of it."""
    generator = np.random.default_rng(0)

    def sample(count):  # P(PNEUMONIA): positives score higher than negatives, with overlap
        labels = (generator.random(count) < 0.75).astype(int)
        return labels, sigmoid(generator.normal(labels * 3.0 - 1.5, 1.0))

    validation = [sample(800) for _ in range(100)]
    fresh = [sample(800) for _ in range(100)]
    shortfalls = {0.0: 0, 0.95: 0}
    for (labels, scores), (new_labels, new_scores) in zip(validation, fresh, strict=True):
        for confidence in shortfalls:
            threshold, _ = threshold_for_sensitivity(labels, scores, 0.95, confidence)
            shortfalls[confidence] += summarise(new_labels, new_scores, threshold)["sensitivity"] < 0.95
    assert shortfalls[0.0] >= 30, "the point estimate misses the target on about half of new samples"
    assert shortfalls[0.95] <= 16, "the 95% lower bound misses it rarely"


def test_too_few_positives_fall_back_to_the_point_estimate_and_say_so():
    labels, scores = np.array([0, 0, 1, 1, 1]), np.array([0.1, 0.2, 0.6, 0.7, 0.8])
    threshold, rule = threshold_for_sensitivity(labels, scores, 0.95, confidence=0.95)
    assert threshold == 0.6 and "3 validation positives are too few" in rule





def test_temperature_scaling_recovers_the_overconfidence_and_lowers_ece():
    labels, logits = overconfident_sample()
    temperature, bias = fit_calibration(labels, logits)
    assert temperature == pytest.approx(3.0, rel=0.1) and bias == pytest.approx(0.0, abs=0.1)
    before = expected_calibration_error(labels, sigmoid(logits))
    after = expected_calibration_error(labels, sigmoid(logits, temperature, bias))
    assert after < before / 2 and after < 0.03


def test_bias_undoes_the_shift_of_a_class_weighted_loss():
    """A loss that down-weights the majority class shifts every logit; a temperature alone cannot undo that."""
    labels, logits = overconfident_sample()
    shifted = logits / 3 - 1.2
    temperature, bias = fit_calibration(labels, shifted)
    assert temperature == pytest.approx(1.0, rel=0.1) and bias == pytest.approx(1.2, abs=0.15)
    temperature_only = fit_calibration_without_bias(labels, shifted)
    temperature_only = expected_calibration_error(labels, sigmoid(shifted, temperature_only))
    after = expected_calibration_error(labels, sigmoid(shifted, temperature, bias))
    assert after < 0.03 < temperature_only


def fit_calibration_without_bias(labels, logits) -> float:
    return float(np.exp(golden_section(lambda u: negative_log_likelihood(labels, logits, np.exp(u)), -3.0, 3.0)))




def test_a_separable_calibration_set_keeps_the_identity():
    """Separable data drive the fit to its bound (temperature 0.05), which took the smoke test's ECE to 0.337."""
    generator = np.random.default_rng(3)
    labels = np.r_[np.zeros(10, int), np.ones(20, int)]
    logits = np.r_[generator.normal(-2.0, 0.5, 10), generator.normal(2.0, 0.5, 20)]
    calibration = fit_checked_calibration(labels, logits)
    assert calibration.fitted_temperature < 0.06, "the in-sample fit alone runs to the bound"
    assert calibration.kept == "identity" and (calibration.temperature, calibration.bias) == (1.0, 0.0)
    assert "ran to its bound" in calibration.reason


def test_a_fit_that_does_not_lower_ece_out_of_sample_keeps_the_identity():
    """Already calibrated logits: a fit on 80 images only adds noise, which cross-validation sees."""
    generator = np.random.default_rng(11)
    logits = generator.normal(0, 2, 80)
    labels = (generator.random(80) < sigmoid(logits)).astype(int)
    calibration = fit_checked_calibration(labels, logits)
    assert (calibration.fitted_temperature, calibration.fitted_bias) != (1.0, 0.0)
    assert calibration.kept == "identity" and (calibration.temperature, calibration.bias) == (1.0, 0.0)
    assert "does not lower ECE out of sample" in calibration.reason
    assert calibration.ece_cross_validated >= calibration.ece_identity


def test_a_fit_that_helps_out_of_sample_is_kept():
    labels, logits = overconfident_sample(1500, seed=4)
    shifted = logits - 2.0
    calibration = fit_checked_calibration(labels, shifted)
    assert calibration.kept == "fitted" and calibration.temperature == pytest.approx(3.0, rel=0.2)
    assert calibration.ece_cross_validated < calibration.ece_identity
    assert expected_calibration_error(labels, sigmoid(shifted, calibration.temperature, calibration.bias)) < 0.03


def test_too_few_images_of_a_class_keep_the_identity_and_say_so():
    calibration = fit_checked_calibration(np.array([0, 1, 1, 1]), np.array([-1.0, 0.5, 2.0, 3.0]))
    assert calibration.kept == "identity" and "too few images of one class (1)" in calibration.reason


@pytest.mark.parametrize(("target", "confidence"), [(0.95, 0.95), (0.9, 0.95), (0.95, 0.9), (0.8, 0.99)])
def test_minimum_positives_is_the_smallest_sample_that_can_promise_the_target(target, confidence):
    needed = minimum_positives(target, confidence)
    assert wilson_lower_bound(np.array([needed]), needed, confidence)[0] >= target - 1e-9
    assert wilson_lower_bound(np.array([needed - 1]), needed - 1, confidence)[0] < target


def test_minimum_positives_for_the_default_target():
    assert minimum_positives(0.95, 0.95) == 52
    assert minimum_positives(0.95, 0.0) == 1


@pytest.mark.parametrize("positives", [52, 62, 87, 100, 150, 300])
def test_misses_allowed_is_the_most_a_threshold_may_miss_and_still_assure_the_target(positives):
    allowed = misses_allowed(positives, 0.95, 0.95)
    assert wilson_lower_bound(np.array([positives - allowed]), positives, 0.95)[0] >= 0.95 - 1e-9
    assert wilson_lower_bound(np.array([positives - allowed - 1]), positives, 0.95)[0] < 0.95


def test_about_a_hundred_site_images_allow_no_missed_pneumonia():
    """A 100-image sample of a site two-thirds PNEUMONIA has about 62 positives: the threshold may miss none."""
    assert misses_allowed(62, 0.95, 0.95) == 0 and misses_allowed(51, 0.95, 0.95) == -1
    assert positives_for_misses(1, 0.95, 0.95) == 87 and misses_allowed(86, 0.95, 0.95) == 0
    assert positives_for_misses(3, 0.95, 0.95) == 147
    assert misses_allowed(100, 0.95, 0.0) == 5, "a point estimate allows 5 misses in 100"
    assert positives_for_misses(1, 1.0, 0.95) is None, "no sample lets a target of 1 miss one"
