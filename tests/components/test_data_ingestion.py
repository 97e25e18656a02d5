"""Stage 1: what ingestion keeps, what it reports, and when it refuses."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest

from tests.conftest import encode, hostile_uploads, make_dataset, synthetic_xray
from xray.components import data_ingestion
from xray.data import DataError
from xray.pipeline import start_run


def ingest(config, storage):
    return data_ingestion.run(config, start_run(config, storage, "run-1"), storage)


def test_manifest_lists_every_good_image_with_class_and_hash(smoke_config, seeded_storage):
    artifact = ingest(smoke_config, seeded_storage)
    assert artifact.class_counts == {"NORMAL": 24, "PNEUMONIA": 24}
    with open(artifact.manifest_path) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 48
    assert {row["class"] for row in rows} == {"NORMAL", "PNEUMONIA"}
    assert all(len(row["sha256"]) == 64 and Path(row["path"]).is_file() for row in rows)
    assert Path(artifact.run.run_dir, "data_ingestion", "artifact.json").is_file()


def test_bad_files_and_duplicates_are_reported_not_fatal(tmp_path, smoke_config, storage):
    root = make_dataset(tmp_path / "images", per_class=10)
    good = (root / "NORMAL").iterdir().__next__().read_bytes()
    (root / "NORMAL" / "empty.jpeg").write_bytes(b"")
    (root / "NORMAL" / "notes.jpeg").write_text("this is not an image")
    (root / "PNEUMONIA" / "cut.jpeg").write_bytes(encode(synthetic_xray("PNEUMONIA", 99, 64))[:300])
    (root / "NORMAL" / "copy.jpeg").write_bytes(good)
    (root / "PNEUMONIA" / "mislabelled.png").write_bytes(encode(synthetic_xray("NORMAL", 5), "PNG"))
    (root / "NORMAL" / "same.png").write_bytes(encode(synthetic_xray("NORMAL", 5), "PNG"))
    (root / "stray.jpeg").write_bytes(good)
    storage.upload_folder(root, "data")

    artifact = ingest(smoke_config, storage)
    report = json.loads(Path(artifact.report_path).read_text())
    reasons = {Path(entry["key"]).name: entry["reason"] for entry in report["rejected"] + report["duplicates"]}
    assert reasons["empty.jpeg"] == "empty_file: The file is empty"  # nobody uploaded it: no advice to upload
    assert not any("upload" in reason.lower() for reason in reasons.values())
    assert reasons["notes.jpeg"].startswith("unsupported_format")
    assert reasons["cut.jpeg"].startswith("truncated_image")
    assert "duplicate of" in reasons["copy.jpeg"] or "duplicate of" in reasons[Path(sorted(
        p.name for p in (root / "NORMAL").iterdir() if p.read_bytes() == good)[0]).name]
    assert reasons["mislabelled.png"] == reasons["same.png"] == "duplicate with conflicting labels"
    assert "stray.jpeg" in reasons
    assert artifact.class_counts == {"NORMAL": 10, "PNEUMONIA": 10}


def test_empty_prefix_is_a_clear_error(smoke_config, storage):
    with pytest.raises(DataError, match=r"no files under .*data/.*upload-data"):
        ingest(smoke_config, storage)


def test_one_class_only_is_a_clear_error(tmp_path, smoke_config, storage):
    root = make_dataset(tmp_path / "images", per_class=6)
    for path in (root / "PNEUMONIA").iterdir():
        path.unlink()
    (root / "PNEUMONIA").rmdir()
    storage.upload_folder(root, "data")
    with pytest.raises(DataError, match="only one class.*PNEUMONIA"):
        ingest(smoke_config, storage)


def test_only_unreadable_files_is_a_clear_error(tmp_path, smoke_config, storage):
    (tmp_path / "images" / "NORMAL").mkdir(parents=True)
    (tmp_path / "images" / "NORMAL" / "a.jpeg").write_text("nope")
    storage.upload_folder(tmp_path / "images", "data")
    with pytest.raises(DataError, match="no readable images"):
        ingest(smoke_config, storage)


def test_split_folders_are_recorded(tmp_path, smoke_config, storage):
    make_dataset(tmp_path / "images", per_class=8, split="train")
    make_dataset(tmp_path / "images", per_class=4, split="test", start=500)
    storage.upload_folder(tmp_path / "images", "data")
    artifact = ingest(smoke_config, storage)
    assert artifact.given_split_counts == {"train": 16, "test": 8}


def test_files_are_checked_as_they_arrive_not_after_the_whole_download(
    tmp_path, smoke_config, seeded_storage, monkeypatch
):
    events = []
    read_bytes = type(seeded_storage).read_bytes
    check_file = data_ingestion.check_file
    monkeypatch.setattr(type(seeded_storage), "read_bytes",
                        lambda self, key: events.append("download") or read_bytes(self, key))  # fmt: skip
    monkeypatch.setattr(data_ingestion, "check_file", lambda *args: events.append("check") or check_file(*args))
    config = dataclasses.replace(smoke_config, data=dataclasses.replace(smoke_config.data, download_workers=1))
    artifact = ingest(config, seeded_storage)
    assert sum(artifact.class_counts.values()) == 48
    assert events.count("check") == events.count("download") == 48
    assert events[:4] == ["download", "check", "download", "check"]


def test_dicoms_that_crashed_decoding_are_reported_and_ingestion_goes_on(tmp_path, smoke_config, storage):
    root = make_dataset(tmp_path / "images", per_class=6)
    crashed = [upload for upload in hostile_uploads() if upload.name in
               ("dicom_palette_without_lut", "dicom_modality_lut_without_descriptor")]  # fmt: skip
    for upload in crashed:
        (root / "NORMAL" / upload.filename).write_bytes(upload.data)
    storage.upload_folder(root, "data")

    artifact = ingest(smoke_config, storage)
    report = json.loads(Path(artifact.report_path).read_text())
    reasons = {Path(entry["key"]).name: entry["reason"] for entry in report["rejected"]}
    assert {name: reasons[name].split(":")[0] for name in ("palette.dcm", "modality.dcm")} == {
        "palette.dcm": "invalid_dicom", "modality.dcm": "invalid_dicom"}  # fmt: skip
    assert artifact.class_counts == {"NORMAL": 6, "PNEUMONIA": 6}
