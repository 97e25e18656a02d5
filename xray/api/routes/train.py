"""Retraining over HTTP, behind the API token: jobs live in storage, so any instance answers for any job."""

from __future__ import annotations

import logging

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from xray.api.deps import JobsDep, TokenRequired
from xray.api.errors import ApiError
from xray.api.schemas import ErrorResponse, JobResponse, JobStarted
from xray.jobs import JobConflictError
from xray.storage import StorageError

logger = logging.getLogger(__name__)

router = APIRouter(tags=["training"], dependencies=[TokenRequired], responses={
    401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})  # fmt: skip


@router.get("/train", status_code=202, response_model=JobStarted, responses={409: {"model": ErrorResponse}})
async def train(jobs: JobsDep) -> JobStarted:
    """Start retraining on the data in storage, in a training process; 409 while any instance trains."""
    try:
        job = await run_in_threadpool(jobs.start)
    except StorageError as error:
        raise storage_unavailable(error) from None
    except JobConflictError as conflict:
        raise ApiError(409, "training_in_progress", str(conflict), extra={
            "job_id": conflict.job.job_id, "status_url": f"/train/{conflict.job.job_id}",
            "job": conflict.job.to_dict()}) from None  # fmt: skip
    return JobStarted(job_id=job.job_id, status_url=f"/train/{job.job_id}", status=job.status)


@router.get("/train/{job_id}", response_model=JobResponse, responses={404: {"model": ErrorResponse}})
async def train_status(job_id: str, jobs: JobsDep) -> JobResponse:
    """Stage, epoch, metrics so far, and the outcome of a training job (from storage: any instance answers)."""
    try:
        job = await run_in_threadpool(jobs.get, job_id)
    except StorageError as error:
        raise storage_unavailable(error) from None
    if job is None:
        raise ApiError(404, "job_not_found", f"No training job {job_id[:40]!r} in storage.")
    return JobResponse(**job.to_dict())


def storage_unavailable(error: StorageError) -> ApiError:
    """503 naming the problem; the storage's own message (URIs, endpoints) goes to the log only."""
    logger.error("training jobs: %s", error)
    return ApiError(503, "storage_unavailable", "Model storage cannot be reached; retry shortly.",
                    headers={"Retry-After": "5"})  # fmt: skip
