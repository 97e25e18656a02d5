"""Liveness (`/health`), readiness (`/ready`), the model card, and the web page."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from xray.api.deps import PredictorDep, not_ready_reason
from xray.api.errors import ApiError
from xray.api.schemas import ErrorResponse, HealthResponse, ReadyResponse

router = APIRouter(tags=["health"])


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page(request: Request) -> HTMLResponse:
    return HTMLResponse(request.app.state.page_html)


@router.get("/health", response_model=HealthResponse)
async def health(request: Request) -> HealthResponse:
    """Liveness: 200 while the process answers, model or not (restart the instance only when this fails)."""
    predictor = request.app.state.holder.current
    return HealthResponse(status="ok", model_loaded=predictor is not None,
                          model_version=predictor.version if predictor else None)  # fmt: skip


@router.get("/ready", response_model=ReadyResponse, responses={503: {"model": ErrorResponse}})
async def ready(request: Request) -> ReadyResponse:
    """Readiness: 200 only when a model is loaded, else 503 with the reason (send traffic only on 200)."""
    predictor = request.app.state.holder.current
    if predictor is None:
        raise ApiError(503, "not_ready", f"Not ready: {not_ready_reason(request)}.", headers={"Retry-After": "5"})
    return ReadyResponse(status="ready", model_version=predictor.version)


@router.get("/model")
async def model(predictor: PredictorDep) -> dict[str, Any]:
    """The model card of the model in service."""
    return predictor.card.to_dict()
