"""Fitting what turns a model's logits into the shipped answer: temperature, bias and decision threshold.

Evaluation (on the validation split) and `python -m xray calibrate` (on a site's sample) both fit
here, so each formula exists once; `metrics.sigmoid` applies the result. A fitted temperature and
bias are kept only when they lower the calibration error out of sample (k-fold cross-validation on
the calibration set); otherwise the identity (temperature 1, bias 0) is kept and the reason recorded.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np

from xray.metrics import expected_calibration_error, roc_curve, sigmoid, wilson_lower_bound

CROSS_VALIDATION_FOLDS = 5
TEMPERATURE_RANGE = (0.05, 20.0)
BIAS_RANGE = (-100.0, 100.0)


@dataclass(frozen=True)
class Calibration:
    """The temperature and bias to ship, whether they were fitted or the identity, and the evidence why."""

    temperature: float
    bias: float
    kept: str  # "fitted" or "identity"
    reason: str
    ece_identity: float  # calibration set, temperature 1 and bias 0 (nothing fitted, so out of sample)
    ece_cross_validated: float  # calibration set, each fold scored by a fit on the other folds
    folds: int
    fitted_temperature: float  # the fit on the whole set, shipped only when kept == "fitted"
    fitted_bias: float

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly record for report.json and the model card."""
        return asdict(self)


