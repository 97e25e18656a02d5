"""Request dependencies and their `Annotated` aliases: the routes ask for what they need by type."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image
from starlette.concurrency import run_in_threadpool

from xray.api.errors import ApiError
from xray.decoding import DecodeLimits
from xray.inference import Prediction, Predictor
from xray.jobs import TrainingJobs
from xray.settings import Settings

BatchPredict = Callable[[list[Image.Image]], Awaitable[list[Prediction]]]
Scorer = Callable[[Predictor, list[Image.Image]], Awaitable[list[Prediction]]]
bearer = HTTPBearer(auto_error=False, description="XRAY_API_TOKEN")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_limits(request: Request) -> DecodeLimits:
    return request.app.state.limits


def get_predictor(request: Request) -> Predictor:
    """The model in service, or 503 saying how to get one."""
    predictor = request.app.state.holder.current
    if predictor is None:
        problem = request.app.state.load_error
        detail = ("No model has been promoted yet. Train one with `python -m xray train` (or GET /train with the "
                  "API token); the service picks it up without a restart.")  # fmt: skip
        raise ApiError(503, "model_not_ready", f"{detail} ({problem})" if problem else detail)
    return predictor


def get_jobs(request: Request) -> TrainingJobs:
    """The training jobs, or 503 when storage could not be opened."""
    jobs = request.app.state.jobs
    if jobs is None:
        raise ApiError(503, "storage_unavailable", f"Training needs storage: {request.app.state.load_error}")
    return jobs


def get_scorer(request: Request) -> Scorer:
    """How this server scores images: BentoML's batcher when it gave one, else the predictor in the thread pool."""
    batch_predict: BatchPredict | None = request.app.state.batch_predict

    async def score(predictor: Predictor, images: list[Image.Image]) -> list[Prediction]:
        if batch_predict is not None:
            return await batch_predict(images)
        return await run_in_threadpool(predictor.predict, images)

    return score


def require_token(
    settings: Annotated[Settings, Depends(get_settings)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    """Bearer token matching XRAY_API_TOKEN; training over HTTP is off when none is configured."""
    if not settings.api_token:
        raise ApiError(403, "training_disabled", "Training over HTTP is disabled: set XRAY_API_TOKEN on the server "
                                                 "and send it as `Authorization: Bearer <token>`.")  # fmt: skip
    if credentials is None:
        raise ApiError(401, "unauthorized", "Send `Authorization: Bearer <token>` with the XRAY_API_TOKEN value.",
                       headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
    if not secrets.compare_digest(credentials.credentials.encode(), settings.api_token.encode()):
        raise ApiError(403, "forbidden", "The bearer token does not match XRAY_API_TOKEN.")


SettingsDep = Annotated[Settings, Depends(get_settings)]
LimitsDep = Annotated[DecodeLimits, Depends(get_limits)]
PredictorDep = Annotated[Predictor, Depends(get_predictor)]
JobsDep = Annotated[TrainingJobs, Depends(get_jobs)]
ScorerDep = Annotated[Scorer, Depends(get_scorer)]
TokenRequired = Depends(require_token)
