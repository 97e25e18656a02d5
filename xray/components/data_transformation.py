"""Stage 2: split by patient, fix the preprocessing, and cache decoded, resized images.

Decoding thousands of JPEGs is the slow part on a CPU, so each image is decoded and
resized once into a memory-mapped uint8 .npy file that every epoch (and every later run
with the same data and size) reads instead. It is written and summarised in chunks, so
memory stays flat however many images there are.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
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
from xray.preprocessing import Preprocessing, decode_pixels, intensity_windows, normalise_intensity
from xray.storage import Storage

logger = logging.getLogger(__name__)

STAGE = "data_transformation"
CACHE_FORMAT = 2  # 2: pixels decoded by preprocessing.DECODE_JPEG_DRAFT (1: full decode)
CACHE_CHUNK = 1024  # images decoded, written or summed at a time: 16 MB at 128 px
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


def open_cache(cache_path: Path, mode: str = "r") -> np.ndarray:
    """Map the cache file; reopened for each chunk so the pages one chunk touched leave the process with it."""
    return np.load(cache_path, mmap_mode=mode)


def cache_images(rows: list[dict[str, str]], image_size: int, cache_path: Path, workers: int) -> None:
    """Decode and resize every row's image once into a memory-mapped .npy file, chunk by chunk.

    At most one chunk of decoded images is in memory at a time, whatever the number of images; an
    existing cache of the right shape is reused, and a half-written one never has the final name.
    """
    shape = (len(rows), image_size, image_size)
    if cache_path.is_file():
        try:
            if open_cache(cache_path).shape == shape:
                logger.info("reusing decoded image cache %s", cache_path)
                return
        except (OSError, ValueError):
            logger.warning("rebuilding unreadable image cache %s", cache_path)

    def load(row: dict[str, str]) -> np.ndarray:
        return decode_pixels(Path(row["path"]).read_bytes(), image_size, TRAINING_LIMITS)

    cache_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = cache_path.with_name(f"{cache_path.stem}.{os.getpid()}.partial.npy")
    try:
        np.lib.format.open_memmap(temporary, mode="w+", dtype=np.uint8, shape=shape).flush()  # header, full size
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for start in range(0, len(rows), CACHE_CHUNK):
                pixels = np.stack(list(pool.map(load, rows[start : start + CACHE_CHUNK])))
                images = open_cache(temporary, "r+")
                images[start : start + len(pixels)] = pixels
                images.flush()
                del images
        temporary.replace(cache_path)
    finally:
        temporary.unlink(missing_ok=True)


def pixel_statistics(cache_path: Path, indices: list[int], intensity: str = "none") -> tuple[float, float]:
    """Mean and standard deviation (on a 0-1 scale) of the cached images at `indices` after the model's intensity
    normalisation (over all its input channels), read chunk by chunk.

    A histogram of the 256 gray levels makes the result exact and the memory one chunk.
    """
    counts = np.zeros(256, dtype=np.int64)
    for start in range(0, len(indices), CACHE_CHUNK):
        images = open_cache(cache_path)
        chunk = images[indices[start : start + CACHE_CHUNK]]
        for window in intensity_windows(intensity):
            counts += np.bincount(normalise_intensity(chunk, window).ravel(), minlength=256)
        del images
    levels = np.arange(256, dtype=np.float64) / 255.0
    total = max(int(counts.sum()), 1)
    mean = float(counts @ levels) / total
    variance = float(counts @ (levels - mean) ** 2) / total
    return mean, variance**0.5


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
    cache_images(rows, size, cache_path, config.data.workers)
    intensity = config.transformation.intensity
    train_indices = [index for index, row in enumerate(rows) if row["assigned"] == "train"]
    mean, std = pixel_statistics(cache_path, train_indices, intensity)
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
