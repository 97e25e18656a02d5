"""Untrusted upload bytes to an 8-bit grayscale image, or a typed DecodeError.

Accepted formats are JPEG, PNG and DICOM, recognised from their magic bytes only (never from a
file name or content type). Other formats PIL could open (BMP, TIFF, WebP, GIF, ...) are refused
on purpose: X-ray exports are JPEG, PNG or DICOM, and every extra parser is extra attack surface.

Conversions to mode "L":
- 8-bit grayscale is returned as stored; colour and palette images use PIL's "L" conversion.
- Alpha is dropped, not composited, so the stored intensities are kept whatever the transparency.
- Images deeper than 8 bits (16-bit PNG, DICOM without a window) are min-max windowed: the
  darkest stored value becomes 0 and the brightest 255, never clipped at 255.
- DICOM: Modality LUT (rescale slope/intercept), then the VOI LUT or window, scaled by the range
  that transform can output (so a window wider than the data keeps its low contrast), then
  MONOCHROME1 is inverted so that bone is bright as in MONOCHROME2. Only the first frame is read.

Resource guards: the upload size, width*height read from the header before any pixel is decoded,
and the inflated size of a deflated DICOM dataset. PIL's and pydicom's global settings are only
read, never changed.
"""

from __future__ import annotations

import io
import logging
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image, ImageFile

if TYPE_CHECKING:
    from pydicom.dataset import Dataset
    from pydicom.uid import UID

# pydicom is imported by the functions that read DICOM: it costs about a second, which sniffing
# (upload-data) and JPEG/PNG uploads need not pay.

logger = logging.getLogger(__name__)

ImageFormat = Literal["jpeg", "png", "dicom"]

