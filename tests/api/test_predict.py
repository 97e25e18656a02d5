"""Prediction routes under hostile uploads and load: every refusal a 4xx JSON, the server alive after it."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from tests.conftest import SHARED_DATA, encode, hostile_uploads, synthetic_xray
from xray.api import create_app
from xray.batching import BatchOptions
from xray.inference import ModelHolder, Predictor
from xray.model import build_model
from xray.package import ModelCard
from xray.settings import Settings

CARD = ModelCard(version="tiny", architecture="small_cnn", classes=["NORMAL", "PNEUMONIA"],
                 preprocessing={"image_size": 32, "mean": 0.5, "std": 0.25}, threshold=0.5)  # fmt: skip


def tiny_predictor(options: BatchOptions | None = None) -> Predictor:
    torch.manual_seed(0)
    return Predictor(build_model("small_cnn").eval(), CARD, options=options)


def tiny_client(tmp_path, predictor: Predictor | None = None, **settings) -> TestClient:
    app = create_app(Settings(storage_uri=str(tmp_path / "store"), **settings),
                     holder=ModelHolder(predictor or tiny_predictor()), load_model=False)  # fmt: skip
    return TestClient(app)


def xray_jpeg() -> bytes:
    real = sorted((SHARED_DATA / "val" / "NORMAL").glob("*.jpeg"))
    return real[0].read_bytes() if real else encode(synthetic_xray("NORMAL", 1, size=600))


@pytest.fixture(scope="module")
def uploads() -> list:
    return hostile_uploads()


def test_every_hostile_upload_gets_its_4xx_json_and_the_server_lives_on(tmp_path, uploads):
    with tiny_client(tmp_path) as client:
        for upload in uploads:
            file = (upload.filename, upload.data, "application/octet-stream")
            response = client.post("/predict", files={"file": file})
            assert response.status_code == upload.status, (upload.name, response.text)
            assert response.headers["content-type"] == "application/json"
            assert response.json()["error"] == upload.error and response.json()["detail"], upload.name
        assert client.post("/predict", files={"file": ("x.jpeg", xray_jpeg(), "image/jpeg")}).status_code == 200
        assert client.get("/health").json()["model_loaded"] is True


def test_a_hostile_file_in_a_batch_fails_alone(tmp_path, uploads):
    files = [("files", ("good.jpeg", xray_jpeg(), "image/jpeg"))]
    files += [("files", (upload.filename, upload.data, "application/octet-stream")) for upload in uploads]
    with tiny_client(tmp_path) as client:
        response = client.post("/predict/batch", files=files)
    assert response.status_code == 200, response.text
    good, *bad = response.json()
    assert good["label"] in ("NORMAL", "PNEUMONIA")
    assert [(item["status"], item["error"]) for item in bad] == [(upload.status, upload.error) for upload in uploads]


def test_explain_refuses_hostile_uploads_as_json(tmp_path, uploads):
    with tiny_client(tmp_path) as client:
        for upload in uploads[-2:]:
            response = client.post("/explain", files={"file": (upload.filename, upload.data, "application/dicom")})
            assert (response.status_code, response.json()["error"]) == (upload.status, upload.error)


def test_an_upload_over_the_limit_states_its_real_size(tmp_path):
    with tiny_client(tmp_path, max_upload_bytes=10_000) as client:
        response = client.post("/predict", files={"file": ("big.png", b"\x89PNG" + bytes(30_000), "image/png")})
    assert response.status_code == 413 and response.json()["error"] == "too_large"
    assert "30,004 bytes" in response.json()["detail"]


def test_too_many_files_are_refused_before_any_is_decoded(tmp_path, monkeypatch):
    decoded = []
    monkeypatch.setattr(Predictor, "decode", lambda self, data, limits=None: decoded.append(1))
    with tiny_client(tmp_path, max_batch_files=2) as client:
        files = [("files", (f"{index}.jpeg", b"\xff\xd8\xff", "image/jpeg")) for index in range(3)]
        response = client.post("/predict/batch", files=files)
    assert (response.status_code, response.json()["error"], decoded) == (413, "too_many_files", [])


def test_decodes_run_at_most_decode_workers_at_once(tmp_path, monkeypatch):
    running, peak, lock = 0, 0, threading.Lock()
    original = Predictor.decode

    def slow_decode(self, data, limits=None):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return original(self, data, limits)

    monkeypatch.setattr(Predictor, "decode", slow_decode)
    files = [("files", (f"{index}.jpeg", encode(synthetic_xray("NORMAL", index)), "image/jpeg")) for index in range(6)]
    with tiny_client(tmp_path, decode_workers=1) as client:
        response = client.post("/predict/batch", files=files)
    assert response.status_code == 200 and len(response.json()) == 6
    assert peak == 1


def test_a_full_queue_sheds_load_with_503_and_retry_after(tmp_path):
    gate = threading.Event()
    predictor = tiny_predictor(BatchOptions(max_batch=1, max_wait_ms=0, max_queued=1))
    scoring = predictor.batcher.score
    predictor.batcher.score = lambda pixels: (gate.wait(10), scoring(pixels))[1]
    size = CARD.preprocessing["image_size"]
    blocked = predictor.submit(np.zeros((size, size), np.uint8))  # held by the worker at the gate
    deadline = time.monotonic() + 5
    while predictor.batcher.queued_images and time.monotonic() < deadline:
        time.sleep(0.005)
    queued = predictor.submit(np.zeros((size, size), np.uint8))  # fills the queue
    try:
        with tiny_client(tmp_path, predictor) as client:
            response = client.post("/predict", files={"file": ("x.jpeg", xray_jpeg(), "image/jpeg")})
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert response.json()["error"] == "overloaded"
    finally:
        gate.set()
    assert len(blocked.result(5)) == len(queued.result(5)) == 1
