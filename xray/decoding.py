"""Untrusted upload bytes to an 8-bit grayscale image, or a typed DecodeError.

Accepted formats are JPEG, PNG and DICOM, recognised from their magic bytes only (never from a
file name or content type). Other formats PIL could open (BMP, TIFF, WebP, GIF, ...) are refused
on purpose: X-ray exports are JPEG, PNG or DICOM, and every extra parser is extra attack surface.

Conversions to mode "L":
- 8-bit grayscale is returned as stored; colour and palette images use PIL's "L" conversion.
- A JPEG or PNG is turned upright as its EXIF orientation says, as every viewer shows it.
- Alpha is dropped, not composited, so the stored intensities are kept whatever the transparency.
- Images deeper than 8 bits (16-bit PNG, DICOM without a window) are min-max windowed: the
  darkest stored value becomes 0 and the brightest 255, never clipped at 255.
- DICOM: Modality LUT (rescale slope/intercept), then the VOI LUT or window, scaled by the range
  that transform can output (so a window wider than the data keeps its low contrast), then
  MONOCHROME1 is inverted so that bone is bright as in MONOCHROME2. Only the first frame is read.

Resource guards: the upload size, width*height read from the header before any pixel is decoded,
the inflated size of a deflated DICOM dataset, and the size of a compressed DICOM frame read from
its own codestream header (which may disagree with the DICOM's Rows and Columns) before the codec
runs. Deep images are windowed a block of rows at a time, so no full-size float copy exists.
`draft_size` lets a JPEG decode straight to a reduced size (libjpeg's DCT scaling) when the caller
shrinks the image anyway. Any other exception raised while decoding untrusted bytes becomes a
DecodeError too: callers handle exactly one exception type. PIL's and pydicom's global settings
are only read, never changed.
"""

from __future__ import annotations

import io
import logging
import re
import struct
import zlib
from collections.abc import Mapping, Sequence
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
        "too_many_scans": 413,
        "unsupported_format": 415,
        "unsupported_compression": 415,
        "truncated_image": 422,
        "invalid_dicom": 422,
        "undecodable_image": 422,
        "implausible_shape": 422,
        "blank_image": 422,
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
_STRETCH_BLOCK_PIXELS = 1 << 20
# JPEG start-of-frame markers (baseline, extended, progressive, lossless, arithmetic; JPEG-LS SOF55)
_JPEG_FRAME_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})
_JPEG2000_CODESTREAM = b"\xff\x4f\xff\x51"
_EXIF_ORIENTATION = 0x0112
_EXIF_TRANSPOSE: Mapping[int, Image.Transpose] = MappingProxyType({
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
})  # fmt: skip  (as PIL's ImageOps.exif_transpose reads them)
_JPEG_START_OF_SCAN = b"\xff\xda"  # in entropy-coded data a 0xFF byte is always stuffed, so this marks a scan
# A progressive JPEG is written in about 10 scans; each scan is a pass over the whole image, so a file repeating
# one tiny scan thousands of times (a "scan bomb") holds a decoder for minutes.
MAX_JPEG_SCANS = 100
# A chest X-ray is never much longer than wide; a 1 x 25,000,000 PNG costs PIL hundreds of MiB in row pointers.
MAX_ASPECT_RATIO = 10
# libjpeg fills what a truncated sequential JPEG no longer holds with flat mid-grey: a file cut short and given a
# new end marker decodes without an error, its lower part one grey level.
JPEG_TRUNCATION_FILL = 128
TRUNCATION_FILL_SHARE = 0.03  # of the rows, at the bottom, all that fill: real X-rays had none (5,232 checked)


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


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits(), draft_size: int | None = None) -> Image.Image:
    """Decode untrusted upload bytes into a mode "L" image, raising DecodeError (and only that) when refused.

    With `draft_size`, a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both
    sides at least `draft_size` pixels, which is several times faster and smaller for a caller that
    shrinks the image right away. Other formats ignore it.
    """
    try:
        if not data:
            raise DecodeError("empty_file", "The file is empty; upload an X-ray image.")
        if len(data) > limits.max_bytes:
            raise too_large_error(len(data), limits.max_bytes)
        image_format = sniff_format(data)
        if image_format is None:
            raise DecodeError(
                "unsupported_format",
                "The file is not a JPEG, PNG or DICOM image; upload one of those formats.",
            )
        if image_format == "dicom":
            return _decode_dicom(data, limits)
        return _decode_raster(data, image_format, limits, draft_size)
    except DecodeError as error:
        logger.debug("refused %d bytes: %s", len(data), error.code)  # the caller reports it, once
        raise
    except MemoryError as error:
        logger.warning("out of memory decoding an upload of %d bytes", len(data))
        raise DecodeError("too_many_pixels", "The image needs more memory to decode than this service has; "
                                             "downscale it and upload again.") from error  # fmt: skip
    except Exception as error:  # untrusted input: any other failure is the file's, never a crash
        logger.info("upload of %d bytes failed to decode: %r", len(data), error)
        raise DecodeError("undecodable_image", "The image could not be decoded; export it again as a standard "
                                               "JPEG, PNG or DICOM and re-upload.") from error  # fmt: skip