ERROR_STATUSES: Mapping[str, int] = MappingProxyType(
    {
        "empty_file": 400,
        "too_large": 413,
        "too_many_pixels": 413,
        "unsupported_format": 415,
        "unsupported_compression": 415,
        "truncated_image": 422,
        "invalid_dicom": 422,
    }
)
"""HTTP status for each DecodeError code, kept here so the API need not repeat the table."""

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_DICOM_MAGIC_OFFSET = 128
_DICOM_MAGIC = b"DICM"
_PIL_FORMAT_NAMES: Mapping[str, str] = MappingProxyType({"jpeg": "JPEG", "png": "PNG"})
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_PIL_LOAD_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, zlib.error)
_INFLATE_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class DecodeLimits:
    """Resource limits for one upload, so a hostile file cannot exhaust memory or time."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 50_000_000
    max_inflated_bytes: int = 100 * 1024 * 1024


class DecodeError(Exception):
    """An upload that cannot be turned into an image, with a stable code and an HTTP status."""

    def __init__(self, code: str, detail: str) -> None:
        if code not in ERROR_STATUSES:
            raise ValueError(f"unknown decode error code {code!r}")
        super().__init__(code, detail)
        self.code = code
        self.detail = detail
        self.status = ERROR_STATUSES[code]

    def __str__(self) -> str:
        return f"{self.code}: {self.detail}"

    @property
    def problem(self) -> str:
        """The detail without its advice to upload again, for files nobody uploaded (training data, CLI inputs)."""
        clauses = re.split(r"(?<=[;.]) ", self.detail.rstrip("."))
        kept = [clause.rstrip(";.") for clause in clauses if "upload" not in clause.lower()]
        return "; ".join(kept) or self.code.replace("_", " ")


def sniff_format(data: bytes) -> ImageFormat | None:
    """Name the format of `data` from its magic bytes alone: "jpeg", "png", "dicom" or None."""
    if data[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + len(_DICOM_MAGIC)] == _DICOM_MAGIC:
        return "dicom"
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(_JPEG_MAGIC):
        return "jpeg"
    return None


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> Image.Image:
    """Decode untrusted upload bytes into a mode "L" image, raising DecodeError when refused."""
    try:
        if not data:
            raise DecodeError("empty_file", "The file is empty; upload an X-ray image.")
        if len(data) > limits.max_bytes:
            raise DecodeError(
                "too_large",
                f"The file is {len(data):,} bytes; the limit is {limits.max_bytes:,} bytes. "
                "Upload a smaller or more compressed image.",
            )
        image_format = sniff_format(data)
        if image_format is None:
            raise DecodeError(
                "unsupported_format",
                "The file is not a JPEG, PNG or DICOM image; upload one of those formats.",
            )
        if image_format == "dicom":
            return _decode_dicom(data, limits)
        return _decode_raster(data, image_format, limits)
    except DecodeError as error:
        logger.debug("refused %d bytes: %s", len(data), error.code)  # the caller reports it, once
        raise


def _decode_raster(data: bytes, image_format: ImageFormat, limits: DecodeLimits) -> Image.Image:
    """Decode a JPEG or PNG, checking the pixel count from the header before reading pixels."""
    name = _PIL_FORMAT_NAMES[image_format]
    try:
        image = Image.open(io.BytesIO(data), formats=[name])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise DecodeError(
            "too_many_pixels",
            "The image header declares far more pixels than this service decodes; "
            "downscale the image and upload it again.",
        ) from error
    except _PIL_LOAD_ERRORS as error:
        raise _truncated_error(name) from error
    _check_pixel_count(image.width, image.height, limits)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        logger.warning("PIL LOAD_TRUNCATED_IMAGES is on elsewhere: truncated uploads pass")
    try:
        image.load()
    except _PIL_LOAD_ERRORS as error:
        raise _truncated_error(name) from error
    return _raster_to_grayscale(image)


def _raster_to_grayscale(image: Image.Image) -> Image.Image:
    """Convert a loaded PIL image of any mode to 8-bit grayscale, windowing deep images."""
    if image.mode == "L":
        return image
    if image.mode in _HIGH_DEPTH_MODES:
        return Image.fromarray(_stretch_to_uint8(np.asarray(image)))
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        image = image.convert("RGBA").convert("RGB")
    try:
        return image.convert("L")
    except ValueError:
        return image.convert("RGB").convert("L")


def _decode_dicom(data: bytes, limits: DecodeLimits) -> Image.Image:
    """Decode the first frame of a DICOM file into display-ready 8-bit grayscale."""
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    _check_inflated_size(data, limits)
    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
    except Exception as error:  # untrusted input: pydicom raises many exception types
        raise DecodeError(
            "invalid_dicom", "The DICOM file could not be read; export it again and re-upload."
        ) from error
    if not any(key in dataset for key in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DecodeError("invalid_dicom", "The DICOM file holds no image (no Pixel Data); upload an image.")
    rows, columns = dataset.get("Rows"), dataset.get("Columns")
    if not isinstance(rows, int) or not isinstance(columns, int) or rows < 1 or columns < 1:
        raise DecodeError("invalid_dicom", "The DICOM file does not state its image size (Rows, Columns).")
    _check_pixel_count(columns, rows, limits)
    frame = _read_first_frame(dataset)
    photometric = str(dataset.get("PhotometricInterpretation", "")).strip().upper()
    if photometric == "PALETTE COLOR":
        frame = apply_color_lut(frame, dataset)
    if frame.ndim == 3:
        colour = frame[..., :3] if frame.dtype == np.uint8 else _stretch_to_uint8(frame[..., :3])
        return Image.fromarray(np.ascontiguousarray(colour)).convert("L")
    if frame.ndim != 2:
        raise DecodeError("invalid_dicom", "The DICOM pixel data has an unexpected shape.")
    gray = _window_to_uint8(apply_modality_lut(frame, dataset), dataset)
    if photometric == "MONOCHROME1":
        gray = 255 - gray
    return Image.fromarray(gray)


def _read_first_frame(dataset: Dataset) -> np.ndarray:
    """Decode only the first frame, mapping missing or failing codecs to unsupported_compression."""
    from pydicom.pixels import get_decoder, pixel_array
    from pydicom.uid import UID

    transfer_syntax = UID(str(dataset.file_meta.get("TransferSyntaxUID", "")))
    described = _describe_transfer_syntax(transfer_syntax)
    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError as error:
        raise DecodeError(
            "unsupported_compression",
            f"The DICOM transfer syntax {described} is not supported; "
            "re-export the image uncompressed (Explicit VR Little Endian).",
        ) from error
    if not decoder.is_available:
        raise DecodeError(
            "unsupported_compression",
            f"No decoder for the DICOM transfer syntax {described} is installed here; "
            "re-export the image uncompressed (Explicit VR Little Endian).",
        )
    try:
        return pixel_array(dataset, index=0)
    except Exception as error:  # untrusted input: decoders raise many exception types
        if transfer_syntax.is_compressed:
            raise DecodeError(
                "unsupported_compression",
                f"The DICOM pixel data compressed as {described} could not be decoded; "
                "re-export the image uncompressed (Explicit VR Little Endian).",
            ) from error
        raise DecodeError(
            "invalid_dicom",
            "The DICOM pixel data does not match its declared size or format; export it again.",
        ) from error


def _describe_transfer_syntax(transfer_syntax: UID) -> str:
    """Name a transfer syntax for a user message: its registered name and UID when known."""
    if not str(transfer_syntax):
        return "(missing)"
    if transfer_syntax.name and transfer_syntax.name != str(transfer_syntax):
        return f"{transfer_syntax.name} ({transfer_syntax})"
    return str(transfer_syntax)


def _window_to_uint8(values: np.ndarray, dataset: Dataset) -> np.ndarray:
    """Apply the VOI LUT or window of `dataset` and scale by its output range; else min-max."""
    from pydicom.pixels import apply_voi, apply_windowing

    try:
        if dataset.get("VOILUTSequence"):
            indices = np.rint(values).astype(np.int64)
            item = dataset.VOILUTSequence[0]
            entry_count, first_value = int(item.LUTDescriptor[0]) or 65536, int(item.LUTDescriptor[1])
            lut_outputs = apply_voi(np.arange(first_value, first_value + entry_count), dataset)
            return _stretch_to_uint8(apply_voi(indices, dataset), float(lut_outputs.min()), float(lut_outputs.max()))
        if "WindowCenter" in dataset and "WindowWidth" in dataset:
            output_bounds = apply_windowing(np.array([-np.inf, np.inf]), dataset)
            return _stretch_to_uint8(apply_windowing(values, dataset), float(output_bounds[0]), float(output_bounds[1]))
    except Exception as error:  # untrusted metadata: a broken VOI falls back to min-max
        logger.info("ignoring unusable DICOM VOI LUT or window: %s", error)
    return _stretch_to_uint8(values)


def _stretch_to_uint8(values: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Map [low, high] (default: the data's min and max) linearly onto 0..255 as uint8."""
    scaled = np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    low = float(scaled.min()) if low is None else low
    high = float(scaled.max()) if high is None else high
    if not np.isfinite(low) or not np.isfinite(high) or high <= low:
        return np.zeros(scaled.shape, dtype=np.uint8)
    scaled -= low
    scaled *= 255.0 / (high - low)
    np.clip(scaled, 0.0, 255.0, out=scaled)
    return np.rint(scaled).astype(np.uint8)


