"""The one inference core: a model package in, predictions out (CLI, FastAPI and BentoML use it).

It repeats the training preprocessing exactly (`xray.preprocessing.decode_pixels`, with the decode
path the package records) and applies the package's calibration (temperature and bias) and
threshold, so every caller gets the same probability. Every forward pass of a served model runs on
its micro-batcher's one worker thread (`xray.batching`), whoever asks: concurrent HTTP requests,
the BentoML service and the CLI share batches instead of competing for the CPU.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import sys
import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from xray.batching import BatchOptions, MicroBatcher
from xray.decoding import DecodeLimits
from xray.metrics import sigmoid
from xray.package import ModelCard, check_package, fetch_production, load_package, production_version
from xray.preprocessing import decode_pixels, normalise_array, resize_image
from xray.runtime import Forward, TorchForward, load_forward
from xray.settings import Settings

if TYPE_CHECKING:
    import torch

# torch and the model factory are imported where a model runs, not here: the API and the CLI import
# this module at start, and `import torch` alone costs seconds there (a server answers /health sooner).

logger = logging.getLogger(__name__)

# Measured on 2 CPU cores (README, "Serving predictions"): channels-last convolutions run 1.3 to
# 4 times faster than the default layout, and EfficientNet's depthwise convolutions slow
# down past about 16 images a batch, so larger requests are scored 16 at a time.
DEFAULT_BATCH_SIZE = 16


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def serving_threads(settings: Settings) -> tuple[int, int]:
    """(forward-pass intra-op threads, concurrent decodes) for serving: each setting, or derived from the usable cores.

    One batcher worker runs one forward pass at a time on half the cores, and up to one decode per
    core runs beside it: the forward pass and the decodes overlap instead of taking turns, and no
    more threads are busy than a core or two can carry. Measured on 2 shared cores (README,
    "Serving predictions"): torch's OpenMP threads spin at each barrier, so a forward pass on both
    cores ran 7 to 16 times slower than on one whenever other work wanted the same cores.
    """
    cores = usable_cores()
    return settings.torch_threads or max(1, cores // 2), settings.decode_workers or cores


def batch_options(settings: Settings) -> BatchOptions:
    """The micro-batcher's sizes from the deployment settings."""
    return BatchOptions(max_batch=settings.batch_size, max_wait_ms=settings.batch_wait_ms,
                        max_queued=settings.max_queued_images)  # fmt: skip


