"""Uploaded files to decoded images, within the size and pixel limits."""

from __future__ import annotations

from fastapi import UploadFile
from PIL import Image
from starlette.concurrency import run_in_threadpool

from xray.decoding import DecodeLimits, decode_image


async def read_upload(upload: UploadFile, limits: DecodeLimits) -> Image.Image:
    """Read at most the size limit (plus one byte, to detect more) and decode in the thread pool."""
    data = await upload.read(limits.max_bytes + 1)
    return await run_in_threadpool(decode_image, data, limits)
