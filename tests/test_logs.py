"""Log setup: libraries' errors stay one line, so a client sending broken files cannot flood the log."""

from __future__ import annotations

import io
import logging

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless

from tests.test_decoding import dicom_bytes
from xray.decoding import DecodeError, decode_image
from xray.logs import quiet_libraries


def broken_rle_dicom() -> bytes:
    """An RLE Lossless DICOM whose one segment decodes to far fewer bytes than Rows x Columns."""
    dataset = pydicom.dcmread(io.BytesIO(dicom_bytes(np.arange(64, dtype=np.uint8).reshape(8, 8))))
    dataset.compress(RLELossless)
    dataset.PixelData = encapsulate([b"\x01\x00\x00\x00" + (64).to_bytes(4, "little") + bytes(56) + b"\x81\x00" * 50])
    dataset.Rows = dataset.Columns = 400
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    return buffer.getvalue()


def test_a_broken_dicom_logs_pydicoms_error_in_one_line_without_its_traceback(caplog):
    quiet_libraries()
    quiet_libraries()  # idempotent: one filter, whoever calls it again
    assert len(logging.getLogger("pydicom.pixels.decoders.base").filters) == 1
    caplog.set_level(logging.INFO)
    with pytest.raises(DecodeError):
        decode_image(broken_rle_dicom())
    records = [record for record in caplog.records if record.name.startswith("pydicom")]
    assert records, "the case this guards: pydicom logs the decoder's failure"
    assert all(record.exc_info is None and "\n" not in record.getMessage() for record in records)
