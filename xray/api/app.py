"""`create_app`: the FastAPI application with its state, error handlers and routers."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from xray.api.deps import ExplanationSlots
from xray.api.errors import install_error_handlers
from xray.api.limits import RequestSizeLimit
from xray.api.routes import explain, health, predict, train
from xray.config import ConfigError, PusherConfig, load_config
from xray.decoding import DecodeLimits
from xray.inference import ModelHolder, use_serving_threads
from xray.jobs import TrainingJobs
from xray.logs import quiet_libraries
from xray.rollout import ProductionFollower
from xray.settings import Settings
from xray.storage import StorageError, open_storage

logger = logging.getLogger(__name__)

PAGE = Path(__file__).resolve().parents[1] / "static" / "index.html"
STORAGE_ATTEMPTS = 2  # the server's S3 calls: two short tries, then the follower's backoff takes over


def models_prefix(settings: Settings) -> str:
    """Where packages and production.json live: the config's `pusher.models_prefix`, as the pipeline writes them."""
    try:
        return load_config(settings.config_path).pusher.models_prefix
    except ConfigError as error:
        logger.error("%s; looking for models under the default prefix %r", error, PusherConfig.models_prefix)
        return PusherConfig.models_prefix


def create_app(
    settings: Settings | None = None,
    holder: ModelHolder | None = None,
    jobs: TrainingJobs | None = None,
    load_model: bool = True,
) -> FastAPI:
    """The API. BentoML passes its own holder (and loads its own model).

    With `load_model`, the instance follows production in storage from a background thread: the
    first check runs there too (short timeouts), so /health answers before torch and the model load,
    and /ready turns 200 once the model is in service; then a check every XRAY_MODEL_POLL_SECONDS.
    """
    settings = settings or Settings.from_environment()
    holder = holder or ModelHolder()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        follower: ProductionFollower | None = app.state.follower
        if follower is not None:
            follower.start(before=lambda: use_serving_threads(settings))
        try:
            yield
        finally:
            if app.state.jobs is not None:
                await run_in_threadpool(app.state.jobs.stop)
            if follower is not None:
                await run_in_threadpool(follower.stop)

    app = FastAPI(title="xray", version="0.1.0", lifespan=lifespan,
                  description="Chest X-ray pneumonia classifier: predictions, Grad-CAM explanations, retraining.")
    quiet_libraries()  # every way to serve builds the app here: python app.py, uvicorn app:app, bentoml serve
    app.state.settings = settings
    app.state.holder = holder
    app.state.limits = DecodeLimits(max_bytes=settings.max_upload_bytes, max_pixels=settings.max_image_pixels)
    app.state.explanations = ExplanationSlots(settings.max_queued_explanations)
    app.state.page_html = PAGE.read_text()
    app.state.load_error = None
    app.state.storage = None
    app.state.follower = None
    try:
        storage = open_storage(settings.storage_uri)
        app.state.storage = storage.with_timeouts(settings.storage_timeout_seconds, STORAGE_ATTEMPTS)
    except StorageError as error:
        app.state.load_error = "model storage is misconfigured: check XRAY_STORAGE_URI"
        logger.error("storage unavailable: %s", error)

    if load_model and app.state.storage is not None:
        app.state.follower = ProductionFollower(holder, app.state.storage, settings.model_cache_dir,
                                                models_prefix(settings), settings.model_poll_seconds)  # fmt: skip

    def finished(job) -> None:
        if app.state.follower is not None:
            app.state.follower.poke()

    if jobs is None and app.state.storage is not None:
        jobs = TrainingJobs(settings, app.state.storage, on_finished=finished)
    app.state.jobs = jobs

    install_error_handlers(app)
    app.add_middleware(RequestSizeLimit, settings=settings)
    for router in (health.router, predict.router, explain.router, train.router):
        app.include_router(router)
    return app