def negative_log_likelihood(labels: np.ndarray, logits: np.ndarray, temperature: float, bias: float = 0.0) -> float:
    """Mean binary cross-entropy of calibrated logits (numerically stable form)."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature + bias
    return float(np.mean(np.logaddexp(0.0, scaled) - np.asarray(labels) * scaled))


def golden_section(function, low: float, high: float, steps: int = 60) -> float:
    """The minimiser of a unimodal function on [low, high]."""
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(steps):
        left, right = high - ratio * (high - low), low + ratio * (high - low)
        if function(left) < function(right):
            high = right
        else:
            low = left
    return float((low + high) / 2)


def fit_calibration(labels: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
    """Temperature and bias minimising NLL: Platt scaling, written as a temperature.

    The temperature corrects over- or under-confidence; the bias undoes the shift that the
    class-weighted training loss gives every logit, which a temperature alone cannot. NLL is
    convex in (1/T, bias), so nested golden-section searches (T in [1/20, 20], bias in
    [-100, 100]) find the single minimum; the bounds keep separable data finite.
    """

    def best_bias(temperature: float) -> float:
        return golden_section(lambda bias: negative_log_likelihood(labels, logits, temperature, bias), *BIAS_RANGE)

    def loss(log_temperature: float) -> float:
        temperature = float(np.exp(log_temperature))
        return negative_log_likelihood(labels, logits, temperature, best_bias(temperature))

    temperature = float(np.exp(golden_section(loss, *np.log(TEMPERATURE_RANGE))))
    return temperature, best_bias(temperature)


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """A fold number per item, each class dealt round-robin in a seeded random order."""
    labels = np.asarray(labels)
    assignment = np.empty(len(labels), dtype=np.int64)
    generator = np.random.default_rng(seed)
    for value in np.unique(labels):
        members = generator.permutation(np.flatnonzero(labels == value))
        assignment[members] = np.arange(len(members)) % folds
    return assignment


def cross_validated_probabilities(labels: np.ndarray, logits: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """P(PNEUMONIA) of each item from a temperature and bias fitted without its fold."""
    labels, logits = np.asarray(labels), np.asarray(logits, dtype=np.float64)
    assignment = stratified_folds(labels, folds, seed)
    probabilities = np.empty(len(labels))
    for fold in range(folds):
        held_out = assignment == fold
        temperature, bias = fit_calibration(labels[~held_out], logits[~held_out])
        probabilities[held_out] = sigmoid(logits[held_out], temperature, bias)
    return probabilities


def fit_checked_calibration(
    labels: np.ndarray, logits: np.ndarray, folds: int = CROSS_VALIDATION_FOLDS, seed: int = 0
) -> Calibration:
    """Fit temperature and bias, but ship them only if they lower ECE out of sample; else the identity.

    On separable or tiny data the in-sample fit runs to its bounds (temperature 0.05 on the smoke
    data took ECE from 0.013 to 0.337): a fit at a bound is refused outright, and any other fit
    is judged by k-fold cross-validation: each fold is scored by a fit on the others, and that
    ECE must beat the identity's.
    """
    labels, logits = np.asarray(labels), np.asarray(logits, dtype=np.float64)
    ece_identity = expected_calibration_error(labels, sigmoid(logits))
    smallest_class = int(min(labels.sum(), len(labels) - labels.sum())) if len(labels) else 0
    folds = min(folds, smallest_class)
    if folds < 2:
        return Calibration(1.0, 0.0, "identity", f"too few images of one class ({smallest_class}) to check a fit "
                           "out of sample; kept the identity (temperature 1, bias 0)", ece_identity, math.nan,
                           folds, math.nan, math.nan)  # fmt: skip
    temperature, bias = fit_calibration(labels, logits)
    if temperature <= TEMPERATURE_RANGE[0] * 1.01 or temperature >= TEMPERATURE_RANGE[1] / 1.01:
        reason = (f"the fit ran to its bound (temperature {temperature:.3f}): the calibration set is separable, "
                  "so no temperature can be estimated from it; kept the identity (temperature 1, bias 0)")
        return Calibration(1.0, 0.0, "identity", reason, ece_identity, math.nan, folds, temperature, bias)
    ece_cross_validated = expected_calibration_error(labels, cross_validated_probabilities(labels, logits, folds, seed))
    if ece_cross_validated < ece_identity:
        reason = (f"the fit lowers ECE out of sample ({folds}-fold cross-validation: {ece_identity:.4f} -> "
                  f"{ece_cross_validated:.4f}); kept temperature {temperature:.3f}, bias {bias:+.3f}")  # fmt: skip
        return Calibration(temperature, bias, "fitted", reason, ece_identity, ece_cross_validated, folds,
                           temperature, bias)  # fmt: skip
    reason = (f"the fit (temperature {temperature:.3f}, bias {bias:+.3f}) does not lower ECE out of sample "
              f"({folds}-fold cross-validation: {ece_identity:.4f} -> {ece_cross_validated:.4f}); "
              "kept the identity (temperature 1, bias 0)")  # fmt: skip
    return Calibration(1.0, 0.0, "identity", reason, ece_identity, ece_cross_validated, folds, temperature, bias)


def minimum_positives(target: float, confidence: float) -> int:
    """The fewest positives for which even a perfect sensitivity's lower confidence bound reaches `target`.

    The Wilson bound of n successes in n trials is n / (n + z^2), so n >= target * z^2 / (1 - target).
    """
    if confidence <= 0:
        return 1
    if target >= 1:
        return math.inf  # type: ignore[return-value]
    z = NormalDist().inv_cdf(confidence)
    return math.ceil(target * z * z / (1 - target) - 1e-9)


def misses_allowed(positives: int, target: float, confidence: float) -> int:
    """How many of `positives` a threshold may miss with the sensitivity's lower confidence bound still at `target`.

    -1 when even catching all of them falls short. With 0 the threshold must sit below every
    positive of the sample, so it hangs on the sample's hardest case and varies widely between
    samples (README, "How big a sample").
    """
    if positives <= 0:
        return -1
    caught = np.arange(positives, -1, -1)
    if confidence <= 0:
        reaching = caught / positives >= target - 1e-12
    else:
        reaching = wilson_lower_bound(caught, positives, confidence) >= target - 1e-12
    return int(reaching.sum()) - 1


def positives_for_misses(misses: int, target: float, confidence: float) -> int | None:
    """The fewest positives that let a threshold miss `misses` of them and still assure `target` (None: none do)."""
    if target >= 1:
        return None if misses > 0 or confidence > 0 else 1
    positives = max(minimum_positives(target, confidence), misses + 1)
    while misses_allowed(positives, target, confidence) < misses:
        positives += 1
    return positives


def threshold_for_sensitivity(
    labels: np.ndarray, scores: np.ndarray, target: float, confidence: float = 0.0, sample: str = "validation"
) -> tuple[float, str]:
    """The highest threshold whose sensitivity reaches `target` (the best specificity), and the rule used.

    With `confidence` > 0 the sensitivity's one-sided lower confidence bound must reach `target`, so
    that new images, not just these, keep the target; when the split has too few positives for any
    threshold to assure that, the plain estimate is used and the rule says so.
    """
    _, true_positive_rate, thresholds = roc_curve(labels, scores)
    positives = int(np.asarray(labels).sum())
    rule = f"{sample} sensitivity >= {target}"
    reaching = np.flatnonzero(true_positive_rate >= target - 1e-12)
    if confidence > 0 and positives > 0:
        bound = wilson_lower_bound(true_positive_rate * positives, positives, confidence)
        assured = np.flatnonzero(bound >= target - 1e-12)
        if len(assured):
            reaching, rule = assured, f"{confidence:.0%} lower confidence bound of {sample} sensitivity >= {target}"
        else:
            rule += f" ({positives} {sample} positives are too few to assure it with {confidence:.0%} confidence)"
    if len(reaching) == 0:
        return 0.0, rule
    return float(min(thresholds[reaching[0]], 1.0)), rule