def too_large_error(size: int | None, limit: int) -> DecodeError:
    """The too_large error for an upload of `size` bytes (None: unknown, only that it passed the limit)."""
    stated = f"The file is {size:,} bytes" if size is not None else f"The file is larger than {limit:,} bytes"
    return DecodeError("too_large", f"{stated}; the limit is {limit:,} bytes. Upload a smaller or more compressed "
                                    "image.")  # fmt: skip


def _decode_raster(data: bytes, image_format: ImageFormat, limits: DecodeLimits, draft_size: int | None) -> Image.Image:
    """Decode a JPEG or PNG, checking the pixel count from the header before reading pixels."""
    name = _PIL_FORMAT_NAMES[image_format]
    if image_format == "jpeg":
        _check_scan_count(data)
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
    if draft_size is not None and image_format == "jpeg":
        image.draft("L", (draft_size, draft_size))
    try:
        image.load()
    except _PIL_LOAD_ERRORS as error:
        raise _truncated_error(name) from error
    gray = _raster_to_grayscale(image)
    _check_content(gray)
    if image_format == "jpeg":  # as stored, before any turn: libjpeg's fill is at the bottom of the stored image
        _check_truncation_fill(gray)
    return _upright(gray, image)


def _upright(gray: Image.Image, source: Image.Image) -> Image.Image:
    """`gray` turned as the source's EXIF orientation says, as every viewer shows it (phone photos of X-rays)."""
    if "exif" not in source.info:  # parsing an absent EXIF still costs a tenth of the decode
        return gray
    try:
        orientation = source.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # untrusted metadata: unreadable EXIF leaves the image as stored
        return gray
    method = _EXIF_TRANSPOSE.get(orientation)
    return gray if method is None else gray.transpose(method)


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
    transfer_syntax = _transfer_syntax(dataset)
    _check_native_length(dataset, transfer_syntax, columns, rows)
    _check_embedded_frame(dataset, transfer_syntax, columns, rows, limits)
    frame = _read_first_frame(dataset, transfer_syntax)
    photometric = str(dataset.get("PhotometricInterpretation", "")).strip().upper()
    try:
        if photometric == "PALETTE COLOR":
            frame = apply_color_lut(frame, dataset)
        if frame.ndim == 3:
            colour = frame[..., :3] if frame.dtype == np.uint8 else _stretch_to_uint8(frame[..., :3])
            image = Image.fromarray(np.ascontiguousarray(colour)).convert("L")
            _check_content(image)
            return image
        if frame.ndim != 2:
            raise DecodeError("invalid_dicom", "The DICOM pixel data has an unexpected shape.")
        gray = _window_to_uint8(apply_modality_lut(frame, dataset), dataset)
    except (DecodeError, MemoryError):
        raise
    except Exception as error:  # untrusted metadata: broken lookup tables and the like
        raise DecodeError("invalid_dicom", f"The DICOM file's {photometric or 'pixel'} lookup tables cannot be "
                                           "applied (missing or malformed); export it again.") from error  # fmt: skip
    if photometric == "MONOCHROME1":
        gray = 255 - gray
    image = Image.fromarray(gray)
    _check_content(image, "; for a DICOM, its rescale or window may leave no contrast")
    return image


