#!/usr/bin/env python
"""What `python -m xray calibrate` on a small site sample gives on the rest of the site.

    .venv/bin/python -m xray predict site/ --out site.csv      # site/NORMAL/, site/PNEUMONIA/
    .venv/bin/python scripts/benchmark_calibration.py --scores site.csv --sample-sizes 100 150 200

Draws many random samples of each size from a scored, labelled folder (the class is the
folder above each image), fits the threshold on each sample with calibrate's own rule (the
highest whose sensitivity reaches the target as a lower confidence bound), and scores the rest
of the folder at that threshold. calibrate's temperature and bias are a monotone map of the
scores, so the threshold falls at the same place among the sample's images: the script places
it on the CSV's probabilities. Prints, per sample size, how many PNEUMONIA images a threshold
may miss, the median and spread of sensitivity and specificity on the rest, and how often both
goals are met. A sample the rule refuses is counted, not scored. Unlike calibrate, it does not
apply the promotion gate, and it reads the scores as `predict` wrote them (6 decimals).

--positive-share draws each sample with that share of PNEUMONIA images (the official Kermany
test split has 390 of 624, 0.625); by default samples are drawn from the folder as it is.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xray.calibration import misses_allowed, threshold_for_sensitivity  # noqa: E402
from xray.config import load_config  # noqa: E402
from xray.data import POSITIVE_CLASS, label_of  # noqa: E402
from xray.site_calibration import SampleTooSmallError, check_sample_size  # noqa: E402


def read_scores(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """(labels, probabilities, rows skipped) of a `python -m xray predict` CSV, each label from the image's folder.

    Rows predict could not score (label ERROR, no probability) are skipped: calibrate skips such images too.
    """
    labels, scores, skipped = [], [], 0
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["label"] == "ERROR" or not row["probability"]:
                skipped += 1
                continue
            labels.append(label_of(Path(row["path"]).parent.name.upper()))
            scores.append(float(row["probability"]))
    return np.array(labels, dtype=np.int64), np.array(scores), skipped


def draw_sample(
    labels: np.ndarray, size: int, positive_share: float | None, generator: np.random.Generator
) -> np.ndarray:
    """Indices of one random sample; with `positive_share`, that share of it PNEUMONIA."""
    if positive_share is None:
        return generator.choice(len(labels), size, replace=False)
    positives = round(size * positive_share)
    return np.concatenate([generator.choice(np.flatnonzero(labels == 1), positives, replace=False),
                           generator.choice(np.flatnonzero(labels == 0), size - positives, replace=False)])  # fmt: skip


def sample_size_problem(labels: np.ndarray, size: int, positive_share: float | None) -> str | None:
    """Why samples of `size` cannot be drawn leaving images of both classes to score, or None."""
    available = {"NORMAL": int((labels == 0).sum()), POSITIVE_CLASS: int(labels.sum())}
    if positive_share is None:
        return None if size < len(labels) else f"a sample of {size} leaves none of the {len(labels)} images to score"
    wanted = {POSITIVE_CLASS: round(size * positive_share), "NORMAL": size - round(size * positive_share)}
    short = [f"{wanted[name]} {name} (the site has {available[name]})" for name in wanted
             if wanted[name] >= available[name]]  # fmt: skip
    return f"a sample of {size} needs " + " and ".join(short) + ", leaving none to score" if short else None


def simulate(labels: np.ndarray, scores: np.ndarray, size: int, draws: int, target: float, confidence: float,
             positive_share: float | None, seed: int) -> dict[str, object]:  # fmt: skip
    """Sensitivity and specificity on the rest of the site, one pair per sample calibrate accepted.

    Also each accepted sample's threshold and misses allowed; a sample calibrate refuses, or one
    that leaves no image of a class to score, is counted in `refused`.
    """
    generator = np.random.default_rng(seed)
    results, thresholds, allowed, samples, refused = [], [], [], [], 0
    for _ in range(draws):
        chosen = draw_sample(labels, size, positive_share, generator)
        rest = np.ones(len(labels), dtype=bool)
        rest[chosen] = False
        try:
            check_sample_size(labels[chosen], target, confidence)
        except SampleTooSmallError:
            refused += 1
            continue
        if len(np.unique(labels[rest])) < 2:
            refused += 1
            continue
        threshold, _ = threshold_for_sensitivity(labels[chosen], scores[chosen], target, confidence, "site sample")
        called = scores[rest] >= threshold
        results.append((called[labels[rest] == 1].mean(), (~called[labels[rest] == 0]).mean()))
        thresholds.append(threshold)
        allowed.append(misses_allowed(int(labels[chosen].sum()), target, confidence))
        samples.append(chosen)
    return {"size": size, "refused": refused, "results": np.array(results).reshape(-1, 2),
            "thresholds": np.array(thresholds), "misses_allowed": np.array(allowed, dtype=np.int64),
            "samples": samples}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scores", required=True, help="a `python -m xray predict` CSV of a labelled folder")
    parser.add_argument("--sample-sizes", type=int, nargs="+", default=[100, 150, 200])
    parser.add_argument("--draws", type=int, default=1000, help="random samples per size")
    parser.add_argument("--positive-share", type=float, help=f"share of {POSITIVE_CLASS} in each sample")
    parser.add_argument("--config", default="configs/config.yaml", help="target sensitivity and its confidence")
    parser.add_argument("--goal-sensitivity", type=float, help="on the rest (default: the config's target)")
    parser.add_argument("--goal-specificity", type=float, default=0.88, help="on the rest (issue 11's goal)")
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    evaluation = load_config(arguments.config).evaluation
    target, confidence = evaluation.target_sensitivity, evaluation.sensitivity_confidence
    goal_sensitivity = target if arguments.goal_sensitivity is None else arguments.goal_sensitivity
    labels, scores, skipped = read_scores(Path(arguments.scores))
    if not 0 < int(labels.sum()) < len(labels):
        parser.error(f"{arguments.scores} must score images of both classes (folders NORMAL/ and {POSITIVE_CLASS}/)")
    for size in arguments.sample_sizes:
        problem = sample_size_problem(labels, size, arguments.positive_share)
        if problem:
            parser.error(problem)
    print(f"{arguments.scores}: {len(labels)} images, {int(labels.sum())} {POSITIVE_CLASS}"
          + (f" ({skipped} unscored rows skipped)" if skipped else "")
          + f"; target sensitivity {target} as a {confidence:.0%} lower bound; {arguments.draws} samples a size; "
          f"goals on the rest: sensitivity >= {goal_sensitivity}, specificity >= {arguments.goal_specificity}")
    print(f"{'sample':>6}  {'misses allowed':<15}{'refused':>7}  {'rest: sensitivity median (5%)':<31}"
          f"{'specificity median (5% - 95%)':<31}goals met")
    for size in arguments.sample_sizes:
        found = simulate(labels, scores, size, arguments.draws, target, confidence, arguments.positive_share,
                         arguments.seed)  # fmt: skip
        results, allowed = found["results"], found["misses_allowed"]
        if not len(results):
            print(f"{size:>6}  {'-':<15}{found['refused']:>7}  every sample refused")
            continue
        sensitivity, specificity = results[:, 0], results[:, 1]
        met = np.mean((sensitivity >= goal_sensitivity) & (specificity >= arguments.goal_specificity))
        misses = f"{allowed.min()}" if allowed.min() == allowed.max() else f"{allowed.min()} to {allowed.max()}"
        print(f"{size:>6}  {misses:<15}{found['refused']:>7}  "
              f"{np.median(sensitivity):.3f} ({np.quantile(sensitivity, 0.05):.3f}){'':<18}"
              f"{np.median(specificity):.3f} ({np.quantile(specificity, 0.05):.3f} - "
              f"{np.quantile(specificity, 0.95):.3f}){'':<8}{met:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
