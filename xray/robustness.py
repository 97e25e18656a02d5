"""The test split again under controlled acquisition changes: how much specificity survives another scanner.

Each perturbation acts on the decoded uint8 pixels at model size (what `preprocessing.decode_pixels`
returns and the training cache holds), before `preprocessing.normalise`, so any intensity
normalisation the model ships with meets the change as it would meet a new scanner's image.
Sizes are relative to the image side, so a strength means the same at 32, 128 or 224 px.
Scores go through the inference core with the model's own calibration and threshold.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from xray.inference import Predictor
from xray.metrics import roc_auc, summarise
from xray.preprocessing import RESAMPLING, scale_detail

logger = logging.getLogger(__name__)

Pixels = np.ndarray  # uint8, N x H x W


@dataclass(frozen=True)
class Perturbation:
    """One acquisition change at one strength."""

    name: str
    strength: str  # "mild" or "strong"
    parameter: float
    description: str
    change: Callable[[Pixels, float, np.random.Generator], Pixels]

    @property
    def label(self) -> str:
        return f"{self.name} ({self.strength})"


def to_uint8(values: np.ndarray) -> Pixels:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def per_image(pixels: Pixels, operation: Callable[[Image.Image], Image.Image]) -> Pixels:
    """Apply a PIL operation to each image of a batch, keeping the batch's size."""
    return np.stack([np.asarray(operation(Image.fromarray(image, mode="L")), dtype=np.uint8) for image in pixels])


def contrast(pixels: Pixels, factor: float, generator: np.random.Generator) -> Pixels:
    """Scale each image's contrast about its mean (factor < 1: flatter)."""
    values = pixels.astype(np.float32)
    mean = values.mean(axis=(1, 2), keepdims=True)
    return to_uint8(mean + factor * (values - mean))


def gamma(pixels: Pixels, exponent: float, generator: np.random.Generator) -> Pixels:
    """Another display curve: 255 * (p / 255) ** gamma."""
    table = to_uint8(255.0 * (np.arange(256) / 255.0) ** exponent)
    return table[pixels]


def blur(pixels: Pixels, sigma_fraction: float, generator: np.random.Generator) -> Pixels:
    """Gaussian blur, sigma a fraction of the image side."""
    radius = sigma_fraction * pixels.shape[-1]
    return per_image(pixels, lambda image: image.filter(ImageFilter.GaussianBlur(radius)))


def detail(pixels: Pixels, gain: float, generator: np.random.Generator) -> Pixels:
    """The fine detail scaled by `gain` (`preprocessing.scale_detail`): another scanner's edge enhancement.
    Kermany's last NORMAL patients have about 20% less of it than the earlier ones
    (README, "Later and earlier patients")."""
    return scale_detail(pixels, gain)


def noise(pixels: Pixels, standard_deviation: float, generator: np.random.Generator) -> Pixels:
    """Additive Gaussian noise in grey levels (quantum noise of a lower dose)."""
    return to_uint8(pixels + standard_deviation * generator.standard_normal(pixels.shape, dtype=np.float32))


def jpeg(pixels: Pixels, quality: float, generator: np.random.Generator) -> Pixels:
    """Re-compressed as JPEG at this quality."""

    def compress(image: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(quality))
        return Image.open(io.BytesIO(buffer.getvalue())).convert("L")

    return per_image(pixels, compress)


def resample(pixels: Pixels, factor: float, generator: np.random.Generator) -> Pixels:
    """Down-sampled by `factor`, then back up: a lower-resolution detector or export."""
    size = pixels.shape[-1]
    small = max(4, round(size * factor))
    return per_image(pixels, lambda image: image.resize((small, small), RESAMPLING).resize((size, size), RESAMPLING))


def crop(pixels: Pixels, fraction: float, generator: np.random.Generator) -> Pixels:
    """Each border cropped by `fraction` of the side, resized back: tighter collimation."""
    size = pixels.shape[-1]
    margin = round(size * fraction)
    box = (margin, margin, size - margin, size - margin)
    return per_image(pixels, lambda image: image.crop(box).resize((size, size), RESAMPLING))


def pad(pixels: Pixels, fraction: float, generator: np.random.Generator) -> Pixels:
    """A black border of `fraction` of the side on each edge, resized back: a wider field of view."""
    size = pixels.shape[-1]
    margin = round(size * fraction)

    def widen(image: Image.Image) -> Image.Image:
        canvas = Image.new("L", (size + 2 * margin, size + 2 * margin), 0)
        canvas.paste(image, (margin, margin))
        return canvas.resize((size, size), RESAMPLING)

    return per_image(pixels, widen)


def rotate(pixels: Pixels, degrees: float, generator: np.random.Generator) -> Pixels:
    """Rotated by +/- `degrees` (alternating images), corners filled black: a patient not square to the plate."""
    rotated = [np.asarray(Image.fromarray(image, mode="L").rotate(degrees if index % 2 else -degrees,
                                                                   resample=Image.Resampling.BILINEAR, fillcolor=0))
               for index, image in enumerate(pixels)]  # fmt: skip
    return np.stack(rotated).astype(np.uint8)


def invert_background(pixels: Pixels, percentile: float, generator: np.random.Generator) -> Pixels:
    """The darkest `percentile`% of each image (the background window) shown inverted, bright: another LUT."""
    levels = np.percentile(pixels.reshape(len(pixels), -1), percentile, axis=1)[:, None, None]
    return np.where(pixels <= levels, 255 - pixels, pixels).astype(np.uint8)


