"""The HTTP API: thin routers over the inference core, the explainer and the training jobs."""

from xray.api.app import create_app
from xray.api.errors import ApiError

__all__ = ["ApiError", "create_app"]
