"""Predictions for one X-ray or a batch."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import APIRouter, File, UploadFile

from xray.api.deps import LimitsDep, OneFile, PredictorDep, ScorerDep, SettingsDep
from xray.api.errors import ApiError
from xray.api.schemas import BatchItem, ErrorResponse, PredictionResponse
from xray.api.uploads import read_pixels
from xray.decoding import DecodeError

router = APIRouter(tags=["prediction"], responses={
    413: {"model": ErrorResponse}, 415: {"model": ErrorResponse}, 422: {"model": ErrorResponse},
    503: {"model": ErrorResponse}})  # fmt: skip


def elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


@router.post("/predict", response_model=PredictionResponse, dependencies=[OneFile])
async def predict(file: Annotated[UploadFile, File(description="a chest X-ray: JPEG, PNG or DICOM")],
                  predictor: PredictorDep, score: ScorerDep, limits: LimitsDep,
                  settings: SettingsDep) -> PredictionResponse:  # fmt: skip
    """Label and P(PNEUMONIA) for one X-ray."""
    pixels = await read_pixels(file, predictor, limits, settings)
    started = time.perf_counter()
    prediction = (await score(predictor, [pixels]))[0]
    return PredictionResponse(**prediction.to_dict(), inference_ms=elapsed_ms(started))


@router.post("/predict/batch", response_model=list[BatchItem], response_model_exclude_none=True)
async def predict_batch(
    files: Annotated[list[UploadFile], File(description="several X-rays")],
    predictor: PredictorDep, score: ScorerDep, limits: LimitsDep, settings: SettingsDep,
) -> list[BatchItem]:  # fmt: skip
    """One result per file, in order; a bad file gets its own error and does not fail the others."""
    if len(files) > settings.max_batch_files:
        raise ApiError(413, "too_many_files", f"{len(files)} files sent; at most {settings.max_batch_files} "
                                              "per batch (XRAY_MAX_BATCH_FILES).")  # fmt: skip
    decoded = await asyncio.gather(*(read_pixels(upload, predictor, limits, settings) for upload in files),
                                   return_exceptions=True)  # fmt: skip
    results: list[BatchItem | None] = []
    pixels, positions = [], []
    for position, (upload, outcome) in enumerate(zip(files, decoded, strict=True)):
        if isinstance(outcome, DecodeError):
            results.append(BatchItem(filename=upload.filename, error=outcome.code, detail=outcome.detail,
                                     status=outcome.status))  # fmt: skip
        elif isinstance(outcome, BaseException):
            raise outcome
        else:
            pixels.append(outcome)
            positions.append(position)
            results.append(None)
    started = time.perf_counter()
    predictions = await score(predictor, pixels) if pixels else []
    took = elapsed_ms(started)
    for position, prediction in zip(positions, predictions, strict=True):
        results[position] = BatchItem(filename=files[position].filename, **prediction.to_dict(), inference_ms=took)
    return results
