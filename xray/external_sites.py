"""External sites: labelled X-rays from other hospitals, scored and reported per site, never trained on.

Storage holds them under `<data prefix>/external/<site>/<CLASS>/<image>`; ingestion skips that
folder, so a site never trains a model nor chooses one. Evaluation and `calibrate` score every
site with the new model and with production, and the promotion gate can refuse a model that is
worse than production on any site (`evaluation.external_sites_must_not_worsen`).
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from xray.config import PipelineConfig
from xray.data import CLASS_NAMES, EXTERNAL_SITES_FOLDER, IMAGE_SUFFIXES, TRAINING_LIMITS, label_of
from xray.decoding import DecodeError
from xray.inference import Predictor
from xray.metrics import summarise
from xray.storage import Storage

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteSample:
    """One site's labelled images, as file bytes (each model decodes them at its own size)."""

    name: str
    files: list[bytes]
    labels: np.ndarray


def external_prefix(config: PipelineConfig) -> str:
    """The storage prefix of the external sites."""
    return f"{config.data.prefix.strip('/')}/{EXTERNAL_SITES_FOLDER}"


def load_sites(storage: Storage, config: PipelineConfig) -> dict[str, SiteSample]:
    """Every `<site>/<CLASS>/<image>` under the external prefix; files in other places are ignored with a warning."""
    prefix = external_prefix(config)
    found: dict[str, list[tuple[str, int]]] = {}
    for key in storage.list(f"{prefix}/"):
        parts = key[len(prefix) + 1 :].split("/")
        if len(parts) != 3 or parts[1].upper() not in CLASS_NAMES or not parts[2].lower().endswith(IMAGE_SUFFIXES):
            logger.warning("external sites: ignored %s (expected %s/<site>/<CLASS>/<image>)", key, prefix)
            continue
        found.setdefault(parts[0], []).append((key, label_of(parts[1].upper())))
    sites = {}
    with ThreadPoolExecutor(max_workers=config.data.workers) as pool:
        for name, entries in sorted(found.items()):
            files = list(pool.map(lambda entry: storage.read_bytes(entry[0]), entries))
            sites[name] = SiteSample(name, files, np.array([label for _, label in entries], dtype=np.int64))
    return sites


def site_pixels(site: SiteSample, predictor: Predictor) -> tuple[np.ndarray, np.ndarray]:
    """The site's images decoded as `predictor`'s model was trained to see them, and their labels.

    Undecodable files are left out.
    """
    image_size = predictor.preprocessing.image_size
    pixels, labels = [], []
    for data, label in zip(site.files, site.labels, strict=True):
        try:
            pixels.append(predictor.decode(data, TRAINING_LIMITS))
            labels.append(label)
        except DecodeError as error:
            logger.warning("external site %s: skipped an image (%s)", site.name, error.code)
    return np.stack(pixels) if pixels else np.empty((0, image_size, image_size), np.uint8), np.array(labels)


def score_site(predictor: Predictor, site: SiteSample) -> dict[str, object]:
    """Every metric of one site at the predictor's own threshold."""
    pixels, labels = site_pixels(site, predictor)
    return summarise(labels, predictor.probabilities(pixels), predictor.card.threshold)


def score_sites(new: Predictor, production: Predictor | None, sites: dict[str, SiteSample]) -> dict[str, dict]:
    """Per site: the new model's metrics and, when there is one, production's."""
    results = {}
    for name, site in sites.items():
        results[name] = {"new": score_site(new, site),
                         "production": score_site(production, site) if production else None}
        logger.info("external site %s (%d images): ROC-AUC %.4f, specificity %.3f, sensitivity %.3f", name,
                    results[name]["new"]["count"], results[name]["new"]["roc_auc"],
                    results[name]["new"]["specificity"], results[name]["new"]["sensitivity"])  # fmt: skip
    return results


def decide_sites(results: dict[str, dict], config: PipelineConfig) -> tuple[bool, str]:
    """Refuse a model worse than production on any external site (when the gate is on and both exist)."""
    evaluation = config.evaluation
    if not results:
        return True, "no external sites"
    if not evaluation.external_sites_must_not_worsen:
        return True, "external sites reported, not gated (evaluation.external_sites_must_not_worsen is false)"
    metric, tolerance = evaluation.comparison_metric, evaluation.external_site_tolerance
    compared = {name: result for name, result in results.items() if result["production"] is not None}
    if not compared:
        return True, "no production model to compare on the external sites"
    worse = [f"{name} {result['new'][metric]:.4f} < production {result['production'][metric]:.4f}"
             for name, result in compared.items()
             if math.isnan(result["new"][metric])
             or result["new"][metric] < result["production"][metric] - tolerance]  # fmt: skip
    if worse:
        return False, f"worse than production on external sites ({metric}): " + "; ".join(worse)
    return True, f"no external site worse than production ({metric}, {len(compared)} sites)"
