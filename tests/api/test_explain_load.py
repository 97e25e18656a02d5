"""/explain under load: a bounded number of explanations in progress, the rest shed with 503 like /predict."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

import xray.explain
from tests.api.test_predict import tiny_client, xray_jpeg


@pytest.fixture
def held_explanations(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """(started, gate): Grad-CAM announces each explanation on `started`, then waits for `gate` before running."""
    started, gate = threading.Event(), threading.Event()
    original = xray.explain.explain

    def held(predictor, pixels):
        started.set()
        if not gate.wait(5):  # a request that should have been shed is waiting behind this one
            raise TimeoutError("Grad-CAM was held 5 s: the test never opened the gate")
        return original(predictor, pixels)

    monkeypatch.setattr(xray.explain, "explain", held)
    yield started, gate
    gate.set()


def upload() -> dict:
    return {"file": ("x.jpeg", xray_jpeg(), "image/jpeg")}


def test_explanations_past_the_bound_get_503_overloaded_until_one_finishes(tmp_path, held_explanations):
    started, gate = held_explanations
    with tiny_client(tmp_path, max_queued_explanations=1) as client, ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.post, "/explain", files=upload())
        assert started.wait(5), "the first explanation never reached Grad-CAM"
        for route in ("/explain", "/explain?format=png"):
            shed = client.post(route, files=upload())
            assert (shed.status_code, shed.headers["retry-after"]) == (503, "1"), shed.text
            assert shed.headers["content-type"] == "application/json"
            assert shed.json()["error"] == "overloaded" and "XRAY_MAX_QUEUED_EXPLANATIONS" in shed.json()["detail"]
        assert client.post("/predict", files=upload()).status_code == 200  # predictions are not held up
        gate.set()
        assert first.result(5).status_code == 200
        assert client.post("/explain", files=upload()).status_code == 200  # the slot is free again


def test_a_refused_explanation_frees_its_slot(tmp_path, held_explanations):
    held_explanations[1].set()
    with tiny_client(tmp_path, max_queued_explanations=1) as client:
        for _ in range(3):
            refused = client.post("/explain", files={"file": ("x.jpeg", b"junk", "image/jpeg")})
            assert (refused.status_code, refused.json()["error"]) == (415, "unsupported_format")
        assert client.post("/explain", files=upload()).status_code == 200
