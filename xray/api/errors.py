"""One voice for errors: every failure answers JSON `{"error": code, "detail": sentence}`."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from xray.decoding import DecodeError

HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}

ERROR_CODES: dict[str, str] = {
    # code: what it means. Every `error` the API answers is one of these or a decoding code (ERROR_STATUSES).
    "invalid_request": "a form field or query parameter is missing or invalid; the detail names it",
    "not_found": "no such route",
    "method_not_allowed": "the route exists, with another method",
    "http_error": "another HTTP-level refusal",
    "too_many_files": "a /predict/batch request over XRAY_MAX_BATCH_FILES",
    "model_not_ready": "no model is loaded yet",
    "not_ready": "GET /ready: no model is in service yet; the detail says why",
    "storage_unavailable": "storage could not be reached",
    "training_disabled": "XRAY_API_TOKEN is not set, so training over HTTP is off",
    "unauthorized": "no bearer token sent",
    "forbidden": "the bearer token is wrong",
    "training_in_progress": "a training job is already running",
    "job_not_found": "no training job with that id",
    "overloaded": "the server is at capacity",
    "inference_failed": "the model could not score an image",
}
"""The error codes of the API (with DecodeError's, `xray.decoding.ERROR_STATUSES`); the README's must be here."""

class ApiError(Exception):
    """An error answered as JSON with a status, a stable code and a sentence."""

    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None) -> None:  # fmt: skip
        super().__init__(detail)
        self.status, self.error, self.detail, self.headers, self.extra = status, error, detail, headers, extra or {}


def error_response(status: int, error: str, detail: str, headers=None, extra=None) -> JSONResponse:
    """The JSON body every error shares."""
    return JSONResponse({"error": error, "detail": detail, **(extra or {})}, status_code=status, headers=headers)


def describe_invalid_request(error: RequestValidationError) -> str:
    """One sentence naming each missing or invalid field as the client sent it: form field or query parameter."""
    problems = []
    for item in error.errors():
        where, *path = item.get("loc", ("body",))
        name = ".".join(str(part) for part in path) or str(where)
        missing = item.get("type") == "missing"
        if where == "query":
            given = "" if missing else f" (got {item.get('input')!r})"
            problems.append(f"the query parameter `{name}` is {'missing' if missing else 'invalid'}{given}: "
                            f"{item.get('msg', 'invalid value')}")  # fmt: skip
        elif where == "body":
            images = "images" if name == "files" else "image"
            problems.append(f"the multipart form field `{name}` is {'missing' if missing else 'invalid'}: "
                            f"send the {images} in a form field named `{name}`")  # fmt: skip
        else:
            problems.append(f"the {where} value `{name}` is invalid: {item.get('msg', 'invalid value')}")
    return ("Invalid request: " + "; ".join(problems) + ".") if problems else "Invalid request."


def describe_unreadable_form(reason: str) -> str:
    """A multipart body the server could not parse (Starlette's 400), with what to send instead."""
    return (f"Invalid request: the multipart form could not be read ({reason.rstrip('.')}): send each image as a "
            "file part named `file` (`files` for /predict/batch), one image per part.")


def install_error_handlers(app: FastAPI) -> None:
    """Turn every known failure into the shared JSON shape."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.error, error.detail, error.headers, error.extra)

    @app.exception_handler(DecodeError)
    async def decode_error(request: Request, error: DecodeError) -> JSONResponse:
        return error_response(error.status, error.code, error.detail)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", describe_invalid_request(error))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 400 and request.headers.get("content-type", "").lower().startswith("multipart/"):
            return error_response(400, "invalid_request", describe_unreadable_form(str(error.detail)))
        return error_response(error.status_code, HTTP_CODES.get(error.status_code, "http_error"), str(error.detail))
