"""Request dependencies and their `Annotated` aliases: the routes ask for what they need by type.

Every dependency is `async def`: none of them blocks, and FastAPI runs a plain `def` dependency on a
thread of its pool, a hand-off per dependency per request that cost the event loop measurably under
load (README, "Serving predictions").
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import Annotated

import numpy as np
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from xray.api.errors import ApiError
from xray.batching import QueueFullError
from xray.decoding import DecodeLimits
from xray.inference import Prediction, Predictor
from xray.jobs import TrainingJobs
from xray.rollout import NOT_PROMOTED
from xray.settings import Settings

Scorer = Callable[[Predictor, list[np.ndarray]], Awaitable[list[Prediction]]]
RETRY_AFTER_S = 1
bearer = HTTPBearer(auto_error=False, description="XRAY_API_TOKEN")


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_limits(request: Request) -> DecodeLimits:
    return request.app.state.limits


def not_ready_reason(request: Request) -> str:
    """Why no model is in service, in words for anonymous callers (no paths, URIs or credentials)."""
    follower = request.app.state.follower
    if follower is not None and follower.problem:
        return follower.problem
    return request.app.state.load_error or "no model has been loaded"


async def get_predictor(request: Request) -> Predictor:
    """The model in service, or 503 saying why there is none and how to get one."""
    predictor = request.app.state.holder.current
    if predictor is None:
        reason = not_ready_reason(request)
        detail = f"No model in service: {reason}."
        if reason == NOT_PROMOTED:
            seconds = request.app.state.settings.model_poll_seconds
            detail += (" Train one with `python -m xray train` (or GET /train with the API token); this instance "
                       f"loads it within {seconds:g} s of its promotion (XRAY_MODEL_POLL_SECONDS).")  # fmt: skip
        raise ApiError(503, "model_not_ready", detail, headers={"Retry-After": "5"})
    return predictor


async def get_jobs(request: Request) -> TrainingJobs:
    """The training jobs, or 503 when storage could not be opened."""
    jobs = request.app.state.jobs
    if jobs is None:
        raise ApiError(503, "storage_unavailable", f"Training needs model storage: {not_ready_reason(request)}.")
    return jobs


async def get_scorer(request: Request) -> Scorer:
    """How routes score model-size pixels: through the predictor's micro-batcher, shedding load when it is full."""

    async def score(predictor: Predictor, pixels: list[np.ndarray]) -> list[Prediction]:
        try:
            return await predictor.predict_pixels_async(pixels)
        except QueueFullError as error:
            raise ApiError(503, "overloaded", f"The server is at capacity ({error}); retry in a moment.",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None  # fmt: skip

    return score


async def require_token(
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
