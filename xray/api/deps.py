"""Request dependencies and their `Annotated` aliases: the routes ask for what they need by type.

Every dependency is `async def`: none of them blocks, and FastAPI runs a plain `def` dependency on a
thread of its pool, a hand-off per dependency per request that cost the event loop measurably under
load (README, "Serving predictions").
"""

from __future__ import annotations

import asyncio
import functools
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
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
Explainer = Callable[[Predictor, np.ndarray], Awaitable[tuple[bytes, Prediction]]]
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


def overloaded(error: QueueFullError) -> ApiError:
    """The one answer to shed load (/predict's full queue, /explain's taken slots): 503 `overloaded`, Retry-After."""
    return ApiError(503, "overloaded", f"The server is at capacity ({error}); retry in a moment.",
                    headers={"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip


async def get_scorer(request: Request) -> Scorer:
    """How routes score model-size pixels: through the predictor's micro-batcher, shedding load when it is full."""

    async def score(predictor: Predictor, pixels: list[np.ndarray]) -> list[Prediction]:
        try:
            return await predictor.predict_pixels_async(pixels)
        except QueueFullError as error:
            raise overloaded(error) from None

    return score


class ExplanationSlots:
    """At most `limit` explanations in progress (decoding, waiting for Grad-CAM or running it); more are refused.

    Grad-CAM runs one explanation at a time (`explanation_pool`), under the model's lock that a torch
    forward pass of /predict also takes: without a bound every caller waits, its upload held, for
    as long as the queue grows. Taken and freed on the event loop only, so a plain count needs no lock.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.taken = 0

    def take(self) -> None:
        """Hold a slot; QueueFullError (answered as 503 `overloaded`) when all are taken."""
        if self.taken >= self.limit:
            raise QueueFullError(f"{self.taken} explanations already in progress "
                                 f"(at most {self.limit}, XRAY_MAX_QUEUED_EXPLANATIONS)")  # fmt: skip
        self.taken += 1

    def free(self) -> None:
        self.taken -= 1


async def explanation_slot(request: Request) -> AsyncIterator[None]:
    """A slot held around the /explain route (decode, Grad-CAM) before any work; 503 `overloaded` when none is free."""
    slots: ExplanationSlots = request.app.state.explanations
    try:
        slots.take()
    except QueueFullError as error:
        raise overloaded(error) from None
    try:
        yield
    finally:
        slots.free()


@functools.cache
def explanation_pool() -> ThreadPoolExecutor:
    """The one thread Grad-CAM runs on: explanations take turns there, not on the model's lock from many threads."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="xray-explain")


def explain_on_this_thread(predictor: Predictor, pixels: np.ndarray) -> tuple[bytes, Prediction]:
    """Grad-CAM's overlay and prediction; torch and matplotlib load here with the first one, off the event loop."""
    from xray.explain import explain

    return explain(predictor, pixels)


async def get_explainer(request: Request) -> Explainer:
    """How routes explain model-size pixels: Grad-CAM's PNG overlay and prediction, one explanation at a time."""

    async def explain(predictor: Predictor, pixels: np.ndarray) -> tuple[bytes, Prediction]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(explanation_pool(), explain_on_this_thread, predictor, pixels)

    return explain


async def one_file(request: Request) -> None:
    """/predict and /explain score one image: several `file` parts would silently score only the last."""
    count = len((await request.form()).getlist("file"))  # the form FastAPI parsed, cached on the request
    if count > 1:
        raise ApiError(422, "invalid_request", f"Invalid request: the multipart form field `file` was sent {count} "
                                               "times; send one image (several go to /predict/batch, in `files`).")


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
ExplainerDep = Annotated[Explainer, Depends(get_explainer)]
TokenRequired = Depends(require_token)
OneFile = Depends(one_file)
ExplanationSlot = Depends(explanation_slot, scope="function")  # freed when the route returns, before the answer
