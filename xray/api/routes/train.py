"""Retraining over HTTP, behind the API token."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from xray.api.deps import JobsDep, TokenRequired
from xray.api.errors import ApiError
from xray.api.schemas import ErrorResponse, JobResponse, JobStarted
from xray.jobs import JobConflictError

router = APIRouter(tags=["training"], dependencies=[TokenRequired], responses={
    401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})  # fmt: skip


@router.get("/train", status_code=202, response_model=JobStarted, responses={409: {"model": ErrorResponse}})
async def train(jobs: JobsDep) -> JobStarted:
    """Start retraining on the data in storage, in the background."""
    try:
        job = await run_in_threadpool(jobs.start)
    except JobConflictError as conflict:
        raise ApiError(409, "training_in_progress", str(conflict), extra={
            "job_id": conflict.job.job_id, "status_url": f"/train/{conflict.job.job_id}",
            "job": conflict.job.to_dict()}) from None  # fmt: skip
    return JobStarted(job_id=job.job_id, status_url=f"/train/{job.job_id}", status=job.status)


@router.get("/train/{job_id}", response_model=JobResponse, responses={404: {"model": ErrorResponse}})
async def train_status(job_id: str, jobs: JobsDep) -> JobResponse:
    """Stage, epoch, metrics so far, and the outcome of a training job."""
    job = jobs.get(job_id)
    if job is None:
        raise ApiError(404, "job_not_found", f"No training job {job_id!r} on this server.")
    return JobResponse(**job.to_dict())
