#!/usr/bin/env python
"""The hostile uploads of issue 9, built in memory: small files that used to cost the server
hundreds of MiB, minutes of a decoder, a crash, a plain-text 500 or a confident answer about
nothing. The serving benchmark sends them under load and
the API tests check each is refused with a 4xx JSON error.

    .venv/bin/python scripts/hostile_uploads.py OUT_DIR   # write them as files, to try by hand
"""

from __future__ import annotations

import io
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, SecondaryCaptureImageStorage, generate_uid

BOMB_SIDE = 7000
EMBEDDED_JPEG_SIDE = 3000
SCAN_BOMB_SIDE, SCAN_BOMB_REPEATS = 4000, 10_000  # 373 kB; held a decode worker for 21 s before MAX_JPEG_SCANS
LONG_PNG_HEIGHT = 25_000_000  # 1 x 25 M: within the pixel limit, and 400 MiB more server memory before


@dataclass(frozen=True)
class HostileUpload:
    """One upload, and the status and error code the API must answer it with."""

    name: str
    filename: str
    data: bytes
    status: int
    error: str


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk with its length and CRC."""
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def blank_png(side: int, bit_depth: int) -> bytes:
    """A valid grayscale PNG of side x side black pixels, compressed to tens of kB."""
    row = b"\x00" * (1 + (side * bit_depth + 7) // 8)
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row * 500) for _ in range(side // 500)]
    parts += [compressor.compress(row * (side % 500)), compressor.flush()]
    header = struct.pack(">IIBBBBB", side, side, bit_depth, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", b"".join(parts))
            + png_chunk(b"IEND", b""))  # fmt: skip


def dicom(transfer_syntax: str = ExplicitVRLittleEndian, **elements: object) -> bytes:
    """A DICOM Part 10 file with the given elements (pixel module included)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    dataset.Modality = "CR"
    pixel_module = {"SamplesPerPixel": 1, "PhotometricInterpretation": "MONOCHROME2", "BitsAllocated": 8,
                    "BitsStored": 8, "HighBit": 7, "PixelRepresentation": 0}  # fmt: skip
    for keyword, value in {**pixel_module, **elements}.items():
        setattr(dataset, keyword, value)
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def embedded_jpeg_dicom() -> bytes:
    """A JPEG Baseline DICOM declaring 8x8 pixels whose one frame is a 3000x3000 JPEG."""
    buffer = io.BytesIO()
    Image.new("L", (EMBEDDED_JPEG_SIDE, EMBEDDED_JPEG_SIDE), 128).save(buffer, format="JPEG", quality=50)
    return dicom(JPEGBaseline8Bit, Rows=8, Columns=8, PixelData=encapsulate([buffer.getvalue()]))


def modality_lut_without_descriptor() -> bytes:
    """A 16-bit DICOM whose ModalityLUTSequence item has LUT data but no LUTDescriptor."""
    item = Dataset()
    item.add_new(0x00283006, "US", [0, 100, 200, 300])  # LUTData, its ambiguous VR stated
    item.ModalityLUTType = "OD"
    return dicom(Rows=4, Columns=4, BitsAllocated=16, BitsStored=16, HighBit=15,
                 PixelData=np.arange(16, dtype="<u2").tobytes(), ModalityLUTSequence=[item])  # fmt: skip


def scan_bomb(side: int = SCAN_BOMB_SIDE, repeats: int = SCAN_BOMB_REPEATS) -> bytes:
    """A progressive JPEG whose last scan is written `repeats` more times: each is a pass over the whole image."""
    buffer = io.BytesIO()
    Image.new("L", (side, side)).save(buffer, format="JPEG", progressive=True)
    data = buffer.getvalue()
    scan = data[data.rfind(b"\xff\xda") : -2]
    return data[:-2] + scan * repeats + data[-2:]


def long_png(height: int = LONG_PNG_HEIGHT) -> bytes:
    """A valid 1-pixel-wide grayscale PNG `height` rows long: tens of kB, and hundreds of MiB of rows to PIL."""
    compressor = zlib.compressobj(9)
    data = compressor.compress(b"\x00\x00" * height) + compressor.flush()
    header = struct.pack(">IIBBBBB", 1, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data)
            + png_chunk(b"IEND", b""))  # fmt: skip


def truncated_jpeg() -> bytes:
    """A JPEG of noise cut at half its length and given a new end marker: it decodes, half of it flat grey."""
    buffer = io.BytesIO()
    pixels = np.random.default_rng(9).integers(0, 256, (1024, 768), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    return data[: len(data) // 2] + b"\xff\xd9"


def hostile_uploads() -> list[HostileUpload]:
    """Every hostile upload of issue 9 with the answer it must get (default limits)."""
    return [
        HostileUpload("png_bomb", "bomb.png", blank_png(BOMB_SIDE, 1), 413, "too_many_pixels"),
        HostileUpload("png_16_bit", "deep.png", blank_png(BOMB_SIDE, 16), 413, "too_many_pixels"),
        HostileUpload("dicom_huge_declared", "huge.dcm", dicom(Rows=65535, Columns=65535, PixelData=b"\x00" * 64),
                      413, "too_many_pixels"),  # fmt: skip
        HostileUpload("dicom_embedded_frame_larger", "embedded.dcm", embedded_jpeg_dicom(), 422, "invalid_dicom"),
        HostileUpload("dicom_palette_without_lut", "palette.dcm",
                      dicom(Rows=4, Columns=4, PhotometricInterpretation="PALETTE COLOR", PixelData=bytes(16)),
                      422, "invalid_dicom"),  # fmt: skip
        HostileUpload("dicom_modality_lut_without_descriptor", "modality.dcm", modality_lut_without_descriptor(),
                      422, "invalid_dicom"),  # fmt: skip
        HostileUpload("jpeg_scan_bomb", "scans.jpg", scan_bomb(), 413, "too_many_scans"),
        HostileUpload("png_one_pixel_wide", "long.png", long_png(), 422, "implausible_shape"),
        HostileUpload("jpeg_cut_short_new_end_marker", "cut.jpg", truncated_jpeg(), 422, "truncated_image"),
        HostileUpload("dicom_rescale_to_nothing", "blank.dcm",
                      dicom(Rows=4, Columns=4, PixelData=bytes(range(16)), RescaleSlope=0, RescaleIntercept=0),
                      422, "blank_image"),  # fmt: skip
    ]


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    folder = Path(sys.argv[1])
    folder.mkdir(parents=True, exist_ok=True)
    for upload in hostile_uploads():
        (folder / upload.filename).write_bytes(upload.data)
        print(f"{upload.filename}: {len(upload.data):,} bytes, expect {upload.status} {upload.error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