def _check_inflated_size(data: bytes, limits: DecodeLimits) -> None:
    """Refuse a deflated DICOM dataset that would inflate past the limit, before pydicom does."""
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    stream = io.BytesIO(data)
    try:
        read_preamble(stream, False)
        file_meta = _read_file_meta_info(stream)
    except Exception:  # unreadable meta: dcmread reports it as invalid_dicom
        return
    if file_meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pending, inflated_bytes = data[stream.tell() :], 0
    try:
        while pending and not inflater.eof and inflated_bytes <= limits.max_inflated_bytes:
            inflated_bytes += len(inflater.decompress(pending, _INFLATE_CHUNK_BYTES))
            pending = inflater.unconsumed_tail
    except zlib.error as error:
        raise DecodeError("invalid_dicom", "The deflated DICOM dataset is corrupt; export it again.") from error
    if inflated_bytes > limits.max_inflated_bytes:
        raise DecodeError(
            "too_large",
            f"The deflated DICOM dataset expands beyond {limits.max_inflated_bytes:,} bytes; upload a smaller image.",
        )


def _check_pixel_count(width: int, height: int, limits: DecodeLimits) -> None:
    """Refuse images whose header declares more pixels than allowed (decompression bombs)."""
    pixels = width * height
    if pixels > limits.max_pixels:
        raise DecodeError(
            "too_many_pixels",
            f"The image is {width}x{height} ({pixels:,} pixels); the limit is "
            f"{limits.max_pixels:,} pixels. Downscale it and upload again.",
        )


def _truncated_error(format_name: str) -> DecodeError:
    """Build the truncated_image error for a JPEG or PNG whose data ends early or is corrupt."""
    return DecodeError(
        "truncated_image",
        f"The {format_name} file is truncated or corrupt; upload the complete file again.",
    )
