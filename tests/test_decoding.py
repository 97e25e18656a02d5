"""Tests for xray.decoding: tiny synthetic uploads of every accepted kind, and each refusal."""

from __future__ import annotations

import io
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from xray.decoding import ERROR_STATUSES, DecodeError, DecodeLimits, decode_image, sniff_format

SHARED_NORMAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "kermany224" / "val" / "NORMAL"


def encode_with_pil(array: np.ndarray, format_name: str, **options: object) -> bytes:
    """Encode an array with PIL into upload bytes of the given format."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=format_name, **options)
    return buffer.getvalue()


def gradient(height: int = 16, width: int = 24) -> np.ndarray:
    """A horizontal uint8 ramp from 0 to 255, the same on every row."""
    row = np.linspace(0, 255, width).round().astype(np.uint8)
    return np.tile(row, (height, 1))


def noise(height: int, width: int, channels: int | None = None) -> np.ndarray:
    """Seeded random uint8 pixels, which compress badly and so make long files to truncate."""
    shape = (height, width) if channels is None else (height, width, channels)
    return np.random.default_rng(7).integers(0, 256, size=shape, dtype=np.uint8)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk with its length and CRC."""
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_bytes(width: int, height: int, bit_depth: int, image_data: bytes) -> bytes:
    """A grayscale PNG from its raw IHDR fields and an already compressed IDAT payload."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", image_data) + png_chunk(b"IEND", b"")


def one_colour_png_bomb(side: int) -> bytes:
    """A complete, valid 1-bit black PNG of side x side pixels that compresses to a few KiB."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)
    rows_per_block = 1000
    parts = [compressor.compress(row * rows_per_block) for _ in range(side // rows_per_block)]
    parts.append(compressor.compress(row * (side % rows_per_block)))
    parts.append(compressor.flush())
    return png_bytes(side, side, 1, b"".join(parts))


def png_16_bit(array: np.ndarray) -> bytes:
    """A 16-bit grayscale PNG holding `array` exactly (PIL writes mode I;16 as 16-bit)."""
    assert array.dtype == np.uint16
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    data = buffer.getvalue()
    assert data[24] == 16, "PIL did not write a 16-bit PNG"
    return data


def dicom_bytes(
    pixels: np.ndarray | None,
    photometric: str = "MONOCHROME2",
    transfer_syntax: str = ExplicitVRLittleEndian,
    **elements: object,
) -> bytes:
    """A DICOM Part 10 file holding `pixels` (uint8/uint16, frames first if 3-D) or no image."""
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    file_meta.MediaStorageSOPInstanceUID = generate_uid()
    file_meta.TransferSyntaxUID = transfer_syntax
    dataset = Dataset()
    dataset.file_meta = file_meta
    dataset.SOPClassUID = file_meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = file_meta.MediaStorageSOPInstanceUID
    dataset.Modality = "CR"
    if pixels is not None:
        samples = 3 if photometric == "RGB" else 1
        frames = pixels.shape[0] if pixels.ndim == 3 and samples == 1 else 1
        bits = pixels.dtype.itemsize * 8
        dataset.Rows, dataset.Columns = pixels.shape[-2:] if samples == 1 else pixels.shape[:2]
        dataset.SamplesPerPixel = samples
        dataset.PhotometricInterpretation = photometric
        dataset.BitsAllocated = bits
        dataset.BitsStored = bits
        dataset.HighBit = bits - 1
        dataset.PixelRepresentation = 0
        if samples == 3:
            dataset.PlanarConfiguration = 0
        if frames > 1:
            dataset.NumberOfFrames = frames
        dataset.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    for keyword, value in elements.items():
        setattr(dataset, keyword, value)
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def as_array(image: Image.Image) -> np.ndarray:
    """The pixels of a decoded image, after checking it is 8-bit grayscale."""
    assert image.mode == "L"
    return np.asarray(image)


def assert_refused(data: bytes, code: str, status: int, limits: DecodeLimits | None = None) -> str:
    """Assert decoding `data` raises DecodeError with this code and status; return its detail."""
    with pytest.raises(DecodeError) as caught:
        decode_image(data, limits or DecodeLimits())
    assert (caught.value.code, caught.value.status) == (code, status)
    assert caught.value.detail
    return caught.value.detail


# Formats and sniffing


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (encode_with_pil(gradient(), "JPEG"), "jpeg"),
        (encode_with_pil(gradient(), "PNG"), "png"),
        (dicom_bytes(gradient()), "dicom"),
        (b"", None),
        (b"hello, I am a text file named scan.png\n", None),
        (encode_with_pil(gradient(), "BMP"), None),
        (encode_with_pil(gradient(), "TIFF"), None),
        (encode_with_pil(gradient(), "GIF"), None),
        (b"\x00" * 128 + b"DICX", None),
    ],
    ids=["jpeg", "png", "dicom", "empty", "text", "bmp", "tiff", "gif", "near-dicom"],
)
def test_sniff_format_reads_magic_bytes(data: bytes, expected: str | None) -> None:
    assert sniff_format(data) == expected


