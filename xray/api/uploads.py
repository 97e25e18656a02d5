"""Uploaded files to the model's pixels: sized before reading, decoded on a bounded pool, shrunk at once."""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi import UploadFile

from xray.decoding import DecodeLimits, too_large_error
from xray.inference import Predictor, serving_threads
from xray.settings import Settings


@functools.cache
def decode_pool(workers: int) -> ThreadPoolExecutor:
    """The threads uploads are decoded on: `workers` decodes at once at most, whatever the number of requests."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="xray-decode")


async def read_pixels(upload: UploadFile, predictor: Predictor, limits: DecodeLimits, settings: Settings) -> np.ndarray:
    """The upload's model-size uint8 pixels; DecodeError (a 4xx) for anything refused.

    The size FastAPI recorded while parsing is checked before the bytes are read, so the error
    states the real size; then at most the limit is read and decoded straight to model size.
    """
    if upload.size is not None and upload.size > limits.max_bytes:
        raise too_large_error(upload.size, limits.max_bytes)
    data = await upload.read(limits.max_bytes + 1)
    if len(data) > limits.max_bytes:
        raise too_large_error(None, limits.max_bytes)
    pool = decode_pool(serving_threads(settings)[1])
    return await asyncio.get_running_loop().run_in_executor(pool, predictor.decode, data, limits)
