"""Stage 2: split by patient, fix the preprocessing, and cache decoded, resized images.

Decoding thousands of JPEGs is the slow part on a CPU, so each image is decoded and
resized once into a uint8 array that every epoch (and every later run with the same
data and size) reads instead.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np

from xray.config import PipelineConfig
from xray.data import (
    CLASS_NAMES,
    SPLITS,
    TRAINING_LIMITS,
    DataError,
    label_of,
    patient_id,
    read_manifest,
    split_patients,
)
from xray.entity.artifacts import DataIngestionArtifact, DataTransformationArtifact
from xray.preprocessing import Preprocessing, decode_pixels, normalise_intensity
from xray.storage import Storage

logger = logging.getLogger(__name__)

STAGE = "data_transformation"
CACHE_FORMAT = 1
GIVEN_TEST_SPLITS = ("test",)


def assign_splits(rows: list[dict[str, str]], config: PipelineConfig) -> tuple[list[dict[str, str]], int]:
    """Give each row a patient and a split; a given `test/` folder is the test split.

    Returns the rows kept and how many were dropped because their patient is in the
    given test split (a patient never sits in two splits).
    """
    transformation = config.transformation
    for row in rows:
        row["patient"] = patient_id(Path(row["key"]).name, fallback=row["sha256"][:16])
    given_test = {row["patient"] for row in rows if row["split"] in GIVEN_TEST_SPLITS}
    pool = [row for row in rows if row["split"] not in GIVEN_TEST_SPLITS]
    dropped = sum(1 for row in pool if row["patient"] in given_test)
    pool = [row for row in pool if row["patient"] not in given_test]
    patient_classes: dict[str, Counter] = {}
    for row in pool:
        patient_classes.setdefault(row["patient"], Counter())[row["class"]] += 1
    patients = {patient: counts.most_common(1)[0][0] for patient, counts in patient_classes.items()}
    test_fraction = 0.0 if given_test else transformation.test_fraction
    assignment = split_patients(patients, transformation.validation_fraction, test_fraction, config.seed)
    for row in rows:
        row["assigned"] = "test" if row["split"] in GIVEN_TEST_SPLITS else assignment.get(row["patient"], "")
    return [row for row in rows if row["assigned"]], dropped


def cache_images(rows: list[dict[str, str]], image_size: int, cache_path: Path, workers: int) -> np.ndarray:
    """Decode and resize every row's image once; reuse the cache file when it exists."""
    if cache_path.is_file():
        images = np.load(cache_path)
        if images.shape == (len(rows), image_size, image_size):
            logger.info("reusing decoded image cache %s", cache_path)
            return images

    def load(row: dict[str, str]) -> np.ndarray:
        return decode_pixels(Path(row["path"]).read_bytes(), image_size, TRAINING_LIMITS)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        images = np.stack(list(pool.map(load, rows)))
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = cache_path.with_name(cache_path.name + ".partial.npy")
    np.save(temporary, images)
    temporary.replace(cache_path)
    return images


def run(config: PipelineConfig, inputs: DataIngestionArtifact, storage: Storage) -> DataTransformationArtifact:
    """Split by patient, cache images, and record preprocessing and augmentation."""
    stage_dir = Path(inputs.run.run_dir) / STAGE
    stage_dir.mkdir(parents=True, exist_ok=True)
    rows, dropped = assign_splits(read_manifest(inputs.manifest_path), config)
    if dropped:
        logger.warning("dropped %d images whose patients are in the given test split", dropped)
    counts = {split: {name: 0 for name in CLASS_NAMES} for split in SPLITS}
    for row in rows:
        counts[row["assigned"]][row["class"]] += 1
    for split in ("train", "validation"):
        empty = [name for name, count in counts[split].items() if count == 0]
        if empty:
            raise DataError(
                f"the {split} split has no {', '.join(empty)} images ({counts}); add more patients of that class"
            )

    size = config.transformation.image_size
    key = hashlib.sha256(f"{CACHE_FORMAT}:{inputs.manifest_sha256}:{size}".encode()).hexdigest()[:20]
    cache_path = Path(config.artifacts_dir) / "cache" / "images" / f"{key}.npy"
    rows.sort(key=lambda row: row["key"])
    images = cache_images(rows, size, cache_path, config.data.workers)
    intensity = config.transformation.intensity
    train_images = normalise_intensity(images[[index for index, row in enumerate(rows) if row["assigned"] == "train"]],
                                       intensity)  # fmt: skip
    mean, std = float(train_images.mean() / 255.0), float(train_images.std() / 255.0)
    preprocessing = Preprocessing(image_size=size, mean=round(mean, 6), std=round(max(std, 1e-3), 6),
                                  intensity=intensity, border_mask=config.transformation.border_mask)  # fmt: skip

    splits_path = stage_dir / "splits.csv"
    with splits_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "key", "path", "class", "label", "split", "patient", "sha256"])
        for index, row in enumerate(rows):
            writer.writerow([index, row["key"], row["path"], row["class"], label_of(row["class"]),
                             row["assigned"], row["patient"], row["sha256"]])  # fmt: skip
    patients = {split: len({row["patient"] for row in rows if row["assigned"] == split}) for split in SPLITS}
    logger.info("split %d images of %d patients: %s", len(rows), sum(patients.values()), counts)
    artifact = DataTransformationArtifact(
        ingestion=inputs,
        splits_path=str(splits_path),
        cache_path=str(cache_path),
        preprocessing=preprocessing.to_dict(),
        augmentation=asdict(config.transformation.augmentation),
        split_counts=counts,
        patient_counts=patients,
    )
    artifact.save(stage_dir)
    return artifact
