"""Stage 1: fetch labelled images from storage, check every file as it arrives, write a manifest.

Reads `<data prefix>/[<split>/]<CLASS>/<image>`. Bad files (empty, not an image,
truncated, corrupt) and exact duplicates go into a report instead of stopping the run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from xray.config import PipelineConfig
from xray.data import CLASS_NAMES, EXTERNAL_SITES_FOLDER, TRAINING_LIMITS, DataError
from xray.decoding import DecodeError, decode_image
from xray.entity.artifacts import DataIngestionArtifact, RunInfo
from xray.storage import Storage

logger = logging.getLogger(__name__)

STAGE = "data_ingestion"


@dataclass(frozen=True)
class Candidate:
    """One file found under the data prefix, before it is checked."""

    key: str
    path: Path
    class_name: str
    split: str


@dataclass(frozen=True)
class CheckedFile:
    """A candidate with its content hash, or the reason it was rejected."""

    candidate: Candidate
    sha256: str
    problem: str | None


def locate(relative_key: str) -> tuple[str, str] | None:
    """(class, given split) from `[split/]CLASS/name`, or None when the path has no class folder."""
    parts = relative_key.split("/")
    if len(parts) == 2 and parts[0].upper() in CLASS_NAMES:
        return parts[0].upper(), ""
    if len(parts) == 3 and parts[1].upper() in CLASS_NAMES:
        return parts[1].upper(), parts[0].lower()
    return None


def check_file(candidate: Candidate, data: bytes | None = None) -> CheckedFile:
    """Hash and fully decode one file (its `data`, else read from its path); a failure is a recorded problem."""
    data = candidate.path.read_bytes() if data is None else data
    digest = hashlib.sha256(data).hexdigest()
    try:
        decode_image(data, TRAINING_LIMITS)
    except DecodeError as error:
        return CheckedFile(candidate, digest, f"{error.code}: {error.problem}")
    return CheckedFile(candidate, digest, None)


def remove_duplicates(files: list[CheckedFile]) -> tuple[list[CheckedFile], list[dict[str, str]]]:
    """Keep the first of each identical content; drop every copy when copies disagree on the class."""
    by_hash: dict[str, list[CheckedFile]] = {}
    for item in files:
        by_hash.setdefault(item.sha256, []).append(item)
    kept, dropped = [], []
    for copies in by_hash.values():
        classes = {item.candidate.class_name for item in copies}
        if len(classes) > 1:
            dropped += [{"key": c.candidate.key, "reason": "duplicate with conflicting labels"} for c in copies]
            continue
        kept.append(copies[0])
        dropped += [
            {"key": c.candidate.key, "reason": f"duplicate of {copies[0].candidate.key}"} for c in copies[1:]
        ]
    return sorted(kept, key=lambda item: item.candidate.key), dropped


def manifest_digest(files: list[CheckedFile]) -> str:
    """A hash of the data's content and labels, independent of where it was downloaded to."""
    lines = sorted(f"{item.sha256} {item.candidate.class_name} {item.candidate.split}" for item in files)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def run(config: PipelineConfig, inputs: RunInfo, storage: Storage) -> DataIngestionArtifact:
    """Download, check and list the labelled images; fail clearly when nothing usable is there."""
    prefix = config.data.prefix.strip("/")
    location = f"{storage.uri.rstrip('/')}/{prefix}/"
    keys = [key for key in storage.list(f"{prefix}/") if not key.startswith(f"{prefix}/{EXTERNAL_SITES_FOLDER}/")]
    if not keys:
        raise DataError(
            f"no files under {location}: expected {prefix}/[<split>/]<CLASS>/<image> with CLASS one of "
            f"{', '.join(CLASS_NAMES)}; seed it with `python -m xray upload-data FOLDER`"
        )
    stage_dir = Path(inputs.run_dir) / STAGE
    image_dir = Path(config.artifacts_dir) / "cache" / "data" / hashlib.sha256(location.encode()).hexdigest()[:16]

    candidates: dict[str, Candidate] = {}
    rejected = []
    for key in keys:
        relative = key[len(prefix) + 1 :]
        where = locate(relative)
        if where is None:
            rejected.append({"key": key, "reason": "not inside a NORMAL/ or PNEUMONIA/ folder"})
            continue
        candidates[key] = Candidate(key, image_dir / relative, where[0], where[1])
    results: dict[str, CheckedFile] = {}

    def check_arrival(key: str, data: bytes) -> None:
        # Runs on the download threads as each file arrives: checking overlaps with the downloads still running.
        if key in candidates:
            results[key] = check_file(candidates[key], data)

    transfer = storage.download_prefix(prefix, image_dir, workers=config.data.download_workers or None,
                                       on_file=check_arrival)  # fmt: skip
    logger.info("fetched %d files from %s (%d already present)", transfer.transferred, location, transfer.skipped)
    checked = [results[key] for key in candidates if key in results]
    rejected += [{"key": key, "reason": "removed from storage during ingestion"} for key in candidates
                 if key not in results]  # fmt: skip
    good = [item for item in checked if item.problem is None]
    rejected += [{"key": item.candidate.key, "reason": item.problem} for item in checked if item.problem]
    kept, duplicates = remove_duplicates(good)

    class_counts = {name: 0 for name in CLASS_NAMES} | Counter(item.candidate.class_name for item in kept)
    if not kept:
        raise DataError(f"no readable images under {location} ({len(rejected)} files rejected; see the report)")
    missing = [name for name, count in class_counts.items() if count == 0]
    if missing:
        raise DataError(
            f"only one class has images under {location}: {dict(class_counts)}; "
            f"add images under {', '.join(missing)}/ to train a classifier"
        )

    stage_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = stage_dir / "manifest.csv"
    with manifest_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "path", "class", "split", "sha256"])
        for item in kept:
            c = item.candidate
            writer.writerow([c.key, str(c.path), c.class_name, c.split, item.sha256])
    report_path = stage_dir / "report.json"
    report = {"source": location, "files_listed": len(keys), "kept": len(kept),
              "rejected": rejected, "duplicates": duplicates}  # fmt: skip
    report_path.write_text(json.dumps(report, indent=2))
    for entry in rejected[:20]:
        logger.warning("skipped %s: %s", entry["key"], entry["reason"])
    artifact = DataIngestionArtifact(
        run=inputs,
        image_dir=str(image_dir),
        manifest_path=str(manifest_path),
        manifest_sha256=manifest_digest(kept),
        report_path=str(report_path),
        class_counts=dict(class_counts),
        given_split_counts=dict(Counter(item.candidate.split or "none" for item in kept)),
        rejected_count=len(rejected),
        duplicate_count=len(duplicates),
    )
    artifact.save(stage_dir)
    return artifact