def _transfer_syntax(dataset: Dataset) -> UID:
    """The dataset's transfer syntax; unsupported_compression when its UID names none (nothing could decode it)."""
    from pydicom.uid import UID

    transfer_syntax = UID(str(dataset.file_meta.get("TransferSyntaxUID", "")))
    if not transfer_syntax.is_transfer_syntax:
        described = _describe_transfer_syntax(transfer_syntax)
        raise DecodeError("unsupported_compression", f"The DICOM transfer syntax {described} is not one this service "
                                                     "knows; re-export the image uncompressed (Explicit VR Little "
                                                     "Endian).")  # fmt: skip
    return transfer_syntax


def _check_embedded_frame(dataset: Dataset, transfer_syntax: UID, columns: int, rows: int,
                          limits: DecodeLimits) -> None:  # fmt: skip
    """Refuse a compressed frame whose own header states another size than Rows x Columns, before decoding it.

    A codec decodes what its codestream says, whatever the DICOM header declares: an 8x8 DICOM
    can carry a 3000x3000 JPEG. JPEG, JPEG-LS and JPEG 2000 frames state their size up front.
    """
    from pydicom.encaps import get_frame

    if not transfer_syntax.is_encapsulated:
        return
    try:
        frame = bytes(get_frame(dataset.PixelData, 0, number_of_frames=_frame_count(dataset)))
    except Exception as error:  # untrusted encapsulation
        raise DecodeError("invalid_dicom", "The DICOM's compressed pixel data is malformed; export it again.") \
            from error
    if frame.startswith(b"\xff\xd8"):
        _check_scan_count(frame)
    size = _codestream_size(frame)
    if size is None:
        if transfer_syntax.is_compressed and "RLE" not in (transfer_syntax.name or ""):
            raise DecodeError("unsupported_compression", f"The DICOM pixel data compressed as "
                                                         f"{_describe_transfer_syntax(transfer_syntax)} could not be "
                                                         "decoded (no readable frame header); re-export the image "
                                                         "uncompressed (Explicit VR Little Endian).")  # fmt: skip
        return
    width, height = size
    _check_pixel_count(width, height, limits)
    if (width, height) != (columns, rows):
        raise DecodeError("invalid_dicom", f"The DICOM's compressed frame is {width}x{height} pixels but its header "
                                           f"declares {columns}x{rows}; export it again.")  # fmt: skip


def _codestream_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) stated by a JPEG, JPEG-LS or JPEG 2000 codestream's header, or None when there is none."""
    if head.startswith(b"\xff\xd8"):
        position = 2
        while position + 9 <= len(head):
            if head[position] != 0xFF:
                return None
            marker = head[position + 1]
            if marker == 0xFF:  # fill byte
                position += 1
                continue
            if marker in _JPEG_FRAME_MARKERS:
                height, width = struct.unpack(">HH", head[position + 5 : position + 9])
                return width, height
            if marker == 0x01 or 0xD0 <= marker <= 0xD7:
                position += 2
                continue
            (length,) = struct.unpack(">H", head[position + 2 : position + 4])
            position += 2 + length
        return None
    start = head.find(_JPEG2000_CODESTREAM)
    if start >= 0 and start + 24 <= len(head):
        xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", head[start + 8 : start + 24])
        return xsiz - xosiz, ysiz - yosiz
    return None


