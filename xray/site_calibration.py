"""Site calibration: fit the production model's temperature, bias and threshold to a new site's sample.

No retraining: the weights stay, so the ranking (ROC-AUC) stays. A hospital's scanner shifts the
scores, and the threshold learned on the training distribution is then too low (issue 11: the
shipped threshold gave a specificity of 0.786 on later images). A labelled sample of about 100
images from the site re-fits what turns logits into the answer, with the same rules as evaluation
(`xray.calibration`), and the result becomes a new model version with its provenance, promoted
through the same gate. A sample too small to promise the target sensitivity is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xray import package
from xray.calibration import (
    fit_checked_calibration,
    minimum_positives,
    misses_allowed,
    positives_for_misses,
    threshold_for_sensitivity,
)
from xray.components.model_evaluation import decide
from xray.config import PipelineConfig
from xray.data import CLASS_NAMES, IMAGE_SUFFIXES, POSITIVE_CLASS, TRAINING_LIMITS, DataError, label_of
from xray.decoding import DecodeError, sniff_format
from xray.external_sites import decide_sites, load_sites, score_sites
from xray.inference import Predictor
from xray.metrics import sigmoid, summarise
from xray.model import predict_logits
from xray.preprocessing import normalise
from xray.storage import Storage

logger = logging.getLogger(__name__)

MINIMUM_NEGATIVES = 10  # fewer NORMAL images say nothing about specificity, and a bias cannot be fitted


class SampleTooSmallError(DataError):
    """A site sample with too few images of a class to promise the target sensitivity."""


@dataclass(frozen=True)
class SiteSampleFile:
    """One labelled image of the site's sample."""

    path: Path
    class_name: str
    sha256: str
    data: bytes


@dataclass(frozen=True)
class SiteCalibrationResult:
    """The new version, whether it was promoted and why, and what it was fitted on."""

    version: str
    parent_version: str
    promoted: bool
    reason: str
    threshold: float
    threshold_rule: str
    calibration: dict[str, Any]
    metrics: dict[str, Any]
    parent_metrics: dict[str, Any]
    provenance: dict[str, Any]
    package_dir: str | None  # None on a dry run
    external_sites: dict[str, Any]
    caution: str | None = None
    dry_run: bool = False


