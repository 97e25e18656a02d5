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
from typing import TYPE_CHECKING, Any, get_args

import numpy as np
from PIL import Image, ImageFilter

from xray.config import Intensity
from xray.decoding import DecodeLimits, decode_image

if TYPE_CHECKING:
    import torch

RESAMPLING = Image.Resampling.BILINEAR
DECODE_FULL = "full"
DECODE_JPEG_DRAFT = "jpeg-draft-2x"
DECODE_PATHS = (DECODE_FULL, DECODE_JPEG_DRAFT)
DRAFT_FACTOR = 2


# The fine-detail band, as a fraction of the image side: structures below it (ribs, vessels, edges) are what a
# scanner's edge enhancement boosts; the robustness suite's `detail` change and augmentation scale it.
DETAIL_SCALE = 0.025
INTENSITY_METHODS: tuple[str, ...] = get_args(Intensity)
# The grey-level mappings each method feeds the model, one input channel each.
INTENSITY_WINDOWS = {"equalize_with_raw": ("equalize", "none")}
PERCENTILE_WINDOW = (1.0, 99.0)


@dataclass(frozen=True)
class Preprocessing:
    """Size, channel count and normalisation, recorded in every model package.

    `intensity` maps each image's grey levels before standardising, the same in training and
    serving: "percentile" stretches its 1st-99th percentile window to 0-255, "equalize" flattens
    its histogram; both undo a scanner's contrast and display curve. "equalize_with_raw" feeds
    the equalised image and the image as decoded as two input channels, so the model keeps the
    overall grey levels that equalisation takes away. `border_mask` blanks that
    fraction of the image on every side, where collimation edges and burnt-in labels sit.
    """

    image_size: int
    mean: float
    std: float
    channels: int = 1
    color: str = "grayscale"
    resize: str = "bilinear"
    decode: str = DECODE_JPEG_DRAFT
    intensity: str = "none"
    border_mask: float = 0.0

    def __post_init__(self) -> None:
        if self.decode not in DECODE_PATHS:
            raise ValueError(f"unknown decode path {self.decode!r}; expected one of {', '.join(DECODE_PATHS)}")
        if self.channels != 1 and len(intensity_windows(self.intensity)) > 1:
            raise ValueError(f"intensity {self.intensity!r} makes its own input channels; channels must be 1")

    @property
    def input_channels(self) -> int:
        """Channels of the model's stem: one per grey-level mapping (`INTENSITY_WINDOWS`)."""
        return len(intensity_windows(self.intensity))

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


def scale_detail(pixels: np.ndarray, gain: float) -> np.ndarray:
    """uint8 pixels (H x W or N x H x W) with their fine detail (each image less its Gaussian blur at DETAIL_SCALE
    of the side) scaled by `gain`: another scanner's edge enhancement, for the robustness suite and augmentation."""
    batch = np.asarray(pixels, dtype=np.uint8).reshape(-1, *np.shape(pixels)[-2:])
    radius = DETAIL_SCALE * batch.shape[-1]
    smooth = np.stack([np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))
                       for image in batch]).astype(np.float32)  # fmt: skip
    scaled = smooth + gain * (batch.astype(np.float32) - smooth)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8).reshape(np.shape(pixels))


def decode_pixels(data: bytes, image_size: int, limits: DecodeLimits | None = None,
                  decode: str = DECODE_JPEG_DRAFT) -> np.ndarray:  # fmt: skip
    """File bytes to the uint8 H x W pixels the model sees: the one decode path of training and serving.

    Raises only xray.decoding.DecodeError. `decode` is the model card's decode path (module docstring).
    """
    if decode not in DECODE_PATHS:
        raise ValueError(f"unknown decode path {decode!r}")
    draft_size = image_size * DRAFT_FACTOR if decode == DECODE_JPEG_DRAFT else None
    return resize_image(decode_image(data, limits or DecodeLimits(), draft_size), image_size)