def _read_first_frame(dataset: Dataset, transfer_syntax: UID) -> np.ndarray:
    """Decode only the first frame, mapping missing or failing codecs to unsupported_compression."""
    from pydicom.pixels import get_decoder, pixel_array

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
        if "WindowCenter" in dataset and "WindowWidth" in dataset and _finite_window(dataset):
            output_bounds = apply_windowing(np.array([-np.inf, np.inf]), dataset)
            return _stretch_to_uint8(apply_windowing(values, dataset), float(output_bounds[0]), float(output_bounds[1]))
    except Exception as error:  # untrusted metadata: a broken VOI falls back to min-max
        logger.info("ignoring unusable DICOM VOI LUT or window: %s", error)
    return _stretch_to_uint8(values)


def _stretch_to_uint8(values: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Map [low, high] (default: the data's min and max) linearly onto 0..255 as uint8.

    NaN and infinities count as 0. Works a block of rows at a time, so a large deep image never
    has a full-size float32 copy (a 7000x7000 16-bit PNG needed 766 MiB more at once).
    """
    values = np.asarray(values)
    rows = values.reshape(values.shape[0], -1) if values.ndim > 1 else values.reshape(1, -1)
    step = max(1, _STRETCH_BLOCK_PIXELS // max(1, rows.shape[1]))
    blocks = range(0, rows.shape[0], step)

    def cleaned(start: int) -> np.ndarray:
        block = np.asarray(rows[start : start + step], dtype=np.float32)
        return np.nan_to_num(block, nan=0.0, posinf=0.0, neginf=0.0)

    if low is None or high is None:
        extremes = [(float(block.min()), float(block.max())) for block in map(cleaned, blocks)]
        low = min(pair[0] for pair in extremes) if low is None else low
        high = max(pair[1] for pair in extremes) if high is None else high
    output = np.zeros(rows.shape, dtype=np.uint8)
    if not np.isfinite(low) or not np.isfinite(high) or high <= low:
        return output.reshape(values.shape)
    for start in blocks:
        scaled = cleaned(start)
        scaled -= low
        scaled *= 255.0 / (high - low)
        np.clip(scaled, 0.0, 255.0, out=scaled)
        output[start : start + step] = np.rint(scaled)
    return output.reshape(values.shape)


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
    """Refuse images whose header declares more pixels than allowed (decompression bombs), or no X-ray's shape."""
    pixels = width * height
    if pixels > limits.max_pixels:
        raise DecodeError(
            "too_many_pixels",
            f"The image is {width}x{height} ({pixels:,} pixels); the limit is "
            f"{limits.max_pixels:,} pixels. Downscale it and upload again.",
        )
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise DecodeError(
            "implausible_shape",
            f"The image is {width}x{height} pixels, over {MAX_ASPECT_RATIO} times longer than wide: not a chest "
            "X-ray. Upload the X-ray itself.",
        )


def _check_scan_count(data: bytes) -> None:
    """Refuse a JPEG of more than MAX_JPEG_SCANS scans before any is decoded (a progressive "scan bomb").

    Every JPEG is counted, whatever its headers claim (libjpeg reads past junk a header walk would stop at): a
    sequential one holds at most four scans. Counted with numpy, 0.07 ms for a 190 KB file.
    """
    scans = _count_scans(data)
    if scans > MAX_JPEG_SCANS:
        raise DecodeError(
            "too_many_scans",
            f"The JPEG holds {scans:,} scans; the limit is {MAX_JPEG_SCANS} (a progressive export writes about 10). "
            "Export it again as a standard JPEG and upload that.",
        )


def _count_scans(data: bytes) -> int:
    """Start-of-scan markers in a JPEG: 0xFF 0xDA pairs (entropy-coded data stuffs every 0xFF, so none hide there)."""
    octets = np.frombuffer(data, np.uint8)
    markers = np.flatnonzero(octets[:-1] == 0xFF)
    return int(np.count_nonzero(octets[markers + 1] == _JPEG_START_OF_SCAN[1]))


def _check_content(image: Image.Image, hint: str = "") -> None:
    """Refuse an image of one grey level: it holds no X-ray, and the model would still score it."""
    low, high = image.getextrema()
    if low == high:
        raise DecodeError(
            "blank_image",
            f"The image is a single grey level ({low}) with nothing in it{hint}. Upload the X-ray itself.",
        )


def _check_truncation_fill(image: Image.Image) -> None:
    """Refuse a JPEG whose lower rows are libjpeg's flat mid-grey fill: what a file cut short decodes to, silently.

    A truncated sequential JPEG given a new end marker decodes without an error, its missing rows one grey level
    (JPEG_TRUNCATION_FILL). Real X-rays' flat bottom rows were black, and at most 7% of them.
    """
    if image.getpixel((0, image.height - 1)) != JPEG_TRUNCATION_FILL:  # nearly always: no copy of the pixels
        return
    pixels = np.asarray(image)
    flat = _flat_bottom_rows(pixels)
    share = flat / pixels.shape[0]
    if flat >= 2 and share >= TRUNCATION_FILL_SHARE:
        raise DecodeError(
            "truncated_image",
            f"The bottom {share:.0%} of the JPEG is one flat grey level ({JPEG_TRUNCATION_FILL}), as a file cut "
            "short decodes; upload the complete file again.",
        )


def _flat_bottom_rows(pixels: np.ndarray, block: int = 64) -> int:
    """How many rows at the bottom of `pixels` are all the bottom-left pixel's value (usually none: one row read)."""
    value, height, counted = pixels[-1, 0], pixels.shape[0], 0
    while counted < height:
        start = max(0, height - counted - block)
        rows = (pixels[start : height - counted] == value).all(axis=1)
        if not rows.all():
            return counted + int(np.argmin(rows[::-1]))
        counted = height - start
    return counted


def _finite_window(dataset: Dataset) -> bool:
    """Whether the DICOM's first window centre and width are finite numbers (NaN or infinity blanks the image)."""
    def first(value: object) -> float:
        return float(value[0] if isinstance(value, Sequence) and not isinstance(value, str) else value)

    try:
        return bool(np.isfinite(first(dataset.WindowCenter)) and np.isfinite(first(dataset.WindowWidth)))
    except (TypeError, ValueError, IndexError):
        return False


def _frame_count(dataset: Dataset) -> int:
    """The DICOM's Number of Frames, 1 when absent or 0 (as pydicom reads it: such files exist); invalid_dicom else."""
    frames = dataset.get("NumberOfFrames")
    if frames is None or str(frames).strip() in ("", "None"):
        return 1
    try:
        count = int(frames)
    except (TypeError, ValueError) as error:
        raise DecodeError("invalid_dicom", f"The DICOM's Number of Frames ({frames}) is not a number.") from error
    if count < 0:
        raise DecodeError("invalid_dicom", f"The DICOM's Number of Frames is {count}; export it again.")
    return max(1, count)


def _check_native_length(dataset: Dataset, transfer_syntax: UID, columns: int, rows: int) -> None:
    """Refuse uncompressed pixel data longer than its frames can hold: the header would crop an unrelated image."""
    count = _frame_count(dataset)
    if transfer_syntax.is_encapsulated or "PixelData" not in dataset:
        return
    try:
        samples = int(dataset.get("SamplesPerPixel") or 1)
        bits = int(dataset.get("BitsAllocated") or 8)
    except (TypeError, ValueError):
        return  # pydicom's own checks name what is wrong
    frame_bytes = -(-rows * columns * samples * bits // 8)
    expected = -(-rows * columns * samples * count * bits // 8)
    actual = len(dataset.PixelData)
    if actual >= expected + frame_bytes + 2:  # a whole frame more than declared; trailing padding is trimmed
        raise DecodeError(
            "invalid_dicom",
            f"The DICOM's pixel data holds {actual:,} bytes but its header ({columns}x{rows}, {count} frame(s), "
            f"{bits}-bit) declares {expected:,}: its Rows and Columns do not describe it. Export it again.",
        )


def _truncated_error(format_name: str) -> DecodeError:
    """Build the truncated_image error for a JPEG or PNG whose data ends early or is corrupt."""
    return DecodeError(
        "truncated_image",
        f"The {format_name} file is truncated or corrupt; upload the complete file again.",
    )