def use_serving_threads(settings: Settings) -> None:
    """Set torch's intra-op thread count for a serving process (`serving_threads`), logging a change.

    Before torch is imported (a server running ONNX Runtime may never import it) the count goes into
    OMP_NUM_THREADS, which torch reads when it loads.
    """
    threads = serving_threads(settings)[0]
    if "torch" not in sys.modules:  # ONNX Runtime may serve without it: torch takes the count when it loads
        os.environ["OMP_NUM_THREADS"] = str(threads)
        return
    import torch

    if torch.get_num_threads() != threads:
        logger.info("torch intra-op threads: %d (was %d)", threads, torch.get_num_threads())
        torch.set_num_threads(threads)


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
    """A loaded model with its card; thread-safe: every forward pass runs on its batcher's one worker."""

    def __init__(self, model: torch.nn.Module | None, card: ModelCard, batch_size: int = DEFAULT_BATCH_SIZE,
                 options: BatchOptions | None = None, forward: Forward | None = None,
                 package_dir: str | Path | None = None) -> None:  # fmt: skip
        if model is None and package_dir is None:
            raise ValueError("a Predictor needs a model or the package folder to load it from")
        self._model = model
        self.package_dir = Path(package_dir) if package_dir is not None else None
        self._model_lock = threading.Lock()
        self.forward = forward or TorchForward(self.model)  # scores every batch
        self.card = card
        self.preprocessing = card.preprocessing_spec
        self.batch_size = batch_size
        self.lock = threading.Lock()  # one user of the torch model at a time (torch forward, Grad-CAM)
        # The batcher holds its score function weakly: no reference cycle, so a swapped-out predictor
        # is freed by reference counting alone, even from a frozen heap (`freeze_heap`).
        score = weakref.WeakMethod(self.forward_probabilities)
        self.batcher = MicroBatcher(lambda pixels: score()(pixels), options or BatchOptions(max_batch=batch_size),
                                    name=f"xray-batcher-{card.version}")  # fmt: skip

    @property
    def model(self) -> torch.nn.Module:
        """The torch model (Grad-CAM, site calibration): loaded from the package on first use when ONNX scores.

        A server running ONNX Runtime never imports torch until /explain asks for a heatmap: torch alone
        is over half a GiB of resident memory.
        """
        if self._model is None:
            with self._model_lock:
                if self._model is None:
                    import torch

                    model, _ = load_package(self.package_dir)
                    self._model = model.eval().to(memory_format=torch.channels_last)
        return self._model

    @classmethod
    def from_package(cls, directory: str | Path, batch_size: int | None = None,
                     settings: Settings | None = None, threads: int | None = None) -> Predictor:  # fmt: skip
        """Load a package folder written by the pusher, with the micro-batcher sizes of `settings`.

        ONNX Runtime runs the forward pass on `threads` (default: the serving count, `serving_threads`).
        Torch's thread count is process-wide, so servers set it (`use_serving_threads`), not this: the
        pipeline's evaluation loads packages too.
        """
        settings = settings or Settings.from_environment()
        card = check_package(directory)
        threads = threads or serving_threads(settings)[0]
        forward = load_forward(settings.inference_runtime, directory, lambda: load_package(directory)[0], threads)
        logger.info("loaded model %s (%s) from %s; forward pass in %s", card.version, card.architecture, directory,
                    forward.name)  # fmt: skip
        options = batch_options(settings)
        if batch_size is not None:
            options = BatchOptions(batch_size, options.max_wait_ms, options.max_queued, options.idle_exit_s)
        model = forward.model if isinstance(forward, TorchForward) else None
        predictor = cls(model, card, options.max_batch, options, forward, package_dir=directory)
        predictor.warm_up()
        return predictor

    def warm_up(self) -> None:
        """One forward pass on a blank image, so the first real request does not pay torch's set-up (0.5 s here)."""
        size = self.preprocessing.image_size
        self.forward_probabilities(np.zeros((1, size, size), dtype=np.uint8))

    @property
    def version(self) -> str:
        return self.card.version

    def decode(self, data: bytes, limits: DecodeLimits | None = None) -> np.ndarray:
        """Upload bytes to the model-size uint8 pixels, by the decode path this model was trained with."""
        return decode_pixels(data, self.preprocessing.image_size, limits, self.preprocessing.decode)

    def prepare(self, image: Image.Image) -> np.ndarray:
        """An already decoded image's model-size pixels (tests, in-memory images; uploads go through `decode`)."""
        return resize_image(image, self.preprocessing.image_size)

    def forward_probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """P(PNEUMONIA) for uint8 N x H x W pixels, computed here and now (the batcher's worker calls this)."""
        if len(pixels) == 0:
            return np.empty(0)
        logits = []
        for start in range(0, len(pixels), self.batch_size):
            inputs = normalise_array(pixels[start : start + self.batch_size], self.preprocessing)
            if self.forward.name == "torch":
                with self.lock:
                    logits.append(self.forward(inputs))
            else:  # ONNX Runtime holds its own copy of the weights: Grad-CAM may use the torch model meanwhile
                logits.append(self.forward(inputs))
        return self.calibrated(np.concatenate(logits))

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """P(PNEUMONIA) for uint8 N x H x W pixels, through the batcher (waits for room rather than failing)."""
        return self.batcher.score_now(pixels)

    def submit(self, pixels: np.ndarray) -> Future:
        """Queue N x H x W pixels for the batcher; raises batching.QueueFullError when the queue is full."""
        return self.batcher.submit(pixels)

    async def predict_pixels_async(self, pixels: list[np.ndarray]) -> list[Prediction]:
        """Predictions for model-size pixels from an event loop, through the batcher (QueueFullError when full)."""
        if not pixels:
            return []
        probabilities = await asyncio.wrap_future(self.submit(np.stack(pixels)))
        return [self.to_prediction(probability) for probability in probabilities]

    def calibrated(self, logits: np.ndarray | torch.Tensor) -> np.ndarray:
        """P(PNEUMONIA) from raw logits with the package's temperature and bias, as evaluation computed it."""
        if hasattr(logits, "detach"):  # a torch tensor (Grad-CAM's logit)
            logits = logits.detach().double().numpy()
        return sigmoid(np.asarray(logits, dtype=np.float64), self.card.temperature, self.card.bias)

    def threshold_logit(self) -> float:
        """The raw logit whose calibrated probability is the package's threshold."""
        threshold = min(max(self.card.threshold, 1e-6), 1 - 1e-6)
        return self.card.temperature * (math.log(threshold / (1 - threshold)) - self.card.bias)

    def to_prediction(self, probability: float) -> Prediction:
        """Label one probability with the package's threshold; the card lists the classes in label order."""
        negative_class, positive_class = self.card.classes
        positive = float(probability)
        return Prediction(
            label=positive_class if positive >= self.card.threshold else negative_class,
            probability=round(positive, 6),
            threshold=self.card.threshold,
            probabilities={negative_class: round(1.0 - positive, 6), positive_class: round(positive, 6)},
            model_version=self.card.version,
        )

    def predict_pixels(self, pixels: list[np.ndarray]) -> list[Prediction]:
        """Predictions for model-size pixels, through the batcher."""
        if not pixels:
            return []
        return [self.to_prediction(probability) for probability in self.probabilities(np.stack(pixels))]

    def predict(self, images: list[Image.Image]) -> list[Prediction]:
        """Predictions for already decoded images, batched."""
        return self.predict_pixels([self.prepare(image) for image in images])

    def predict_one(self, image: Image.Image) -> tuple[Prediction, float]:
        """One prediction and the milliseconds it took."""
        started = time.perf_counter()
        prediction = self.predict([image])[0]
        return prediction, (time.perf_counter() - started) * 1000.0


def freeze_heap() -> None:
    """Collect garbage once, then move every object alive (imports, the model in service) out of the collector's reach.

    Under load a serving process allocates fast, and each full collection walked the whole heap of
    torch, BentoML and the model: 240 to 370 ms pauses of the event loop, four in 30 s at 32 clients,
    which set the p99 latency (README, "Serving predictions"). Runs at each model swap (rare): frozen
    objects are still freed by reference counting, and a swapped-out predictor holds no reference
    cycle (its batcher's score is weak), so it is freed once its last request is answered.
    """
    gc.collect()
    gc.freeze()


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
        freeze_heap()
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