def intensity_windows(method: str) -> tuple[str, ...]:
    """The single-image mappings an intensity method stacks as input channels, in channel order."""
    return INTENSITY_WINDOWS.get(method, (method,))


def normalise_intensity(pixels: np.ndarray, method: str) -> np.ndarray:
    """uint8 pixels (H x W or N x H x W) with each image's grey levels mapped by `method` (a pure function)."""
    if method == "none":
        return pixels
    batch = np.asarray(pixels, dtype=np.uint8).reshape(-1, *np.shape(pixels)[-2:])
    flat = batch.reshape(len(batch), -1)
    if method == "percentile":
        low, high = np.percentile(flat, PERCENTILE_WINDOW, axis=1)
        scale = 255.0 / np.maximum(high - low, 1.0)
        mapped = np.clip((flat - low[:, None]) * scale[:, None], 0, 255)
    elif method == "equalize":
        offsets = flat.astype(np.int64) + 256 * np.arange(len(flat))[:, None]
        histograms = np.bincount(offsets.ravel(), minlength=256 * len(flat)).reshape(len(flat), 256)
        cumulative = np.cumsum(histograms, axis=1) / flat.shape[1]
        lowest = np.take_along_axis(cumulative, flat.min(axis=1, keepdims=True).astype(np.int64), axis=1)
        tables = 255.0 * np.clip((cumulative - lowest) / np.maximum(1.0 - lowest, 1e-9), 0, 1)
        mapped = np.take_along_axis(tables, flat.astype(np.int64), axis=1)
    else:
        raise ValueError(f"unknown intensity normalisation {method!r}; choose one of {', '.join(INTENSITY_METHODS)}")
    return np.rint(mapped).astype(np.uint8).reshape(np.shape(pixels))


def normalise_array(pixels: np.ndarray, preprocessing: Preprocessing, expand: bool = True) -> np.ndarray:
    """uint8 pixels (H x W or N x H x W) to normalised float32 N x C x H x W (C = `input_channels` unless `expand`).

    The one definition of the model's input: training reaches it through `normalise` (a tensor view
    of this), serving with ONNX Runtime uses it directly and never imports torch.
    """
    pixels = np.asarray(pixels)
    if pixels.ndim == 2:
        pixels = pixels[None]
    windows = intensity_windows(preprocessing.intensity)
    array = np.empty((len(pixels), len(windows), *pixels.shape[-2:]), dtype=np.float32)
    for channel, window in enumerate(windows):  # written in place: no stacked copy on the serving path
        array[:, channel] = normalise_intensity(pixels, window)
    array /= np.float32(255.0)
    array -= np.float32(preprocessing.mean)
    array /= np.float32(preprocessing.std)
    if preprocessing.border_mask > 0:
        rows, columns = (round(side * preprocessing.border_mask) for side in array.shape[-2:])
        inside = array[..., rows : array.shape[-2] - rows, columns : array.shape[-1] - columns].copy()
        array[:] = 0.0  # the training mean: no signal
        array[..., rows : array.shape[-2] - rows, columns : array.shape[-1] - columns] = inside
    if expand and preprocessing.channels > 1:
        array = np.ascontiguousarray(np.broadcast_to(array, (len(array), preprocessing.channels, *array.shape[-2:])))
    return array


def normalise(pixels: np.ndarray | torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """uint8 pixels (H x W or N x H x W) to a normalised float tensor N x C x H x W (`normalise_array`)."""
    import torch  # here, not at the top: resizing (the API, the CLI, the training cache) needs no torch

    if isinstance(pixels, torch.Tensor):
        pixels = pixels.numpy()
    tensor = torch.from_numpy(normalise_array(pixels, preprocessing, expand=False))
    if preprocessing.channels > 1:
        tensor = tensor.expand(-1, preprocessing.channels, -1, -1)
    return tensor


def preprocess(image: Image.Image, preprocessing: Preprocessing) -> torch.Tensor:
    """One image to a 1 x C x H x W model input, exactly as in training."""
    return normalise(resize_image(image, preprocessing.image_size), preprocessing)
