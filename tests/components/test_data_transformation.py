"""Stage 2: patient-level splits, recorded preprocessing and the decoded-image cache."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_dataset
from xray.components import data_ingestion, data_transformation
from xray.data import TRAINING_LIMITS
from xray.pipeline import start_run
from xray.preprocessing import decode_pixels, normalise_intensity


def transform(config, storage, run_id="run-1"):
    ingestion = data_ingestion.run(config, start_run(config, storage, run_id), storage)
    return data_transformation.run(config, ingestion, storage)


def rows_of(artifact):
    with open(artifact.splits_path) as handle:
        return list(csv.DictReader(handle))


def test_no_patient_sits_in_two_splits_and_every_split_has_both_classes(smoke_config, seeded_storage):
    artifact = transform(smoke_config, seeded_storage)
    splits_of_patient = defaultdict(set)
    for row in rows_of(artifact):
        splits_of_patient[row["patient"]].add(row["split"])
    assert all(len(splits) == 1 for splits in splits_of_patient.values())
    assert any(not patient.startswith("image:") for patient in splits_of_patient)
    for split in ("train", "validation", "test"):
        assert min(artifact.split_counts[split].values()) > 0, artifact.split_counts


def test_preprocessing_is_recorded_and_cache_matches_it(smoke_config, seeded_storage):
    artifact = transform(smoke_config, seeded_storage)
    size = smoke_config.transformation.image_size
    assert artifact.preprocessing["image_size"] == size
    assert 0 < artifact.preprocessing["mean"] < 1 and artifact.preprocessing["std"] > 0
    cache = np.load(artifact.cache_path)
    assert cache.shape == (48, size, size) and cache.dtype == np.uint8


def test_given_test_folder_is_the_test_split(tmp_path, smoke_config, storage):
    make_dataset(tmp_path / "images", per_class=16, split="train")
    make_dataset(tmp_path / "images", per_class=4, split="test", start=700)
    storage.upload_folder(tmp_path / "images", "data")
    artifact = transform(smoke_config, storage)
    test_rows = [row for row in rows_of(artifact) if row["split"] == "test"]
    assert len(test_rows) == 8
    assert all("/test/" in row["key"] for row in test_rows)


def test_second_run_reuses_the_cache_without_decoding(smoke_config, seeded_storage, monkeypatch):
    first = transform(smoke_config, seeded_storage, "run-1")

    def refuse(*arguments, **keywords):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(data_transformation, "decode_pixels", refuse)
    second = transform(smoke_config, seeded_storage, "run-2")
    assert second.cache_path == first.cache_path
    assert rows_of(second) == rows_of(first)


def test_cache_written_in_chunks_holds_every_image_and_exact_statistics(smoke_config, seeded_storage, monkeypatch):
    monkeypatch.setattr(data_transformation, "CACHE_CHUNK", 5)  # 48 images: ten chunks, the last one short
    artifact = transform(smoke_config, seeded_storage)
    cache = np.load(artifact.cache_path, mmap_mode="r")
    rows = rows_of(artifact)
    size = smoke_config.transformation.image_size
    for row in rows:
        expected = decode_pixels(Path(row["path"]).read_bytes(), size, TRAINING_LIMITS)
        assert np.array_equal(cache[int(row["index"])], expected), row["key"]
    train = np.stack([cache[int(row["index"])] for row in rows if row["split"] == "train"])
    train = normalise_intensity(train, artifact.preprocessing["intensity"]) / 255.0  # the statistics the model sees
    assert artifact.preprocessing["mean"] == pytest.approx(train.mean(), abs=1e-6)
    assert artifact.preprocessing["std"] == pytest.approx(train.std(), abs=1e-6)
    assert not list(Path(artifact.cache_path).parent.glob("*partial*"))


def test_two_channel_statistics_pool_the_equalised_and_the_decoded_images(tmp_path):
    """`equalize_with_raw` standardises both channels with one mean and deviation over both mappings."""
    generator = np.random.default_rng(2)
    images = np.clip(generator.normal(90, 30, (5, 24, 24)), 0, 255).astype(np.uint8)
    cache_path = tmp_path / "cache.npy"
    np.save(cache_path, images)
    both = np.concatenate([normalise_intensity(images[:4], "equalize").ravel(), images[:4].ravel()]) / 255.0
    mean, std = data_transformation.pixel_statistics(cache_path, [0, 1, 2, 3], "equalize_with_raw")
    assert mean == pytest.approx(both.mean()) and std == pytest.approx(both.std())
    assert mean != pytest.approx(data_transformation.pixel_statistics(cache_path, [0, 1, 2, 3], "equalize")[0])
