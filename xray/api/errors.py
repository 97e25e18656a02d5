"""One voice for errors: every failure answers JSON `{"error": code, "detail": sentence}`."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from xray.decoding import DecodeError

HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


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
    """Name the missing or invalid fields, as the client sent them."""
    fields = ", ".join(".".join(str(part) for part in item["loc"][1:]) or "body" for item in error.errors())
    return (f"Missing or invalid field(s): {fields}. Send the image as multipart form data in the field named "
            "`file`.")  # fmt: skip


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
        return error_response(error.status_code, HTTP_CODES.get(error.status_code, "http_error"), str(error.detail))
