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
goals are met. A sample the rule refuses is counted, not scored.

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


def read_scores(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) of a `python -m xray predict` CSV, each label from the folder above the image."""
    labels, scores = [], []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            labels.append(label_of(Path(row["path"]).parent.name.upper()))
            scores.append(float(row["probability"]))
    return np.array(labels, dtype=np.int64), np.array(scores)


def draw_sample(labels: np.ndarray, size: int, positive_share: float | None, random: np.random.Generator) -> np.ndarray:
    """Indices of one random sample; with `positive_share`, that share of it PNEUMONIA."""
    if positive_share is None:
        return random.choice(len(labels), size, replace=False)
    positives = round(size * positive_share)
    return np.concatenate([random.choice(np.flatnonzero(labels == 1), positives, replace=False),
                           random.choice(np.flatnonzero(labels == 0), size - positives, replace=False)])  # fmt: skip


def simulate(labels: np.ndarray, scores: np.ndarray, size: int, draws: int, target: float, confidence: float,
             positive_share: float | None, seed: int) -> dict[str, object]:  # fmt: skip
    """Sensitivity and specificity on the rest of the folder, one pair per sample calibrate accepted."""
    random = np.random.default_rng(seed)
    results, refused, allowed = [], 0, []
    for _ in range(draws):
        chosen = draw_sample(labels, size, positive_share, random)
        try:
            check_sample_size(labels[chosen], target, confidence)
        except SampleTooSmallError:
            refused += 1
            continue
        threshold, _ = threshold_for_sensitivity(labels[chosen], scores[chosen], target, confidence, "site sample")
        allowed.append(misses_allowed(int(labels[chosen].sum()), target, confidence))
        rest = np.ones(len(labels), dtype=bool)
        rest[chosen] = False
        called = scores[rest] >= threshold
        results.append((called[labels[rest] == 1].mean(), (~called[labels[rest] == 0]).mean()))
    return {"size": size, "refused": refused, "results": np.array(results).reshape(-1, 2),
            "misses_allowed": int(np.median(allowed)) if allowed else None}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scores", required=True, help="a `python -m xray predict` CSV of a labelled folder")
    parser.add_argument("--sample-sizes", type=int, nargs="+", default=[100, 150, 200])
    parser.add_argument("--draws", type=int, default=1000, help="random samples per size")
    parser.add_argument("--positive-share", type=float, help=f"share of {POSITIVE_CLASS} in each sample")
    parser.add_argument("--config", default="configs/config.yaml", help="target sensitivity and its confidence")
    parser.add_argument("--goal-sensitivity", type=float, default=0.95)
    parser.add_argument("--goal-specificity", type=float, default=0.88)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    evaluation = load_config(arguments.config).evaluation
    target, confidence = evaluation.target_sensitivity, evaluation.sensitivity_confidence
    labels, scores = read_scores(Path(arguments.scores))
    print(f"{arguments.scores}: {len(labels)} images, {int(labels.sum())} {POSITIVE_CLASS}; target sensitivity "
          f"{target} as a {confidence:.0%} lower bound; {arguments.draws} samples a size")  # fmt: skip
    print(f"{'sample':>6} {'misses allowed':>14} {'refused':>7}  {'rest: sensitivity median (5%)':<30}"
          f"{'specificity median (5% - 95%)':<31}goals met")
    for size in arguments.sample_sizes:
        found = simulate(labels, scores, size, arguments.draws, target, confidence, arguments.positive_share,
                         arguments.seed)  # fmt: skip
        results = found["results"]
        if not len(results):
            print(f"{size:>6} {'-':>14} {found['refused']:>7}  every sample refused")
            continue
        sensitivity, specificity = results[:, 0], results[:, 1]
        met = np.mean((sensitivity >= arguments.goal_sensitivity) & (specificity >= arguments.goal_specificity))
        print(f"{size:>6} {found['misses_allowed']:>14} {found['refused']:>7}  "
              f"{np.median(sensitivity):.3f} ({np.quantile(sensitivity, 0.05):.3f}){'':<17}"
              f"{np.median(specificity):.3f} ({np.quantile(specificity, 0.05):.3f} - "
              f"{np.quantile(specificity, 0.95):.3f}){'':<8}{met:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
