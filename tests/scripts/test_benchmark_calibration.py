"""scripts/benchmark_calibration.py: calibrate's threshold rule on random site samples, scored on the rest."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np

from tests.conftest import REPO, load_script

SCRIPT = REPO / "scripts" / "benchmark_calibration.py"


def run_script(*arguments):
    """The script's finished process, run from the repository."""
    return subprocess.run([sys.executable, str(SCRIPT), *arguments], cwd=REPO, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def write_scores(path, normal, pneumonia):
    """A `python -m xray predict` CSV of a labelled folder: NORMAL/ and PNEUMONIA/ images and their scores."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "probability", "label"])
        for class_name, scores in (("NORMAL", normal), ("PNEUMONIA", pneumonia)):
            for index, score in enumerate(scores):
                writer.writerow([f"/site/{class_name}/{index}.png", f"{score:.6f}", class_name])
    return path


def test_a_separable_site_keeps_its_specificity_and_a_hundred_images_allow_no_miss(tmp_path):
    scores = write_scores(tmp_path / "site.csv", np.linspace(0.0, 0.4, 300), np.linspace(0.6, 1.0, 500))
    finished = run_script("--scores", str(scores), "--draws", "50", "--sample-sizes", "100", "200",
                          "--positive-share", "0.625")  # fmt: skip
    assert finished.returncode == 0, finished.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in finished.stdout.splitlines() if line.split()[:1] in (["100"],
                                                                                                          ["200"])}
    assert rows["100"][1] == "0" and rows["200"][1] == "2", "62 PNEUMONIA allow no miss, 125 allow two"
    for row in rows.values():
        assert row[5:9] == ["1.000", "(1.000", "-", "1.000)"], "separable: no NORMAL image over the threshold"
        assert int(row[-1].rstrip("%")) >= 85, "the 95% bound lets about 1 sample in 20 fall under the target"


def test_the_threshold_rests_on_the_samples_hardest_pneumonia_image(tmp_path):
    """Overlapping scores: a 100-image sample puts the threshold under every sampled PNEUMONIA image."""
    script = load_script("benchmark_calibration")
    random = np.random.default_rng(0)
    labels = np.r_[np.zeros(400, dtype=np.int64), np.ones(600, dtype=np.int64)]
    scores = np.r_[random.normal(0.3, 0.15, 400), random.normal(0.7, 0.15, 600)]
    small = script.simulate(labels, scores, 100, 200, 0.95, 0.95, 0.625, seed=1)
    large = script.simulate(labels, scores, 300, 200, 0.95, 0.95, 0.625, seed=1)
    assert set(small["misses_allowed"]) == {0} and min(large["misses_allowed"]) > 0
    for threshold, chosen in zip(small["thresholds"], small["samples"], strict=True):
        assert threshold == scores[chosen][labels[chosen] == 1].min(), "no miss allowed: at the hardest PNEUMONIA"
    assert np.median(small["results"][:, 0]) > 0.98, "no miss allowed: sensitivity well above the target"
    assert np.std(small["results"][:, 1]) > np.std(large["results"][:, 1]), "a small sample's specificity varies more"
    assert np.median(small["results"][:, 1]) < np.median(large["results"][:, 1])


def test_a_sample_the_rule_refuses_is_counted_not_scored(tmp_path):
    script = load_script("benchmark_calibration")
    labels = np.r_[np.zeros(100, dtype=np.int64), np.ones(100, dtype=np.int64)]
    found = script.simulate(labels, np.r_[np.zeros(100), np.ones(100)], 60, 10, 0.95, 0.95, 0.5, seed=0)
    assert found["refused"] == 10 and len(found["results"]) == 0, "30 PNEUMONIA cannot promise 0.95"


def test_unscored_rows_are_skipped_and_samples_are_drawn_from_the_site_as_it_is(tmp_path):
    scores = write_scores(tmp_path / "site.csv", np.linspace(0.0, 0.4, 150), np.linspace(0.6, 1.0, 250))
    with scores.open("a") as handle:
        handle.write('/site/NORMAL/broken.png,"",ERROR\n')
    finished = run_script("--scores", str(scores), "--draws", "20", "--sample-sizes", "100")
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "400 images, 250 PNEUMONIA (1 unscored rows skipped)" in finished.stdout
    assert any(line.split()[:1] == ["100"] for line in finished.stdout.splitlines())


def test_a_sample_size_the_site_cannot_fill_is_refused_plainly(tmp_path):
    scores = write_scores(tmp_path / "site.csv", np.linspace(0.0, 0.4, 30), np.linspace(0.6, 1.0, 250))
    finished = run_script("--scores", str(scores), "--sample-sizes", "100", "--positive-share", "0.6")
    assert finished.returncode == 2 and "Traceback" not in finished.stderr
    assert "a sample of 100 needs 40 NORMAL (the site has 30), leaving none to score" in finished.stderr
