"""The one definition of how an X-ray becomes a model input, shared by training and serving.

Training caches `decode_pixels` output once; serving, evaluation and the CLI call the same
function, so a served prediction sees exactly what the model saw in training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from xray.decoding import DecodeLimits, decode_image

if TYPE_CHECKING:
    import torch

RESAMPLING = Image.Resampling.BILINEAR


@dataclass(frozen=True)
class Preprocessing:
    """Size, channel count and normalisation, recorded in every model package."""

    image_size: int
    mean: float
    std: float
    channels: int = 1
    color: str = "grayscale"
    resize: str = "bilinear"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for model cards."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Preprocessing:
        """Rebuild from a model card entry."""
        return cls(**raw)


def resize_image(image: Image.Image, image_size: int) -> np.ndarray:
    """Grayscale, square-resize (aspect not kept, as in the training data) to uint8 H x W."""
    grayscale = image if image.mode == "L" else image.convert("L")
    return np.array(grayscale.resize((image_size, image_size), RESAMPLING), dtype=np.uint8)


def decode_pixels(data: bytes, image_size: int, limits: DecodeLimits | None = None) -> np.ndarray:
    """File bytes to the uint8 H x W pixels the model sees: the one decode path of training and serving."""
    return resize_image(decode_image(data, limits or DecodeLimits()), image_size)


def normalise(pixels: np.ndarray | torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """uint8 pixels (H x W or N x H x W) to a normalised float tensor N x C x H x W."""
    import torch  # here, not at the top: resizing (the API, the CLI, the training cache) needs no torch

    tensor = torch.as_tensor(pixels)
    if tensor.dim() == 2:
        tensor = tensor.unsqueeze(0)
    tensor = tensor.unsqueeze(1).float().div_(255.0)
    tensor = tensor.sub_(preprocessing.mean).div_(preprocessing.std)
    if preprocessing.channels > 1:
        tensor = tensor.expand(-1, preprocessing.channels, -1, -1)
    return tensor


def preprocess(image: Image.Image, preprocessing: Preprocessing) -> torch.Tensor:
    """One image to a 1 x C x H x W model input, exactly as in training."""
    return normalise(resize_image(image, preprocessing.image_size), preprocessing)