PERTURBATIONS: tuple[Perturbation, ...] = (
    Perturbation("contrast", "mild", 0.75, "contrast x0.75 about the mean", contrast),
    Perturbation("contrast", "strong", 0.5, "contrast x0.5 about the mean", contrast),
    Perturbation("gamma", "mild", 0.7, "gamma 0.7 (brighter mid-tones)", gamma),
    Perturbation("gamma", "strong", 1.6, "gamma 1.6 (darker mid-tones)", gamma),
    Perturbation("blur", "mild", 0.01, "Gaussian blur, sigma 1% of the side", blur),
    Perturbation("blur", "strong", 0.02, "Gaussian blur, sigma 2% of the side", blur),
    Perturbation("detail", "mild", 0.8, "fine detail x0.8 (weaker edge enhancement)", detail),
    Perturbation("detail", "strong", 0.6, "fine detail x0.6", detail),
    Perturbation("noise", "mild", 6.0, "Gaussian noise, 6 grey levels", noise),
    Perturbation("noise", "strong", 15.0, "Gaussian noise, 15 grey levels", noise),
    Perturbation("jpeg", "mild", 50, "JPEG re-compression, quality 50", jpeg),
    Perturbation("jpeg", "strong", 20, "JPEG re-compression, quality 20", jpeg),
    Perturbation("resample", "mild", 0.5, "down-sampled to 1/2, then up", resample),
    Perturbation("resample", "strong", 0.25, "down-sampled to 1/4, then up", resample),
    Perturbation("crop", "mild", 0.06, "6% cropped off each border", crop),
    Perturbation("crop", "strong", 0.12, "12% cropped off each border", crop),
    Perturbation("pad", "mild", 0.06, "black border of 6% on each edge", pad),
    Perturbation("pad", "strong", 0.12, "black border of 12% on each edge", pad),
    Perturbation("rotation", "mild", 5.0, "rotated by 5 degrees", rotate),
    Perturbation("rotation", "strong", 10.0, "rotated by 10 degrees", rotate),
    Perturbation("background_inversion", "mild", 5.0, "darkest 5% of each image inverted", invert_background),
    Perturbation("background_inversion", "strong", 15.0, "darkest 15% of each image inverted", invert_background),
)


def perturb(pixels: Pixels, perturbation: Perturbation, seed: int = 0) -> Pixels:
    """The batch under one perturbation (seeded, so a report repeats)."""
    return perturbation.change(np.ascontiguousarray(pixels), perturbation.parameter, np.random.default_rng(seed))


def score(predictor: Predictor, pixels: Pixels, labels: np.ndarray) -> dict[str, float]:
    """ROC-AUC, and sensitivity and specificity at the model's shipped threshold."""
    probabilities = predictor.probabilities(pixels)
    metrics = summarise(labels, probabilities, predictor.card.threshold)
    return {"roc_auc": roc_auc(labels, probabilities), "sensitivity": metrics["sensitivity"],
            "specificity": metrics["specificity"]}  # fmt: skip


def worst(rows: list[dict[str, object]], metric: str) -> dict[str, object]:
    """The row with the lowest `metric` (NaN rows ignored)."""
    finite = [row for row in rows if not math.isnan(float(row[metric]))]  # type: ignore[arg-type]
    if not finite:
        return {"value": math.nan, "perturbation": None}
    chosen = min(finite, key=lambda row: float(row[metric]))  # type: ignore[arg-type]
    return {"value": chosen[metric], "perturbation": chosen["label"]}


def run_suite(
    predictor: Predictor,
    pixels: Pixels,
    labels: np.ndarray,
    perturbations: tuple[Perturbation, ...] = PERTURBATIONS,
    seed: int = 0,
) -> dict[str, object]:
    """Clean and perturbed scores of one labelled batch, with the worst case over all perturbations."""
    started = time.perf_counter()
    labels = np.asarray(labels)
    rows: list[dict[str, object]] = []
    for index, perturbation in enumerate(perturbations):
        changed = perturb(pixels, perturbation, seed + index)
        rows.append({"name": perturbation.name, "strength": perturbation.strength, "label": perturbation.label,
                     "parameter": perturbation.parameter, "description": perturbation.description,
                     **score(predictor, changed, labels)})  # fmt: skip
    clean = score(predictor, pixels, labels)
    worst_specificity, worst_auc = worst(rows, "specificity"), worst(rows, "roc_auc")
    seconds = time.perf_counter() - started
    logger.info("robustness: %d perturbations of %d images in %.1f s; worst specificity %.3f (%s), clean %.3f",
                len(rows), len(labels), seconds, worst_specificity["value"], worst_specificity["perturbation"],
                clean["specificity"])  # fmt: skip
    return {
        "threshold": predictor.card.threshold,
        "images": int(len(labels)),
        "clean": clean,
        "perturbations": rows,
        "worst_case": {"specificity": worst_specificity["value"],
                       "specificity_perturbation": worst_specificity["perturbation"],
                       "roc_auc": worst_auc["value"], "roc_auc_perturbation": worst_auc["perturbation"]},
        "seconds": round(seconds, 2),
    }  # fmt: skip