@pytest.mark.parametrize("format_name", ["BMP", "TIFF", "GIF", "WEBP"])
def test_formats_pil_could_open_are_refused(format_name: str) -> None:
    data = encode_with_pil(gradient(), format_name)
    Image.open(io.BytesIO(data)).load()  # PIL itself reads it: the refusal is a choice
    assert_refused(data, "unsupported_format", 415)


def test_jpeg_grayscale_decodes_to_same_size_l_image() -> None:
    array = gradient(32, 48)
    decoded = as_array(decode_image(encode_with_pil(array, "JPEG", quality=95)))
    assert decoded.shape == (32, 48)
    assert np.abs(decoded.astype(int) - array).max() <= 8


def test_jpeg_colour_becomes_luminance() -> None:
    array = np.zeros((16, 16, 3), dtype=np.uint8)
    array[:, 8:] = (0, 200, 0)
    decoded = as_array(decode_image(encode_with_pil(array, "JPEG", quality=95)))
    assert decoded.shape == (16, 16)
    assert decoded[:, :4].max() <= 8
    assert abs(int(decoded[:, 12:].mean()) - round(200 * 0.587)) <= 8


def test_png_8_bit_grayscale_is_exact() -> None:
    array = noise(20, 30)
    np.testing.assert_array_equal(as_array(decode_image(encode_with_pil(array, "PNG"))), array)


def test_png_rgb_uses_pil_luminance() -> None:
    array = noise(10, 12, channels=3)
    expected = np.asarray(Image.fromarray(array).convert("L"))
    decoded = as_array(decode_image(encode_with_pil(array, "PNG")))
    np.testing.assert_array_equal(decoded, expected)
    assert not np.array_equal(decoded, array[..., 0])


def test_png_rgba_drops_alpha_instead_of_compositing() -> None:
    array = np.full((8, 8, 4), 200, dtype=np.uint8)
    array[..., 3] = 0  # fully transparent: compositing over black would give 0
    array[:, :4, :3] = 50
    decoded = as_array(decode_image(encode_with_pil(array, "PNG")))
    assert decoded.shape == (8, 8)
    assert set(np.unique(decoded[:, :4])) == {50}
    assert set(np.unique(decoded[:, 4:])) == {200}


def test_png_palette_maps_through_palette() -> None:
    indices = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette([255, 255, 255, 0, 0, 0, 0, 0, 255])  # white, black, blue
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    assert Image.open(io.BytesIO(buffer.getvalue())).mode == "P"
    decoded = as_array(decode_image(buffer.getvalue()))
    np.testing.assert_array_equal(decoded, [[255, 0], [round(255 * 0.114), 0]])


def test_png_16_bit_above_255_keeps_contrast_and_order() -> None:
    array = np.full((12, 12), 30_000, dtype=np.uint16)
    array[:, :4] = 1_000
    array[:, 8:] = 60_000
    data = png_16_bit(array)
    assert Image.open(io.BytesIO(data)).convert("L").getextrema() == (255, 255)  # PIL's clip
    decoded = as_array(decode_image(data))
    dark, middle, bright = decoded[0, 0], decoded[0, 6], decoded[0, 11]
    assert (dark, bright) == (0, 255)
    assert dark < middle < bright
    assert middle == round((30_000 - 1_000) / (60_000 - 1_000) * 255)


