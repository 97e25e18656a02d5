"""Grad-CAM explanations a clinician can look at."""

from __future__ import annotations

import base64
import time
from typing import Annotated

from fastapi import APIRouter, File, Query, UploadFile
from fastapi.responses import Response

from xray.api.deps import ExplainerDep, ExplanationSlot, LimitsDep, OneFile, PredictorDep, SettingsDep
from xray.api.schemas import ErrorResponse, ExplanationResponse
from xray.api.uploads import read_pixels

router = APIRouter(tags=["explanation"], responses={
    413: {"model": ErrorResponse}, 415: {"model": ErrorResponse}, 422: {"model": ErrorResponse},
    503: {"model": ErrorResponse}})  # fmt: skip


@router.post("/explain", response_model=ExplanationResponse, responses={200: {"content": {"image/png": {}}}},
             dependencies=[ExplanationSlot, OneFile])  # fmt: skip
async def explain_route(file: Annotated[UploadFile, File(description="a chest X-ray: JPEG, PNG or DICOM")],
                        predictor: PredictorDep, explain: ExplainerDep, limits: LimitsDep, settings: SettingsDep,
                        format: Annotated[str, Query(pattern="^(json|png)$")] = "json",
                        ) -> Response | ExplanationResponse:  # fmt: skip
    """Grad-CAM heatmap over the X-ray (PNG) with the prediction: JSON with a data URL, or `?format=png`.

    At most XRAY_MAX_QUEUED_EXPLANATIONS explanations are in progress; past them, 503 `overloaded`.
    """
    pixels = await read_pixels(file, predictor, limits, settings)
    started = time.perf_counter()
    png, prediction = await explain(predictor, pixels)
    elapsed = round((time.perf_counter() - started) * 1000, 2)
    if format == "png":
        return Response(png, media_type="image/png", headers={
            "X-Prediction-Label": prediction.label, "X-Prediction-Probability": str(prediction.probability),
            "X-Model-Version": prediction.model_version})  # fmt: skip
    return ExplanationResponse(**prediction.to_dict(), inference_ms=elapsed,
                               heatmap_png="data:image/png;base64," + base64.b64encode(png).decode())  # fmt: skip
