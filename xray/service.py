"""The BentoML service: every route of `python app.py`, in the same process as their micro-batcher.

`bentoml serve` (at the repo root, via bentofile.yaml) serves the FastAPI app of
`xray.api` unchanged, so `/predict`, `/predict/batch`, `/explain`, `/health`, `/model`,
`/train` and `/docs` answer exactly as they do under uvicorn, with the same upload limits and
the same micro-batcher (`xray.batching`, one worker thread owning the model). The difference:
the model comes from the BentoML model store (`xray-pneumonia:latest`, saved there by the
pusher), not from `production.json` in storage; with none there the service still starts and
`/predict` answers 503, as the plain app does.

Why no `@bentoml.api` (no batchable `classify`): BentoML's adaptive batcher lives in the HTTP
handler of such an API, so the app could only reach it by serialising every decoded image and
posting it to itself; the images travelled as PNGs re-encoded at every hop, and the API was a
public route (`POST /classify`) that skipped every upload check. Our batcher already forms
batches of up to 16 model-size arrays within a few milliseconds, in-process and without
serialisation, so the Bento uses it and exposes no such route: `/classify` answers 404.

Routing, as BentoML 1.4 builds it (`_bentoml_impl/server/app.py`): its system routes
(`/livez`, `/healthz`, `/readyz`, `/metrics`, `/schema.json`) first, then the mounted ASGI apps,
then its index page and assets. A mounted Starlette app is a `PassiveMount`, matching only the
paths it has, so an unknown path fell through to Starlette's plain-text 404. A mount of an app
that is not a Starlette instance is an ordinary `Mount`, which at "/" matches every path: the
`JsonNotFound` wrapper mounted after the app hands each remaining path to the app, whose router
answers the API's JSON 404 (or 405). The FastAPI app itself stays mounted first, as a Starlette
app, so BentoML still runs its lifespan.
"""

import logging
import os
import sys

import bentoml
from bentoml.exceptions import NotFound
from starlette.types import ASGIApp, Receive, Scope, Send

from xray.api import create_app
from xray.config import ConfigError, load_config
from xray.inference import ModelHolder, Predictor, use_serving_threads
from xray.settings import Settings

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "xray-pneumonia"
# BentoML's OpenTelemetry middleware records a span for every ASGI message of a request, sampled or
# not (its sampler always records): for an upload of a few 64 KiB chunks that was a fifth of the event
# loop's time at 32 clients. The image routes are left out of it; the others keep their spans, and
# BentoML's access log and Prometheus metrics still cover every route. (Regular expressions, searched.)
UNTRACED_ROUTES = ["/predict", "/explain"]

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


class JsonNotFound:
    """A plain ASGI wrapper (not a Starlette app) around the API, so BentoML mounts it as a catch-all."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


try:
    settings = Settings.from_environment()
except ConfigError as error:  # `bentoml serve` imports this module: one sentence and status 2, not a traceback
    print(f"error: {error}", file=sys.stderr)
    raise SystemExit(2) from None
app = create_app(settings, holder=holder, load_model=False)


@bentoml.asgi_app(JsonNotFound(app), path="/", name="json-not-found")
@bentoml.asgi_app(app, path="/")
@bentoml.service(name="xray", traffic={"timeout": 120}, tracing={"excluded_urls": UNTRACED_ROUTES})
class XrayService:
    """Chest X-ray pneumonia classifier: the xray FastAPI routes, batched by the inference core's micro-batcher."""

    def __init__(self) -> None:
        """Load the latest model from the BentoML model store into the shared holder, if there is one."""
        self.holder = holder
        tag = model_tag()
        try:
            stored = bentoml.models.get(tag)
            use_serving_threads(settings)  # this process serves: torch threads set before the model loads
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