def test_an_image_of_one_grey_level_is_refused_as_blank() -> None:
    """The model would score a blank image like any other (a confident PNEUMONIA once); it holds no X-ray."""
    assert "(0)" in assert_refused(png_16_bit(np.full((4, 5), 4_000, dtype=np.uint16)), "blank_image", 422)
    assert_refused(encode_with_pil(np.full((40, 30), 77, np.uint8), "JPEG"), "blank_image", 422)


def test_png_bytes_decode_whatever_the_upload_was_called() -> None:
    # The API has no file name or content type to pass: only the bytes decide the format.
    data = encode_with_pil(gradient(), "PNG")
    assert sniff_format(data) == "png"
    np.testing.assert_array_equal(as_array(decode_image(data)), gradient())


def test_real_chest_x_ray_jpeg_decodes_at_full_resolution() -> None:
    paths = sorted(SHARED_NORMAL_DIR.glob("*.jpeg"))
    if not paths:
        pytest.skip(f"real X-rays not present under {SHARED_NORMAL_DIR}")
    data = paths[0].read_bytes()
    with Image.open(paths[0]) as original:
        expected_size = original.size
    decoded = decode_image(data)
    assert decoded.mode == "L"
    assert decoded.size == expected_size
    assert decoded.width >= 900
    assert np.asarray(decoded).std() > 20


# Refusals


