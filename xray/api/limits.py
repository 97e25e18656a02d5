"""Request body limits enforced while the bytes arrive, before FastAPI spools a multipart body.

A `Content-Length` over the limit is answered 413 at once, without reading the body; a body
sent without a length (chunked) is counted as it streams and cut off at the limit. Either way
the answer is the API's JSON `{error, detail}`. Single-image routes allow one upload of
XRAY_MAX_UPLOAD_BYTES plus the multipart framing; `/predict/batch` allows
XRAY_MAX_BATCH_REQUEST_BYTES.
"""

from __future__ import annotations

import json
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from xray.settings import Settings

logger = logging.getLogger(__name__)

MULTIPART_ALLOWANCE = 64 * 1024
"""Bytes of multipart framing (boundaries, part headers, other fields) allowed beside one upload."""


class BodyTooLargeError(Exception):
    """Raised to the application when the streamed body passes the limit."""


class RequestSizeLimit:
    """ASGI middleware: 413 JSON for request bodies over the route's limit, before the body is read."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def limit_for(self, path: str) -> int:
        """The largest body `path` accepts, in bytes."""
        if path.rstrip("/").endswith("/predict/batch"):
            return self.settings.max_batch_request_bytes
        return self.settings.max_upload_bytes + MULTIPART_ALLOWANCE

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = declared_length(scope)
        if declared is not None and declared > limit:
            logger.info("refused a %d-byte body to %s before reading it (limit %d)", declared, scope["path"], limit)
            await answer_too_large(send, declared, limit)
            return
        received = 0
        exceeded = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise BodyTooLargeError(f"request body passed {limit} bytes")
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:  # whatever the app makes of the cut-off body, the client hears 413
                if not started and message["type"] == "http.response.start":
                    started = True
                    await answer_too_large(send, None, limit)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except BodyTooLargeError:
            if not started:
                await answer_too_large(send, None, limit)
        if exceeded:
            logger.info("cut off a body without a usable length to %s at %d bytes", scope["path"], limit)


def declared_length(scope: Scope) -> int | None:
    """The request's Content-Length, or None when absent or malformed."""
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def answer_too_large(send: Send, size: int | None, limit: int) -> None:
    """Send the 413 JSON answer and close the connection (the rest of the body is never read)."""
    stated = f"The request body is {size:,} bytes" if size is not None else f"The request body passed {limit:,} bytes"
    detail = f"{stated}; this route accepts at most {limit:,} bytes. Upload a smaller or more compressed image."
    body = json.dumps({"error": "too_large", "detail": detail}).encode()
    await send({"type": "http.response.start", "status": 413, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close")]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})
