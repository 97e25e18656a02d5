"""FastAPI routes, kept thin: decoding, inference, explanation and jobs live in their own modules.

Every failure answers JSON `{"error": code, "detail": sentence}`; model work runs in
the thread pool so the event loop keeps accepting requests.
"""

from __future__ import annotations

import base64
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from xray.config import load_config
from xray.decoding import DecodeError, DecodeLimits, decode_image
from xray.explain import explain
from xray.inference import ModelHolder, Prediction, Predictor
from xray.jobs import JobConflictError, TrainingJobs
from xray.settings import Settings
from xray.storage import StorageError, open_storage

logger = logging.getLogger(__name__)

PAGE = Path(__file__).parent / "static" / "index.html"
BatchPredict = Callable[[list[Image.Image]], Awaitable[list[Prediction]]]
bearer = HTTPBearer(auto_error=False, description="XRAY_API_TOKEN")


class ApiError(Exception):
    """An error answered as JSON with a status, a stable code and a sentence."""

    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None) -> None:  # fmt: skip
        super().__init__(detail)
        self.status, self.error, self.detail, self.headers, self.extra = status, error, detail, headers, extra or {}


def error_response(status: int, error: str, detail: str, headers=None, extra=None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail, **(extra or {})}, status_code=status, headers=headers)


# --- dependencies -----------------------------------------------------------------------------------------------


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


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
    return request.app.state.jobs


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


async def read_upload(upload: UploadFile, limits: DecodeLimits) -> Image.Image:
    """Read at most the size limit (plus one byte, to detect more) and decode in the thread pool."""
    data = await upload.read(limits.max_bytes + 1)
    return await run_in_threadpool(decode_image, data, limits)


# --- the application ---------------------------------------------------------------------------------------------


