"""Request body limits: refused from the header or cut off while streaming, always as JSON 413."""

from __future__ import annotations

import asyncio
import json

from xray.api.limits import MULTIPART_ALLOWANCE, RequestSizeLimit
from xray.settings import Settings

SETTINGS = Settings(max_upload_bytes=1000, max_batch_request_bytes=5000)
CHUNK = 1024


def call(path: str, headers: list[tuple[bytes, bytes]], chunks: int) -> tuple[list[dict], int, bool]:
    """Run the middleware around an app that reads the whole body: (sent messages, body chunks read, app finished)."""
    read = 0
    finished = False

    async def app(scope, receive, send):
        nonlocal finished
        while True:
            message = await receive()
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        finished = True

    async def receive():
        nonlocal read
        read += 1
        return {"type": "http.request", "body": b"x" * CHUNK, "more_body": read < chunks}

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
    asyncio.run(RequestSizeLimit(app, SETTINGS)(scope, receive, send))
    return sent, read, finished


def answer(sent: list[dict]) -> tuple[int, dict]:
    return sent[0]["status"], json.loads(b"".join(message.get("body", b"") for message in sent[1:]))


def test_a_declared_length_over_the_limit_is_413_before_any_body_is_read():
    sent, read, finished = call("/predict", [(b"content-length", str(60 * 1024 * 1024).encode())], chunks=60 * 1024)
    status, body = answer(sent)
    assert (status, body["error"], read, finished) == (413, "too_large", 0, False)
    assert "62,914,560 bytes" in body["detail"]  # the real size, as declared


def test_a_body_without_length_is_cut_off_at_the_limit_while_streaming():
    sent, read, finished = call("/predict", [], chunks=10_000)
    status, body = answer(sent)
    assert (status, body["error"], finished) == (413, "too_large", False)
    assert read == (SETTINGS.max_upload_bytes + MULTIPART_ALLOWANCE) // CHUNK + 1  # stopped right past the limit


def test_bodies_within_the_limit_pass_and_the_batch_route_has_its_own():
    sent, _, finished = call("/predict", [(b"content-length", b"2048")], chunks=2)
    assert finished and sent[0]["status"] == 200
    sent, _, finished = call("/predict/batch", [], chunks=4)
    assert finished and sent[0]["status"] == 200
    sent, _, _ = call("/predict/batch", [], chunks=5000)
    assert answer(sent)[0] == 413
