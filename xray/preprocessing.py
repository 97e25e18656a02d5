"""The one definition of how an X-ray becomes a model input, shared by training and serving.

Training caches `decode_pixels` output once; serving, evaluation and the CLI call the same
function, so a served prediction sees exactly what the model saw in training. The decode path is
part of the definition and recorded in every model card (`Preprocessing.decode`):

- "jpeg-draft-2x" (cards written since): a JPEG is decoded by libjpeg's DCT scaling at the
  smallest scale that keeps both sides at least twice the model size (and straight to
  grayscale), then resized bilinearly to the model size; PNG and DICOM are decoded in full,
  then resized the same way. About twice as fast as a full decode, and the full-size image never
  exists.
- "full" (cards written before the field existed): every image decoded at full size first.

Either way the image is shrunk to model size right after decoding and only those pixels are kept.
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
DECODE_FULL = "full"
DECODE_JPEG_DRAFT = "jpeg-draft-2x"
DECODE_PATHS = (DECODE_FULL, DECODE_JPEG_DRAFT)
DRAFT_FACTOR = 2


@dataclass(frozen=True)
class Preprocessing:
    """Size, channel count and normalisation, recorded in every model package."""

    image_size: int
    mean: float
    std: float
    channels: int = 1
    color: str = "grayscale"
    resize: str = "bilinear"
    decode: str = DECODE_JPEG_DRAFT

    def __post_init__(self) -> None:
        if self.decode not in DECODE_PATHS:
            raise ValueError(f"unknown decode path {self.decode!r}; expected one of {', '.join(DECODE_PATHS)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for model cards."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Preprocessing:
        """Rebuild from a model card entry; a card without `decode` predates it and decoded in full."""
        return cls(**{"decode": DECODE_FULL, **raw})


def resize_image(image: Image.Image, image_size: int) -> np.ndarray:
    """Grayscale, square-resize (aspect not kept, as in the training data) to uint8 H x W."""
    grayscale = image if image.mode == "L" else image.convert("L")
    return np.array(grayscale.resize((image_size, image_size), RESAMPLING), dtype=np.uint8)


def decode_pixels(data: bytes, image_size: int, limits: DecodeLimits | None = None,
                  decode: str = DECODE_JPEG_DRAFT) -> np.ndarray:  # fmt: skip
    """File bytes to the uint8 H x W pixels the model sees: the one decode path of training and serving.

    Raises only xray.decoding.DecodeError. `decode` is the model card's decode path (module docstring).
    """
    if decode not in DECODE_PATHS:
        raise ValueError(f"unknown decode path {decode!r}")
    draft_size = image_size * DRAFT_FACTOR if decode == DECODE_JPEG_DRAFT else None
    return resize_image(decode_image(data, limits or DecodeLimits(), draft_size), image_size)


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
