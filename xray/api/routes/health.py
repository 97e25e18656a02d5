"""Liveness, the model card, and the web page."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from xray.api.deps import PredictorDep
from xray.api.schemas import HealthResponse

router = APIRouter(tags=["health"])


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page(request: Request) -> HTMLResponse:
    return HTMLResponse(request.app.state.page_html)


@router.get("/health", response_model=HealthResponse)
async def health(request: Request) -> HealthResponse:
    """Liveness, and whether a model is loaded."""
    predictor = request.app.state.holder.current
    return HealthResponse(status="ok", model_loaded=predictor is not None,
                          model_version=predictor.version if predictor else None)  # fmt: skip


@router.get("/model")
async def model(predictor: PredictorDep) -> dict[str, Any]:
    """The model card of the model in service."""
    return predictor.card.to_dict()
