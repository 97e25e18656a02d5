"""The BentoML service: every route of `python app.py`, with predictions batched adaptively.

`bentoml serve` (at the repo root, via bentofile.yaml) serves the FastAPI app of
`xray.api` unchanged, so `/predict`, `/predict/batch`, `/explain`, `/health`, `/model`,
`/train` and `/docs` answer exactly as they do under uvicorn. The differences:

- the model comes from the BentoML model store (`xray-pneumonia:latest`, saved there by
  the pusher), not from `production.json` in storage; with none there the service still
  starts and `/predict` answers 503, as the plain app does;
- `/predict` and `/predict/batch` send their decoded images through `classify`, a
  batchable BentoML API, so concurrent requests share one forward pass.

Routing, as BentoML 1.4 builds it (`_bentoml_impl/server/app.py`): the system routes
(`/livez`, `/healthz`, `/readyz`, `/metrics`) and one POST route per `@bentoml.api` come
first, then the mounted ASGI apps (`PassiveMount`: matches only paths the mounted app
has), then BentoML's own index page. An API named `predict` would therefore shadow the
FastAPI `/predict`; the batchable API is called `classify` (POST /classify) instead. A path
neither knows gets BentoML's plain-text 404, not the app's JSON one.

Batching: BentoML's adaptive batcher sits in the HTTP handler of a batchable API, not in
the method, so calling `self.classify.local(...)` would bypass it. In a served instance
BentoML points `self.classify` and `self.to_async.classify` at a client of this same app
over an in-process ASGI connector, which goes through that handler and joins the batch
queue; for a sync API `self.classify` is the blocking client, so an async caller must use
`self.to_async`. The images travel as small lossless PNGs already resized to the model's
input size (resizing again is then the identity), so the probabilities equal the direct
path's; the hop costs a few milliseconds per request.
"""

import io
import logging
import os
from typing import Any

import bentoml
from bentoml.exceptions import BentoMLException, NotFound, ServiceUnavailable
from PIL import Image
from starlette.concurrency import run_in_threadpool

from xray.api import ApiError, create_app
from xray.config import ConfigError, load_config
from xray.inference import ModelHolder, Prediction, Predictor
from xray.settings import Settings

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "xray-pneumonia"
MAX_BATCH_SIZE = 32  # images per forward pass; ResNet-18 at 224 px, 2 CPU cores: about 0.5 s at 32
MAX_LATENCY_MS = 10_000  # a queued request older than this is refused with 503 by the batcher

# bentoml 1.4.39's client (`_bentoml_impl/client/proxy2.py`, SessionManager), which `self.to_async`
# is, replaces its aiohttp session every `max_requests` calls or `max_age` seconds (100 and
# 300 s by default) by closing the old one, killing the calls still in flight on it: under
# 32 concurrent clients about half of /predict failed with ServerDisconnectedError. Calls to
# this same app go over an in-process ASGI connector with no socket to recycle: never refresh.
SELF_CLIENT_SESSION = {"max_requests": 2**62, "max_age": 1e12}

holder = ModelHolder()


def model_tag() -> str:
    """The model to serve: XRAY_BENTOML_MODEL (`name` or `name:version`), else the config's pusher name.

    A bare name means its latest version, the one the pusher saved last.
    """
    settings = Settings.from_environment()
    tag = settings.bentoml_model
    if not tag:
        try:
            tag = load_config(settings.config_path).pusher.bentoml_model_name
        except ConfigError as error:
            logger.warning("using model name %s: %s", DEFAULT_MODEL_NAME, error)
            tag = DEFAULT_MODEL_NAME
    return tag if ":" in tag else f"{tag}:latest"


def as_png(predictor: Predictor, image: Image.Image) -> Image.Image:
    """The model-sized grayscale pixels as a lazily opened in-memory PNG, its file rewound.

    BentoML's client uploads an image by streaming `image.fp` from its current position,
    so the image must come from a file (an array-made image has none) and that file must
    be rewound after `Image.open` read the header. The image is never loaded here.
    """
    buffer = io.BytesIO()
    Image.fromarray(predictor.prepare(image), mode="L").save(buffer, format="PNG", compress_level=1)
    buffer.seek(0)
    png = Image.open(buffer, formats=["PNG"])
    buffer.seek(0)
    return png


async def batch_predict(images: list[Image.Image]) -> list[Prediction]:
    """The FastAPI app's prediction hook: through BentoML's adaptive batcher when served by BentoML."""
    try:
        service = bentoml.get_current_service()
    except BentoMLException:  # the app used outside `bentoml serve`
        service = None
    predictor = holder.current
    if predictor is None:
        raise ApiError(503, "model_not_ready", "No model has been promoted yet.")
    if service is None or not hasattr(service, "to_async"):
        return await run_in_threadpool(predictor.predict, images)
    pngs = await run_in_threadpool(lambda: [as_png(predictor, image) for image in images])
    try:
        results: list[dict[str, Any]] = await service.to_async.classify(images=pngs)
    except ServiceUnavailable as error:
        logger.warning("batched inference refused: %s", error)
        raise ApiError(503, "overloaded", "The server is at capacity; retry shortly.",
                       headers={"Retry-After": "1"}) from error  # fmt: skip
    except BentoMLException as error:
        logger.error("batched inference failed: %s", error)
        raise ApiError(500, "inference_failed", "The model could not score this image; see the server log.") from error
    return [Prediction(**result) for result in results]


app = create_app(holder=holder, load_model=False, batch_predict=batch_predict)


@bentoml.asgi_app(app, path="/")
@bentoml.service(name="xray", traffic={"timeout": 120}, runner_connection=SELF_CLIENT_SESSION)
class XrayService:
    """Chest X-ray pneumonia classifier: the xray FastAPI routes plus a batchable `classify` API."""

    def __init__(self) -> None:
        """Load the latest model from the BentoML model store into the shared holder, if there is one."""
        self.holder = holder
        tag = model_tag()
        try:
            stored = bentoml.models.get(tag)
            predictor = Predictor.from_package(stored.path)
        except NotFound:
            home = os.environ.get("BENTOML_HOME", "~/bentoml")
            app.state.load_error = f"no model {tag} in the BentoML model store (BENTOML_HOME={home})"
            logger.warning("%s: /predict answers 503 until a model is promoted", app.state.load_error)
            return
        except Exception as error:  # a broken package: start anyway and say why on /predict, never serve other weights
            app.state.load_error = f"model {tag} could not be loaded: {error}"
            logger.error("%s", app.state.load_error)
            return
        holder.swap(predictor)
        logger.info("serving %s (version %s) from the BentoML model store", stored.tag, predictor.version)

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def classify(self, images: list[Image.Image]) -> list[dict[str, Any]]:
        """P(PNEUMONIA), label and model version per image: one forward pass per adaptive batch."""
        predictor = self.holder.current
        if predictor is None:
            raise ServiceUnavailable("No model has been promoted yet; train one with `python -m xray train`.")
        return [prediction.to_dict() for prediction in predictor.predict(images)]