def read_sample(folder: Path) -> list[SiteSampleFile]:
    """The images of FOLDER/NORMAL/ and FOLDER/PNEUMONIA/, in a stable order; files that are not one are skipped.

    Only JPEG, PNG and DICOM files (by their bytes) count, so the sample size checked before the model loads is
    not inflated by a text file or an unreadable one.
    """
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder: expected {folder}/NORMAL/ and {folder}/PNEUMONIA/")
    files = []
    for child in sorted(folder.iterdir()):
        if child.is_dir() and child.name.upper() in CLASS_NAMES:
            for path in sorted(p for p in child.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
                try:
                    data = path.read_bytes()
                except OSError as error:
                    logger.warning("skipped %s: cannot be read (%s)", path, error.strerror or error)
                    continue
                if sniff_format(data) is None:
                    logger.warning("skipped %s: not a JPEG, PNG or DICOM image", path)
                    continue
                files.append(SiteSampleFile(path, child.name.upper(), hashlib.sha256(data).hexdigest(), data))
    if not files:
        raise DataError(f"{folder} holds no images in NORMAL/ or PNEUMONIA/")
    return files


def sample_digest(files: list[SiteSampleFile]) -> str:
    """A hash of the sample's content and labels, independent of file names and locations."""
    return hashlib.sha256("\n".join(sorted(f"{item.sha256} {item.class_name}" for item in files)).encode()).hexdigest()


def check_sample_size(labels: np.ndarray, target: float, confidence: float) -> None:
    """Refuse, in one sentence, a sample that cannot promise `target` sensitivity at `confidence`."""
    positives, negatives = int(labels.sum()), int(len(labels) - labels.sum())
    needed = minimum_positives(target, confidence)
    if positives < needed:
        raise SampleTooSmallError(
            f"the sample has {positives} {POSITIVE_CLASS} images: promising sensitivity >= {target} "
            f"with {confidence:.0%} confidence needs at least {needed} (even catching all of them "
            f"would not prove more); add {POSITIVE_CLASS} images or lower --target-sensitivity"
        )
    if negatives < MINIMUM_NEGATIVES:
        raise SampleTooSmallError(
            f"the sample has {negatives} NORMAL images: at least {MINIMUM_NEGATIVES} are needed to "
            "fit the calibration and to measure specificity; add NORMAL images"
        )


def sample_caution(positives: int, allowed: int, target: float, confidence: float) -> str | None:
    """A plain warning when the sample is just big enough: `allowed` (misses) is 0, so the threshold catches all."""
    if allowed != 0:
        return None
    caution = (f"the sample's {positives} {POSITIVE_CLASS} images allow no miss, so the threshold sits below every "
               f"one of them: it rests on the sample's hardest {POSITIVE_CLASS} image, and the specificity it gives "
               "on new images varies widely from one sample to another")  # fmt: skip
    needed = positives_for_misses(1, target, confidence)
    if needed:
        caution += f"; a sample with {needed} {POSITIVE_CLASS} images allows one miss and a steadier threshold"
    return caution


def sample_logits(predictor: Predictor,
                  files: list[SiteSampleFile]) -> tuple[np.ndarray, np.ndarray, list[SiteSampleFile]]:  # fmt: skip
    """Raw logits and labels of the decodable images (decoded as the model was trained), and those images."""
    pixels, labels, used = [], [], []
    for item in files:
        try:
            pixels.append(predictor.decode(item.data, TRAINING_LIMITS))
            labels.append(label_of(item.class_name))
            used.append(item)
        except DecodeError as error:
            logger.warning("skipped %s: %s: %s", item.path, error.code, error.problem)
    if not pixels:
        raise DataError("no image of the sample could be decoded")
    stacked = np.stack(pixels)
    batches = [normalise(stacked[start : start + predictor.batch_size], predictor.preprocessing)
               for start in range(0, len(stacked), predictor.batch_size)]  # fmt: skip
    with predictor.lock:
        logits = predict_logits(predictor.model, batches, torch.device("cpu"), channels_last=True)
    return logits.double().numpy(), np.array(labels, dtype=np.int64), used


def refuse_recalibration(card: package.ModelCard, digest: str, target: float) -> None:
    """Refuse to calibrate production again on the sample and target it was calibrated on: nothing would change."""
    provenance = card.provenance or {}
    if (provenance.get("kind") == "site calibration" and provenance.get("sample_manifest_sha256") == digest
            and provenance.get("target_sensitivity") == target):  # fmt: skip
        raise DataError(f"production {card.version} was calibrated on this very sample (sha256 {digest[:12]}) at "
                        f"target sensitivity {target}: calibrating again would give the same model")  # fmt: skip


def new_version(digest: str) -> str:
    """A sortable version id naming the sample it was calibrated on."""
    return f"{datetime.now(UTC):%Y%m%d-%H%M%S}-calibrated-{digest[:8]}"


def calibrate_site(
    config: PipelineConfig,
    storage: Storage,
    folder: Path,
    target_sensitivity: float | None = None,
    cache_dir: str | Path = "artifacts/cache/models",
    dry_run: bool = False,
) -> SiteCalibrationResult:
    """Re-fit temperature, bias and threshold of production on FOLDER, write a version, gate and promote it.

    With `dry_run`, everything is fitted and gated but nothing is written or promoted: what it would do.
    """
    evaluation = config.evaluation
    target = evaluation.target_sensitivity if target_sensitivity is None else target_sensitivity
    if not 0 < target <= 1:
        raise DataError(f"--target-sensitivity {target} must lie in (0, 1]")
    files = read_sample(folder)
    check_sample_size(np.array([label_of(item.class_name) for item in files]), target,
                      evaluation.sensitivity_confidence)  # fmt: skip
    parent_dir = package.fetch_production(storage, cache_dir, config.pusher.models_prefix)
    if parent_dir is None:
        raise package.PackageError(f"no production model in {storage.uri} to calibrate: train one first")
    parent = Predictor.from_package(parent_dir)
    logits, labels, used = sample_logits(parent, files)
    check_sample_size(labels, target, evaluation.sensitivity_confidence)
    digest = sample_digest(used)
    refuse_recalibration(parent.card, digest, target)

    calibration = fit_checked_calibration(labels, logits, seed=config.seed)
    scores = sigmoid(logits, calibration.temperature, calibration.bias)
    threshold, rule = threshold_for_sensitivity(labels, scores, target, evaluation.sensitivity_confidence,
                                                sample="site sample")  # fmt: skip
    logger.info("site calibration: %s; threshold %.4f (%s)", calibration.reason, threshold, rule)
    positives = int(labels.sum())
    allowed = misses_allowed(positives, target, evaluation.sensitivity_confidence)
    caution = sample_caution(positives, allowed, target, evaluation.sensitivity_confidence)
    if caution:
        logger.warning("site calibration: %s", caution)
    metrics = summarise(labels, scores, threshold) | {"calibration": calibration.to_dict(), "split": "site sample"}
    parent_metrics = summarise(labels, sigmoid(logits, parent.card.temperature, parent.card.bias),
                               parent.card.threshold)  # fmt: skip

    version = new_version(digest)
    provenance = {"kind": "site calibration", "parent_version": parent.card.version,
                  "sample_manifest_sha256": digest, "sample_size": int(len(labels)),
                  "sample_counts": {name: int(np.sum(labels == label_of(name))) for name in CLASS_NAMES},
                  "sample_folder": str(folder), "target_sensitivity": target,
                  "sensitivity_confidence": evaluation.sensitivity_confidence, "threshold_rule": rule,
                  "misses_allowed": allowed,
                  "parent_threshold": parent.card.threshold, "parent_temperature": parent.card.temperature,
                  "parent_bias": parent.card.bias, "parent_provenance": parent.card.provenance or None}  # fmt: skip
    card = dataclasses.replace(parent.card, version=version, threshold=threshold, temperature=calibration.temperature,
                               bias=calibration.bias, metrics=metrics, validation_metrics={},
                               created_at=package.utc_now(), code_version=package.code_version(),
                               provenance=provenance)  # fmt: skip

    metric = evaluation.comparison_metric
    promoted, reason = decide(metrics[metric], parent_metrics[metric], config, split="site sample",
                              require_improvement=False)  # fmt: skip
    candidate = Predictor(parent.model, card, batch_size=parent.batch_size)
    sites = score_sites(candidate, parent, load_sites(storage, config))
    if promoted and sites:
        promoted, site_reason = decide_sites(sites, config)
        reason = f"{reason}; {site_reason}"
    package_dir = None
    if not dry_run:
        package_dir = package.write_package(Path(config.artifacts_dir) / "calibrations" / version, parent.model, card)
        if promoted:
            package.publish(storage, package_dir, version, config.pusher.models_prefix, expected=parent.card.version)
            if config.pusher.save_to_bentoml:
                package.save_to_bentoml(package_dir, card, config.pusher.bentoml_model_name)
    logger.info("site calibration%s %s: %s", " (dry run)" if dry_run else "",
                "promoted" if promoted and not dry_run else "would be promoted" if promoted else "not promoted",
                reason)  # fmt: skip
    return SiteCalibrationResult(version=version, parent_version=parent.card.version, promoted=promoted, reason=reason,
                                 threshold=threshold, threshold_rule=rule, calibration=calibration.to_dict(),
                                 metrics=metrics, parent_metrics=parent_metrics, provenance=provenance,
                                 package_dir=None if package_dir is None else str(package_dir), external_sites=sites,
                                 caution=caution, dry_run=dry_run)  # fmt: skip
