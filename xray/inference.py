"""The one inference core: a model package in, predictions out (CLI, FastAPI and BentoML use it).

It repeats the training preprocessing exactly (`xray.preprocessing`) and applies the
package's calibration (temperature and bias) and threshold, so every caller gets the same probability.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from xray.metrics import sigmoid
from xray.package import ModelCard, fetch_production, load_package, production_version
from xray.preprocessing import normalise, resize_image

if TYPE_CHECKING:
    import torch

# torch and the model factory are imported where a model runs, not here: the API and the CLI import
# this module at start, and `import torch` alone costs seconds there (a server answers /health sooner).

logger = logging.getLogger(__name__)

# Measured on 2 CPU cores (README, "Serving predictions"): channels-last convolutions run 1.3 to
# 4 times faster than the default layout, and EfficientNet's depthwise convolutions slow
# down past about 16 images a batch, so larger requests are scored 16 at a time.
DEFAULT_BATCH_SIZE = 16


@dataclass(frozen=True)
class Prediction:
    """One image's result, as every interface reports it."""

    label: str
    probability: float
    threshold: float
    probabilities: dict[str, float]
    model_version: str

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly dict."""
        return {"label": self.label, "probability": self.probability, "threshold": self.threshold,
                "probabilities": self.probabilities, "model_version": self.model_version}  # fmt: skip


class Predictor:
    """A loaded model with its card; thread-safe for concurrent predictions."""

    def __init__(self, model: torch.nn.Module, card: ModelCard, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        import torch

        self.model = model.eval().to(memory_format=torch.channels_last)
        self.card = card
        self.preprocessing = card.preprocessing_spec
        self.batch_size = batch_size
        self.lock = threading.Lock()

    @classmethod
    def from_package(cls, directory: str | Path, batch_size: int = DEFAULT_BATCH_SIZE) -> Predictor:
        """Load a package folder written by the pusher."""
        model, card = load_package(directory)
        logger.info("loaded model %s (%s) from %s", card.version, card.architecture, directory)
        predictor = cls(model, card, batch_size)
        predictor.warm_up()
        return predictor

    def warm_up(self) -> None:
        """One forward pass on a blank image, so the first real request does not pay torch's set-up (0.5 s here)."""
        size = self.preprocessing.image_size
        self.probabilities(np.zeros((1, size, size), dtype=np.uint8))

    @property
    def version(self) -> str:
        return self.card.version

    def prepare(self, image: Image.Image) -> np.ndarray:
        """The uint8 resized pixels the model sees (the cacheable half of preprocessing)."""
        return resize_image(image, self.preprocessing.image_size)

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """P(PNEUMONIA) for uint8 N x H x W pixels, calibrated as the package says."""
        import torch

        from xray.model import predict_logits

        if len(pixels) == 0:
            return np.empty(0)
        batches = [normalise(pixels[start : start + self.batch_size], self.preprocessing)
                   for start in range(0, len(pixels), self.batch_size)]  # fmt: skip
        with self.lock:
            logits = predict_logits(self.model, batches, torch.device("cpu"), channels_last=True)
        return self.calibrated(logits)

    def calibrated(self, logits: torch.Tensor) -> np.ndarray:
        """P(PNEUMONIA) from raw logits with the package's temperature and bias, as evaluation computed it."""
        return sigmoid(logits.detach().double().numpy(), self.card.temperature, self.card.bias)

    def threshold_logit(self) -> float:
        """The raw logit whose calibrated probability is the package's threshold."""
        threshold = min(max(self.card.threshold, 1e-6), 1 - 1e-6)
        return self.card.temperature * (math.log(threshold / (1 - threshold)) - self.card.bias)

    def to_prediction(self, probability: float) -> Prediction:
        """Label one probability with the package's threshold."""
        from xray.data import CLASS_NAMES, POSITIVE_CLASS

        positive = float(probability)
        negative_class = next(name for name in CLASS_NAMES if name != POSITIVE_CLASS)
        return Prediction(
            label=POSITIVE_CLASS if positive >= self.card.threshold else negative_class,
            probability=round(positive, 6),
            threshold=self.card.threshold,
            probabilities={negative_class: round(1.0 - positive, 6), POSITIVE_CLASS: round(positive, 6)},
            model_version=self.card.version,
        )

    def predict(self, images: list[Image.Image]) -> list[Prediction]:
        """Predictions for decoded images, batched."""
        if not images:
            return []
        pixels = np.stack([self.prepare(image) for image in images])
        return [self.to_prediction(probability) for probability in self.probabilities(pixels)]

    def predict_one(self, image: Image.Image) -> tuple[Prediction, float]:
        """One prediction and the milliseconds it took."""
        started = time.perf_counter()
        prediction = self.predict([image])[0]
        return prediction, (time.perf_counter() - started) * 1000.0


class ModelHolder:
    """The predictor in service, replaced in one step when a new model is promoted.

    Each request reads `current` once and uses that predictor throughout, so a swap
    during a request never mixes two models in one answer.
    """

    def __init__(self, predictor: Predictor | None = None) -> None:
        self.current: Predictor | None = predictor

    def swap(self, predictor: Predictor) -> None:
        """Put a newly loaded predictor in service."""
        previous = self.current
        self.current = predictor
        logger.info("model in service: %s (was %s)", predictor.version, previous.version if previous else "none")

    def load_production(self, storage, cache_dir: str | Path, models_prefix: str = "models") -> bool:
        """Load the production package from storage if it differs from the one in service."""
        version = production_version(storage, models_prefix)
        if version is None:
            logger.info("no production model in %s yet", storage.uri)
            return False
        if self.current is not None and self.current.version == version:
            return True
        self.swap(Predictor.from_package(fetch_production(storage, cache_dir, models_prefix)))
        return True