def create_app(
    settings: Settings | None = None,
    holder: ModelHolder | None = None,
    jobs: TrainingJobs | None = None,
    load_model: bool = True,
    batch_predict: BatchPredict | None = None,
) -> FastAPI:
    """The API. BentoML passes its own holder and an adaptive-batching `batch_predict`."""
    settings = settings or Settings.from_environment()
    holder = holder or ModelHolder()
    page_html = PAGE.read_text()
    limits = DecodeLimits(max_bytes=settings.max_upload_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if load_model and holder.current is None:
            try:
                await run_in_threadpool(holder.load_production, app.state.storage, settings.model_cache_dir)
            except Exception as error:  # the service still starts and explains itself on /predict
                logger.error("could not load the production model: %s", error)
                app.state.load_error = str(error)
        yield

    app = FastAPI(title="xray", version="0.1.0", lifespan=lifespan,
                  description="Chest X-ray pneumonia classifier: predictions, Grad-CAM explanations, retraining.")
    app.state.settings = settings
    app.state.holder = holder
    app.state.load_error = None
    app.state.storage = None
    try:
        app.state.storage = open_storage(settings.storage_uri)
    except StorageError as error:
        app.state.load_error = str(error)
        logger.error("storage unavailable: %s", error)

    def promoted(result) -> None:
        holder.swap(Predictor.from_package(result.package_dir))

    if jobs is None and app.state.storage is not None:
        jobs = TrainingJobs(lambda: load_config(settings.config_path), app.state.storage, on_promoted=promoted)
    app.state.jobs = jobs

    async def predict_images(predictor: Predictor, images: list[Image.Image]) -> list[Prediction]:
        if batch_predict is not None:
            return await batch_predict(images)
        return await run_in_threadpool(predictor.predict, images)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.error, error.detail, error.headers, error.extra)

    @app.exception_handler(DecodeError)
    async def decode_error(request: Request, error: DecodeError) -> JSONResponse:
        return error_response(error.status, error.code, error.detail)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        fields = ", ".join(".".join(str(part) for part in item["loc"][1:]) or "body" for item in error.errors())
        return error_response(422, "invalid_request", f"Missing or invalid field(s): {fields}. Send the image as "
                                                      "multipart form data in the field named `file`.")  # fmt: skip

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return error_response(error.status_code, codes.get(error.status_code, "http_error"), str(error.detail))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(page_html)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness, and whether a model is loaded."""
        predictor = holder.current
        return {"status": "ok", "model_loaded": predictor is not None,
                "model_version": predictor.version if predictor else None}  # fmt: skip

    @app.get("/model")
    async def model(predictor: Annotated[Predictor, Depends(get_predictor)]) -> dict[str, Any]:
        """The model card of the model in service."""
        return predictor.card.to_dict()

    @app.post("/predict")
    async def predict(file: Annotated[UploadFile, File(description="a chest X-ray: JPEG, PNG or DICOM")],
                      predictor: Annotated[Predictor, Depends(get_predictor)]) -> dict[str, Any]:  # fmt: skip
        """Label and P(PNEUMONIA) for one X-ray."""
        image = await read_upload(file, limits)
        started = time.perf_counter()
        prediction = (await predict_images(predictor, [image]))[0]
        return {**prediction.to_dict(), "inference_ms": round((time.perf_counter() - started) * 1000, 2)}

    @app.post("/predict/batch")
    async def predict_batch(
        files: Annotated[list[UploadFile], File(description="several X-rays")],
        predictor: Annotated[Predictor, Depends(get_predictor)],
    ) -> list[dict[str, Any]]:
        """One result per file, in order; a bad file gets its own error and does not fail the others."""
        if len(files) > settings.max_batch_files:
            raise ApiError(413, "too_many_files", f"{len(files)} files sent; at most {settings.max_batch_files} "
                                                  "per batch (XRAY_MAX_BATCH_FILES).")  # fmt: skip
        results: list[dict[str, Any]] = []
        images, positions = [], []
        for position, upload in enumerate(files):
            try:
                images.append(await read_upload(upload, limits))
                positions.append(position)
                results.append({})
            except DecodeError as error:
                results.append({"filename": upload.filename, "error": error.code, "detail": error.detail,
                                "status": error.status})  # fmt: skip
        started = time.perf_counter()
        predictions = await predict_images(predictor, images) if images else []
        elapsed = round((time.perf_counter() - started) * 1000, 2)
        for position, prediction in zip(positions, predictions, strict=True):
            results[position] = {"filename": files[position].filename, **prediction.to_dict(), "inference_ms": elapsed}
        return results

    @app.post("/explain", responses={200: {"content": {"image/png": {}}}})
    async def explain_route(file: Annotated[UploadFile, File(description="a chest X-ray: JPEG, PNG or DICOM")],
                            predictor: Annotated[Predictor, Depends(get_predictor)],
                            format: Annotated[str, Query(pattern="^(json|png)$")] = "json") -> Any:  # fmt: skip
        """Grad-CAM heatmap over the X-ray (PNG) with the prediction: JSON with a data URL, or `?format=png`."""
        image = await read_upload(file, limits)
        started = time.perf_counter()
        png, prediction = await run_in_threadpool(explain, predictor, image)
        elapsed = round((time.perf_counter() - started) * 1000, 2)
        if format == "png":
            return Response(png, media_type="image/png", headers={
                "X-Prediction-Label": prediction.label, "X-Prediction-Probability": str(prediction.probability),
                "X-Model-Version": prediction.model_version})  # fmt: skip
        return {**prediction.to_dict(), "inference_ms": elapsed,
                "heatmap_png": "data:image/png;base64," + base64.b64encode(png).decode()}  # fmt: skip

    @app.get("/train", status_code=202, dependencies=[Depends(require_token)])
    async def train(request: Request, jobs: Annotated[TrainingJobs | None, Depends(get_jobs)]) -> dict[str, Any]:
        """Start retraining on the data in storage, in the background."""
        if jobs is None:
            raise ApiError(503, "storage_unavailable", f"Training needs storage: {request.app.state.load_error}")
        try:
            job = await run_in_threadpool(jobs.start)
        except JobConflictError as conflict:
            raise ApiError(409, "training_in_progress", str(conflict), extra={
                "job_id": conflict.job.job_id, "status_url": f"/train/{conflict.job.job_id}",
                "job": conflict.job.to_dict()}) from None  # fmt: skip
        return {"job_id": job.job_id, "status_url": f"/train/{job.job_id}", "status": job.status}

    @app.get("/train/{job_id}", dependencies=[Depends(require_token)])
    async def train_status(job_id: str, jobs: Annotated[TrainingJobs | None, Depends(get_jobs)]) -> dict[str, Any]:
        """Stage, epoch, metrics so far, and the outcome of a training job."""
        job = jobs.get(job_id) if jobs else None
        if job is None:
            raise ApiError(404, "job_not_found", f"No training job {job_id!r} on this server.")
        return job.to_dict()

    return app