def test_decode_error_statuses_are_the_documented_table() -> None:
    assert dict(ERROR_STATUSES) == {
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
    error = pickle.loads(pickle.dumps(DecodeError("too_large", "Too big.")))
    assert (error.code, error.detail, error.status) == ("too_large", "Too big.", 413)
    with pytest.raises(ValueError):
        DecodeError("no_such_code", "detail")


def test_empty_upload_is_refused() -> None:
    assert_refused(b"", "empty_file", 400)


def test_upload_over_byte_limit_is_refused_and_at_limit_accepted() -> None:
    data = encode_with_pil(gradient(), "PNG")
    assert decode_image(data, DecodeLimits(max_bytes=len(data))).size == (24, 16)
    assert_refused(data, "too_large", 413, DecodeLimits(max_bytes=len(data) - 1))


def test_random_bytes_are_refused() -> None:
    data = np.random.default_rng(3).integers(0, 256, size=4096, dtype=np.uint8).tobytes()
    assert_refused(data, "unsupported_format", 415)


def test_text_file_named_png_is_refused() -> None:
    assert_refused(b"not an image, despite the name scan.png\n", "unsupported_format", 415)


@pytest.mark.parametrize("format_name", ["JPEG", "PNG"])
def test_truncated_image_is_refused(format_name: str) -> None:
    data = encode_with_pil(noise(64, 64), format_name)
    truncated = data[: len(data) // 2]
    assert_refused(truncated, "truncated_image", 422)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("format_name", ["JPEG", "PNG"])
def test_header_only_image_is_refused(format_name: str) -> None:
    data = encode_with_pil(noise(8, 8), format_name)
    assert_refused(data[:12], "truncated_image", 422)


def test_png_with_corrupt_compressed_data_is_refused() -> None:
    data = png_bytes(8, 8, 8, b"this is not zlib data at all")
    assert_refused(data, "truncated_image", 422)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_png_bomb_is_refused_from_header_without_decoding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bomb = one_colour_png_bomb(10_000)
    assert len(bomb) < 100_000
    assert Image.open(io.BytesIO(bomb)).size == (10_000, 10_000)

    def refuse_to_decode(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded before the pixel limit was checked")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse_to_decode)
    detail = assert_refused(bomb, "too_many_pixels", 413, DecodeLimits(max_pixels=1_000_000))
    assert "10000x10000" in detail


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_pil_bomb_warning_raised_as_error_still_maps_to_too_many_pixels() -> None:
    bomb = one_colour_png_bomb(10_000)  # 10**8 pixels: above PIL's warning threshold
    assert_refused(bomb, "too_many_pixels", 413, DecodeLimits(max_pixels=10**9))


def test_header_beyond_pil_bomb_limit_is_refused_without_changing_pil() -> None:
    pil_limit = Image.MAX_IMAGE_PIXELS
    lying_header = png_bytes(100_000, 100_000, 8, zlib.compress(b"\x00" * 10))
    assert_refused(lying_header, "too_many_pixels", 413, DecodeLimits(max_pixels=10**12))
    assert_refused(lying_header, "too_many_pixels", 413)
    assert pil_limit == Image.MAX_IMAGE_PIXELS


@pytest.mark.parametrize("format_name", ["JPEG", "PNG"])
def test_pixel_limit_is_inclusive(format_name: str) -> None:
    data = encode_with_pil(gradient(10, 20), format_name)
    assert decode_image(data, DecodeLimits(max_pixels=200)).size == (20, 10)
    assert_refused(data, "too_many_pixels", 413, DecodeLimits(max_pixels=199))


# DICOM


def dicom_ramp() -> np.ndarray:
    """A 12-bit-valued uint16 ramp from 0 to 1000 along each row."""
    return np.tile(np.linspace(0, 1000, 11).astype(np.uint16), (4, 1))


def test_dicom_monochrome2_is_min_max_scaled() -> None:
    decoded = as_array(decode_image(dicom_bytes(dicom_ramp())))
    assert decoded.shape == (4, 11)
    np.testing.assert_array_equal(decoded[0], np.rint(np.linspace(0, 255, 11)))


def test_dicom_monochrome1_is_inverted_relative_to_monochrome2() -> None:
    pixels = dicom_ramp()
    monochrome2 = as_array(decode_image(dicom_bytes(pixels, photometric="MONOCHROME2")))
    monochrome1 = as_array(decode_image(dicom_bytes(pixels, photometric="MONOCHROME1")))
    np.testing.assert_array_equal(monochrome1, 255 - monochrome2)
    assert monochrome1[0, 0] == 255 and monochrome1[0, -1] == 0


def test_dicom_8_bit_monochrome2() -> None:
    decoded = as_array(decode_image(dicom_bytes(gradient())))
    np.testing.assert_array_equal(decoded, gradient())


def test_dicom_rescale_slope_and_intercept_are_applied() -> None:
    pixels = dicom_ramp()
    # A negative slope reverses the order, which min-max scaling alone cannot undo.
    flipped = as_array(decode_image(dicom_bytes(pixels, RescaleSlope=-1, RescaleIntercept=0)))
    np.testing.assert_array_equal(flipped[0], np.rint(np.linspace(255, 0, 11)))
    # A window given in rescaled units only fits when the rescale was applied first:
    # stored 0..1000 become -1000..1000 and the window -500..500 covers stored 250..750.
    windowed = as_array(
        decode_image(
            dicom_bytes(
                pixels,
                BitsStored=12,
                HighBit=11,
                RescaleSlope=2,
                RescaleIntercept=-1000,
                WindowCenter=0,
                WindowWidth=1000,
            )
        )
    )
    assert windowed[0, 2] == 0  # stored 200 -> -600, below the window
    assert windowed[0, 8] == 255  # stored 800 -> 600, above the window
    assert abs(int(windowed[0, 5]) - 128) <= 1  # stored 500 -> 0, the centre


def test_dicom_window_center_and_width_are_applied() -> None:
    decoded = as_array(
        decode_image(dicom_bytes(dicom_ramp(), BitsStored=12, HighBit=11, WindowCenter=500, WindowWidth=200))
    )
    row = decoded[0]  # stored values 0, 100, ..., 1000
    assert set(row[:4]) == {0}
    assert set(row[7:]) == {255}
    assert abs(int(row[5]) - 128) <= 1
    assert row[4] < row[5] < row[6]


def test_dicom_window_wider_than_data_is_not_restretched() -> None:
    pixels = np.tile(np.array([450, 500, 550], dtype=np.uint16), (2, 1))
    decoded = as_array(decode_image(dicom_bytes(pixels, BitsStored=12, HighBit=11, WindowCenter=500, WindowWidth=4000)))
    assert 100 < decoded.min() < decoded.max() < 160


def test_dicom_voi_lut_sequence_is_applied() -> None:
    lut_item = Dataset()
    lut_item.add_new("LUTDescriptor", "US", [11, 0, 16])
    lut_item.add_new("LUTData", "US", [4000 - 400 * index for index in range(11)])  # inverting
    pixels = np.tile(np.arange(11, dtype=np.uint16), (2, 1))
    decoded = as_array(decode_image(dicom_bytes(pixels, VOILUTSequence=[lut_item])))
    np.testing.assert_array_equal(decoded[0], np.rint(np.linspace(255, 0, 11)))


def test_dicom_multi_frame_takes_the_first_frame() -> None:
    frames = np.stack([gradient(6, 8), 255 - gradient(6, 8), np.zeros((6, 8), np.uint8)])
    decoded = as_array(decode_image(dicom_bytes(frames)))
    np.testing.assert_array_equal(decoded, gradient(6, 8))


def test_dicom_rgb_becomes_luminance() -> None:
    pixels = noise(5, 6, channels=3)
    decoded = as_array(decode_image(dicom_bytes(pixels, photometric="RGB")))
    np.testing.assert_array_equal(decoded, np.asarray(Image.fromarray(pixels).convert("L")))


def test_dicom_pixel_limit_is_checked_from_rows_and_columns_before_decoding() -> None:
    # Declares 50000x50000 but carries 4 bytes: decoding would fail as invalid_dicom first.
    data = dicom_bytes(np.zeros((2, 2), np.uint8), Rows=50_000, Columns=50_000)
    detail = assert_refused(data, "too_many_pixels", 413)
    assert "50000x50000" in detail
    small = dicom_bytes(gradient(10, 20))
    assert decode_image(small, DecodeLimits(max_pixels=200)).size == (20, 10)
    assert_refused(small, "too_many_pixels", 413, DecodeLimits(max_pixels=199))


@pytest.mark.parametrize(
    ("transfer_syntax", "uid"),
    [(JPEG2000Lossless, "1.2.840.10008.1.2.4.90"), (JPEGLSLossless, "1.2.840.10008.1.2.4.80")],
    ids=["jpeg2000", "jpeg-ls"],
)
def test_dicom_compression_that_cannot_be_decoded_is_refused(transfer_syntax: str, uid: str) -> None:
    data = dicom_bytes(
        None,
        transfer_syntax=transfer_syntax,
        Rows=8,
        Columns=8,
        SamplesPerPixel=1,
        PhotometricInterpretation="MONOCHROME2",
        BitsAllocated=8,
        BitsStored=8,
        HighBit=7,
        PixelRepresentation=0,
        PixelData=encapsulate([b"\x00\x01junk, not a codestream" * 4]),
    )
    detail = assert_refused(data, "unsupported_compression", 415)
    assert uid in detail


def test_dicom_without_pixel_data_is_refused() -> None:
    assert_refused(dicom_bytes(None), "invalid_dicom", 422)


def test_dicom_magic_followed_by_garbage_is_refused() -> None:
    data = b"\x00" * 128 + b"DICM" + b"\xff\xfe garbage that is no data element" * 8
    assert_refused(data, "invalid_dicom", 422)


def test_dicom_with_short_pixel_data_is_refused() -> None:
    data = dicom_bytes(np.zeros((2, 2), np.uint8), Rows=64, Columns=64)
    assert_refused(data, "invalid_dicom", 422)


def test_deflated_dicom_decodes_and_a_deflate_bomb_is_refused() -> None:
    pixels = np.zeros((512, 512), np.uint16)
    pixels[:, 256:] = 4000
    data = dicom_bytes(pixels, transfer_syntax=DeflatedExplicitVRLittleEndian)
    assert len(data) < 10_000
    decoded = as_array(decode_image(data))
    assert (decoded[0, 0], decoded[0, -1]) == (0, 255)
    detail = assert_refused(data, "too_large", 413, DecodeLimits(max_inflated_bytes=100_000))
    assert "100,000" in detail


# Hostile DICOMs and the one exception type (issue 9)


def test_any_failure_inside_a_decoder_becomes_a_decode_error(monkeypatch) -> None:
    def broken_load(self):
        raise RuntimeError("a bug deep inside a codec")

    monkeypatch.setattr(ImageFile.ImageFile, "load", broken_load)
    detail = assert_refused(encode_with_pil(gradient(), "PNG"), "undecodable_image", 422)
    assert "RuntimeError" not in detail


def test_palette_colour_dicom_without_lookup_table_is_invalid_not_a_crash() -> None:
    data = dicom_bytes(np.zeros((4, 4), np.uint8), photometric="PALETTE COLOR")
    assert "PALETTE COLOR" in assert_refused(data, "invalid_dicom", 422)


def test_modality_lut_item_without_descriptor_is_invalid_not_a_crash() -> None:
    item = Dataset()
    item.add_new(0x00283006, "US", [0, 100, 200, 300])  # LUTData with no LUTDescriptor
    item.ModalityLUTType = "OD"
    data = dicom_bytes(np.arange(16, dtype=np.uint16).reshape(4, 4), ModalityLUTSequence=[item])
    assert_refused(data, "invalid_dicom", 422)


def test_compressed_frame_larger_than_declared_is_refused_before_the_codec_runs(monkeypatch) -> None:
    import pydicom.pixels
    from pydicom.uid import JPEGBaseline8Bit

    # decoding imports pydicom where it reads a DICOM, so the codec entry point is patched at its source
    monkeypatch.setattr(pydicom.pixels, "pixel_array", lambda *arguments, **options: pytest.fail("codec ran"))
    frame = encode_with_pil(np.full((300, 200), 128, np.uint8), "JPEG")
    pixel_module = {"Rows": 8, "Columns": 8, "SamplesPerPixel": 1, "PhotometricInterpretation": "MONOCHROME2",
                    "BitsAllocated": 8, "BitsStored": 8, "HighBit": 7, "PixelRepresentation": 0}  # fmt: skip
    data = dicom_bytes(None, transfer_syntax=JPEGBaseline8Bit, PixelData=encapsulate([frame]), **pixel_module)
    assert "200x300" in assert_refused(data, "invalid_dicom", 422)
    big = dicom_bytes(None, transfer_syntax=JPEGBaseline8Bit, PixelData=encapsulate([frame]),
                      **{**pixel_module, "Rows": 300, "Columns": 200})  # fmt: skip
    assert_refused(big, "too_many_pixels", 413, DecodeLimits(max_pixels=200 * 299))


def test_compressed_frame_of_the_declared_size_decodes() -> None:
    from pydicom.uid import JPEGBaseline8Bit

    frame = encode_with_pil(gradient(30, 20), "JPEG")
    data = dicom_bytes(None, transfer_syntax=JPEGBaseline8Bit, PixelData=encapsulate([frame]), Rows=30, Columns=20,
                       SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2", BitsAllocated=8, BitsStored=8,
                       HighBit=7, PixelRepresentation=0)  # fmt: skip
    assert decode_image(data).size == (20, 30)


def test_deep_image_windowing_in_blocks_matches_one_pass(monkeypatch) -> None:
    import xray.decoding

    ramp = (np.arange(64 * 48, dtype=np.uint32).reshape(64, 48) * 17 % 65536).astype(np.uint16)
    whole = as_array(decode_image(png_16_bit(ramp)))
    monkeypatch.setattr(xray.decoding, "_STRETCH_BLOCK_PIXELS", 100)  # two rows a block
    np.testing.assert_array_equal(as_array(decode_image(png_16_bit(ramp))), whole)


def test_jpeg_draft_decodes_a_real_x_ray_at_a_reduced_scale_not_below_the_request() -> None:
    paths = sorted(SHARED_NORMAL_DIR.glob("*.jpeg"))
    if not paths:
        pytest.skip(f"real X-rays not present under {SHARED_NORMAL_DIR}")
    data = paths[0].read_bytes()
    full = decode_image(data)
    drafted = decode_image(data, draft_size=256)
    assert min(drafted.size) >= 256 and drafted.width < full.width


# Hostile files that decode without an error


def progressive_jpeg(array: np.ndarray, repeat_last_scan: int = 0) -> bytes:
    """A progressive JPEG of `array`, its last scan written `repeat_last_scan` more times (a "scan bomb")."""
    data = encode_with_pil(array, "JPEG", progressive=True, quality=90)
    last = data.rfind(b"\xff\xda")
    scan = data[last:-2]  # to the end marker
    return data[:-2] + scan * repeat_last_scan + data[-2:]


def test_a_progressive_jpeg_decodes_and_a_scan_bomb_is_refused_before_decoding(monkeypatch) -> None:
    array = noise(64, 64)
    assert decode_image(progressive_jpeg(array)).size == (64, 64)
    bomb = progressive_jpeg(array, repeat_last_scan=200)
    monkeypatch.setattr(Image.Image, "load", lambda image: pytest.fail("the decoder ran"))
    assert "limit is 100" in assert_refused(bomb, "too_many_scans", 413)


def test_junk_between_jpeg_segments_does_not_hide_a_scan_bomb() -> None:
    """libjpeg skips bytes between segments that a header walk would stop at; the scans are counted regardless."""
    bomb = progressive_jpeg(noise(64, 64), repeat_last_scan=200)
    app0_end = 4 + int.from_bytes(bomb[4:6], "big")
    assert_refused(bomb[:app0_end] + b"\x00" + bomb[app0_end:], "too_many_scans", 413)


def test_a_scan_bomb_inside_a_dicom_is_refused() -> None:
    from pydicom.uid import JPEGBaseline8Bit

    frame = progressive_jpeg(noise(32, 24), repeat_last_scan=200)
    data = dicom_bytes(None, transfer_syntax=JPEGBaseline8Bit, PixelData=encapsulate([frame]), Rows=32, Columns=24,
                       SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2", BitsAllocated=8, BitsStored=8,
                       HighBit=7, PixelRepresentation=0)  # fmt: skip
    assert_refused(data, "too_many_scans", 413)


@pytest.mark.parametrize("kept", [0.1, 0.5, 0.9])
def test_a_jpeg_cut_short_and_given_a_new_end_marker_is_refused_as_truncated(kept: float) -> None:
    """libjpeg fills the missing rows with flat grey and says nothing; the model scored such a file 0.995."""
    data = encode_with_pil(noise(256, 192), "JPEG", quality=90)
    assert decode_image(data).size == (192, 256)
    cut = data[: int(len(data) * kept)] + b"\xff\xd9"
    assert "one flat grey level (128)" in assert_refused(cut, "truncated_image", 422)


def test_a_truncated_jpeg_turned_by_its_exif_orientation_is_still_refused() -> None:
    """The fill is checked where libjpeg puts it, at the bottom of the stored image, before the image is turned."""
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode_with_pil(noise(256, 192), "JPEG", quality=90, exif=exif)
    assert_refused(data[: len(data) // 2] + b"\xff\xd9", "truncated_image", 422)


@pytest.mark.parametrize("fill", [0, 255])
def test_an_image_letterboxed_on_a_flat_band_still_decodes(fill: int) -> None:
    """A quarter of black (or white) padding under the X-ray is an export's canvas, not a truncation."""
    pixels = np.vstack([noise(96, 128), np.full((32, 128), fill, np.uint8)])
    for format_name in ("PNG", "JPEG"):
        assert decode_image(encode_with_pil(pixels, format_name)).size == (128, 128)


def test_real_xrays_with_a_black_lower_border_still_decode() -> None:
    """Their flat bottom rows are black and few (at most 7% in the 5,232 Kermany images); fill is grey and many."""
    train = SHARED_NORMAL_DIR.parents[1] / "train" / "NORMAL"
    paths = [train / "NORMAL2-IM-0391-0001.jpeg", train / "NORMAL2-IM-0793-0001.jpeg"]
    if not all(path.is_file() for path in paths):
        pytest.skip(f"real X-rays not present under {train}")
    for path in paths:
        decoded = as_array(decode_image(path.read_bytes()))
        assert (decoded[-1] == 0).all(), "the case this guards: a flat black bottom row"


def test_an_image_far_longer_than_wide_is_refused_from_its_header(monkeypatch) -> None:
    """A 1 x 25,000,000 PNG of 48 KB took 400 MiB to decode; no chest X-ray is over 10 times longer than wide."""
    assert decode_image(encode_with_pil(noise(300, 40), "PNG")).size == (40, 300)
    long = png_bytes(1, 2_000_000, 8, zlib.compress(b"\x00\x00" * 2_000_000))
    monkeypatch.setattr(Image.Image, "load", lambda image: pytest.fail("the decoder ran"))
    assert "1x2000000" in assert_refused(long, "implausible_shape", 422)


@pytest.mark.parametrize("width", ["inf", "NaN"])
def test_a_dicom_window_that_is_not_a_number_falls_back_to_min_max(width: str) -> None:
    decoded = as_array(decode_image(dicom_bytes(dicom_ramp(), WindowCenter=1000, WindowWidth=width)))
    np.testing.assert_array_equal(decoded, as_array(decode_image(dicom_bytes(dicom_ramp()))))


def test_a_dicom_whose_rescale_leaves_no_contrast_is_refused_as_blank() -> None:
    detail = assert_refused(dicom_bytes(dicom_ramp(), RescaleSlope=0, RescaleIntercept=5), "blank_image", 422)
    assert "rescale or window" in detail


def test_a_dicom_whose_pixel_data_is_far_longer_than_declared_is_invalid() -> None:
    """Rows = Columns = 10 over a 64 x 48 buffer showed its first 100 bytes as the X-ray."""
    data = dicom_bytes(noise(64, 48), Rows=10, Columns=10)
    assert "declares 100" in assert_refused(data, "invalid_dicom", 422)


def test_dicom_quirks_that_pydicom_reads_still_decode() -> None:
    """Trailing padding shorter than a frame is trimmed, and Number of Frames 0 means one frame, as pydicom reads."""
    pixels = noise(40, 40)
    padded = dicom_bytes(None, **{key: value for key, value in {
        "Rows": 40, "Columns": 40, "SamplesPerPixel": 1, "PhotometricInterpretation": "MONOCHROME2",
        "BitsAllocated": 8, "BitsStored": 8, "HighBit": 7, "PixelRepresentation": 0,
        "PixelData": pixels.tobytes() + bytes(40)}.items()})  # fmt: skip
    np.testing.assert_array_equal(as_array(decode_image(padded)), pixels)
    np.testing.assert_array_equal(as_array(decode_image(dicom_bytes(pixels, NumberOfFrames=0))), pixels)


def test_a_colour_dicom_of_one_grey_level_is_refused_as_blank() -> None:
    assert_refused(dicom_bytes(np.full((8, 8, 3), 90, np.uint8), photometric="RGB"), "blank_image", 422)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_an_exif_orientation_turns_the_image_as_every_viewer_shows_it(orientation: int) -> None:
    """A phone photo of an X-ray is stored sideways with an orientation tag; unturned, it scored 0.555 for 0.846."""
    upright = Image.fromarray(noise(40, 30))
    undo = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    upright.transpose(undo).save(buffer, format="PNG", exif=exif)
    np.testing.assert_array_equal(as_array(decode_image(buffer.getvalue())), np.asarray(upright))


def test_a_dicom_whose_transfer_syntax_uid_names_none_is_unsupported() -> None:
    data = dicom_bytes(noise(8, 8)).replace(b"1.2.840.10008.1.2.1\x00", b"1.2.3.4.5.6.7.8.9.10", 1)  # same length
    assert "1.2.3.4.5.6.7.8.9.10" in assert_refused(data, "unsupported_compression", 415)
