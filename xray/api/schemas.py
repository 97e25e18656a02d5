"""Response models: what each route answers, so /docs shows the real shapes."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx."""

    error: str = Field(description="stable machine-readable code, e.g. `unsupported_media_type`")
    detail: str = Field(description="one sentence saying what went wrong and what to do")


class PredictionResponse(BaseModel):
    """One X-ray's label and calibrated probability."""

    label: str = Field(description="NORMAL or PNEUMONIA")
    probability: float = Field(description="calibrated P(PNEUMONIA)")
    threshold: float = Field(description="the model's decision threshold on `probability`")
    probabilities: dict[str, float]
    model_version: str
    inference_ms: float = Field(description="time spent scoring, in milliseconds")


class BatchItem(BaseModel):
    """One file of a batch: a prediction, or that file's own error."""

    filename: str | None = None
    label: str | None = None
    probability: float | None = None
    threshold: float | None = None
    probabilities: dict[str, float] | None = None
    model_version: str | None = None
    inference_ms: float | None = None
    error: str | None = None
    detail: str | None = None
    status: int | None = None


class ExplanationResponse(PredictionResponse):
    """A prediction with its Grad-CAM heatmap."""

    heatmap_png: str = Field(description="the X-ray with the heatmap overlaid, as a PNG data URL")


class HealthResponse(BaseModel):
    """Liveness, and the model in service if any."""

    status: str
    model_loaded: bool
    model_version: str | None


class JobStarted(BaseModel):
    """A training job that was just started."""

    job_id: str
    status_url: str
    status: str


class JobResponse(BaseModel):
    """Stage, epoch, metrics so far and the outcome of a training job."""

    job_id: str
    status: str
    stage: str | None = None
    run_id: str | None = None
    epoch: int | None = None
    epochs: int | None = None
    history: list[dict[str, Any]] = []
    outcome: dict[str, Any] | None = None
    error: str | None = None
    created_at: str
    finished_at: str | None = None
