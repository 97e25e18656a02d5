"""`create_app`: the FastAPI application with its state, error handlers and routers."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from xray.api.deps import BatchPredict
from xray.api.errors import install_error_handlers
from xray.api.routes import explain, health, predict, train
from xray.config import load_config
from xray.decoding import DecodeLimits
from xray.inference import ModelHolder, Predictor
from xray.jobs import TrainingJobs
from xray.settings import Settings
from xray.storage import StorageError, open_storage

logger = logging.getLogger(__name__)

PAGE = Path(__file__).resolve().parents[1] / "static" / "index.html"


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

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if load_model and holder.current is None and app.state.storage is not None:
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
    app.state.limits = DecodeLimits(max_bytes=settings.max_upload_bytes)
    app.state.batch_predict = batch_predict
    app.state.page_html = PAGE.read_text()
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

    install_error_handlers(app)
    for router in (health.router, predict.router, explain.router, train.router):
        app.include_router(router)
    return app
