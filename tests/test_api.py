"""The HTTP API as a client meets it: every route, every bad upload, auth, and retraining while serving."""

from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.encaps import encapsulate

from tests.conftest import REPO, SHARED_DATA, ServingClient, encode, synthetic_xray
from tests.test_decoding import dicom_bytes, one_colour_png_bomb, png_16_bit
from xray.api import create_app
from xray.settings import Settings

TOKEN = "s3cret-token"


def real_xray() -> bytes:
    """A full-resolution X-ray from the shared data, or a generated one when it is absent."""
    folder = SHARED_DATA / "val" / "PNEUMONIA"
    if folder.is_dir():
        return sorted(folder.iterdir())[0].read_bytes()
    return encode(synthetic_xray("PNEUMONIA", 3, size=900))


@pytest.fixture
def store(tmp_path, trained_store):
    """A private copy of the trained store, so retraining tests can change it."""
    return shutil.copytree(trained_store, tmp_path / "store")


@pytest.fixture
def config_path(tmp_path):
    """The smoke config with 4 epochs, artifacts under the test folder, accepting any retrained model."""
    path = tmp_path / "train.yaml"
    path.write_text(
        (REPO / "configs" / "smoke.yaml").read_text().replace("epochs: 2", "epochs: 4")
        .replace("minimum_score: 0.0", "minimum_score: 0.0\n  minimum_improvement: -1.0")
        + f"artifacts_dir: {tmp_path / 'artifacts'}\n"
    )
    return path


def make_client(store, config_path=None, **settings) -> TestClient:
    values = {"storage_uri": str(store), "api_token": TOKEN,
              "config_path": str(config_path or REPO / "configs" / "smoke.yaml")} | settings  # fmt: skip
    return ServingClient(create_app(Settings(**values)))


@pytest.fixture
def client(store, config_path):
    with make_client(store, config_path) as test_client:
        yield test_client


def post(client, data: bytes, name: str = "upload", route: str = "/predict"):
    return client.post(route, files={"file": (name, data, "application/octet-stream")})


def assert_error(response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code and isinstance(body["detail"], str) and body["detail"]


# --- the model in service ---------------------------------------------------------------------------------------


def test_health_model_card_docs_and_page(client):
    assert client.get("/health").json() == {"status": "ok", "model_loaded": True, "model_version": "smoke-model"}
    card = client.get("/model").json()
    assert card["version"] == "smoke-model" and card["classes"] == ["NORMAL", "PNEUMONIA"]
    assert client.get("/docs").status_code == 200
    assert "/predict" in client.get("/openapi.json").json()["paths"]
    page = client.get("/")
    assert page.status_code == 200 and "<form" in page.text and "text/html" in page.headers["content-type"]


def test_predict_a_real_xray(client):
    body = post(client, real_xray(), "scan.jpeg").json()
    assert set(body) == {"label", "probability", "threshold", "probabilities", "model_version", "inference_ms"}
    assert body["label"] in {"NORMAL", "PNEUMONIA"} and 0 <= body["probability"] <= 1
    assert body["probabilities"]["PNEUMONIA"] == body["probability"]
    assert body["probabilities"]["NORMAL"] == pytest.approx(1 - body["probability"], abs=1e-6)
    assert body["label"] == ("PNEUMONIA" if body["probability"] >= body["threshold"] else "NORMAL")
    assert body["model_version"] == "smoke-model" and body["inference_ms"] > 0


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P"])
def test_png_modes_are_accepted(client, mode):
    image = synthetic_xray("NORMAL", 4).convert(mode)
    assert post(client, encode(image, "PNG"), "scan.png").status_code == 200


def test_sixteen_bit_png_is_scaled_not_clipped(client):
    """Values far above 255 keep their contrast: the answer equals that of the same image stretched to 8 bits."""
    pixels = np.asarray(synthetic_xray("PNEUMONIA", 5), dtype=np.uint16) * 200 + 1000
    stretched = np.rint((pixels - pixels.min()) * (255.0 / (pixels.max() - pixels.min()))).astype(np.uint8)
    eight_bit = post(client, encode(Image.fromarray(stretched, mode="L"), "PNG")).json()["probability"]
    clipped = post(client, encode(Image.fromarray(np.full_like(stretched, 255), mode="L"), "PNG"))
    sixteen_bit = post(client, png_16_bit(pixels)).json()["probability"]
    assert sixteen_bit == pytest.approx(eight_bit, abs=2e-3)
    # clipped at 255, as an 8-bit conversion would, nothing is left of the X-ray: refused, never scored
    assert (clipped.status_code, clipped.json()["error"]) == (422, "blank_image")


def test_dicom_monochrome1_is_read_like_its_monochrome2_twin(client):
    pixels = np.asarray(synthetic_xray("PNEUMONIA", 6), dtype=np.uint16) * 16
    normal = post(client, dicom_bytes(pixels, "MONOCHROME2"), "a.dcm").json()
    inverted = post(client, dicom_bytes(pixels.max() - pixels, "MONOCHROME1"), "b.dcm").json()
    assert inverted["probability"] == pytest.approx(normal["probability"], abs=1e-3)


def test_format_is_sniffed_not_trusted_from_the_name(client):
    response = client.post("/predict", files={"file": ("scan.dcm", encode(synthetic_xray("NORMAL", 1), "PNG"),
                                                       "application/dicom")})  # fmt: skip
    assert response.status_code == 200


# --- bad uploads: always a 4xx with {"error", "detail"} ---------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"", 400, "empty_file"),
        (b"%PDF-1.7 not an x-ray", 415, "unsupported_format"),
        (b"GIF89a" + bytes(100), 415, "unsupported_format"),
        (encode(synthetic_xray("NORMAL", 2, size=256))[:600], 422, "truncated_image"),
        (encode(synthetic_xray("NORMAL", 2, size=256), "PNG")[:300], 422, "truncated_image"),
        (one_colour_png_bomb(10_000), 413, "too_many_pixels"),
        (dicom_bytes(None), 422, "invalid_dicom"),
    ],
)
def test_bad_uploads_get_a_clear_4xx(client, data, status, code):
    assert_error(post(client, data), status, code)


def test_compressed_dicom_it_cannot_decode_is_415(client):
    data = dicom_bytes(None, transfer_syntax="1.2.840.10008.1.2.4.80", Rows=8, Columns=8, SamplesPerPixel=1,
                       PhotometricInterpretation="MONOCHROME2", BitsAllocated=8, BitsStored=8, HighBit=7,
                       PixelRepresentation=0, PixelData=encapsulate([b"\x00\x01not a JPEG-LS stream" * 4]))
    response = post(client, data, "scan.dcm")
    assert_error(response, 415, "unsupported_compression")
    assert "1.2.840.10008.1.2.4.80" in response.json()["detail"]


def test_upload_over_the_size_limit_is_413(store):
    with make_client(store, max_upload_bytes=10_000) as small:
        assert_error(post(small, real_xray()), 413, "too_large")


def test_missing_file_field_is_422_json(client):
    assert_error(client.post("/predict"), 422, "invalid_request")
    assert_error(client.post("/predict", data={"image": "x"}), 422, "invalid_request")


def test_unknown_route_and_method_are_json(client):
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/predict"), 405, "method_not_allowed")


# --- batches and explanations ----------------------------------------------------------------------------------


def test_batch_answers_per_file(client):
    files = [("files", ("good.jpeg", real_xray(), "image/jpeg")), ("files", ("bad.txt", b"hello", "text/plain")),
             ("files", ("also.png", encode(synthetic_xray("NORMAL", 9), "PNG"), "image/png"))]  # fmt: skip
    body = client.post("/predict/batch", files=files).json()
    assert [item["filename"] for item in body] == ["good.jpeg", "bad.txt", "also.png"]
    assert body[0]["label"] in {"NORMAL", "PNEUMONIA"} and body[2]["label"] in {"NORMAL", "PNEUMONIA"}
    assert body[1]["error"] == "unsupported_format" and body[1]["status"] == 415
    single = post(client, real_xray()).json()
    assert body[0]["probability"] == single["probability"]


def test_too_many_files_in_a_batch_is_413(store):
    with make_client(store, max_batch_files=2) as small:
        files = [("files", (f"{index}.png", encode(synthetic_xray("NORMAL", index), "PNG"), "image/png"))
                 for index in range(3)]  # fmt: skip
        assert_error(small.post("/predict/batch", files=files), 413, "too_many_files")


def test_explain_returns_a_heatmap_and_the_same_prediction(client):
    image = real_xray()
    body = post(client, image, route="/explain").json()
    assert body["heatmap_png"].startswith("data:image/png;base64,")
    assert body["probability"] == pytest.approx(post(client, image).json()["probability"], abs=1e-5)
    raw = client.post("/explain?format=png", files={"file": ("x.jpeg", image, "image/jpeg")})
    assert raw.headers["content-type"] == "image/png" and raw.content[:4] == b"\x89PNG"
    assert raw.headers["x-prediction-label"] == body["label"]
    assert_error(post(client, b"junk", route="/explain"), 415, "unsupported_format")


# --- no model yet ------------------------------------------------------------------------------------------------


def test_before_any_training_predictions_answer_503_with_how_to_train(tmp_path):
    with make_client(tmp_path / "empty-store") as empty:
        assert empty.get("/health").json()["model_loaded"] is False
        response = post(empty, real_xray())
        assert_error(response, 503, "model_not_ready")
        assert "python -m xray train" in response.json()["detail"]
        assert "no model has been promoted yet" in response.json()["detail"]
        assert "without a restart" not in response.json()["detail"]
        assert_error(empty.get("/model"), 503, "model_not_ready")
        not_ready = empty.get("/ready")
        assert_error(not_ready, 503, "not_ready")
        assert "no model has been promoted yet" in not_ready.json()["detail"]


def test_ready_means_a_model_is_loaded(client):
    assert client.get("/ready").json() == {"status": "ready", "model_version": "smoke-model"}


def test_a_forged_production_version_is_refused_and_said_so_without_paths(tmp_path, store):
    (store / "models" / "production.json").write_text('{"version": "/../../../../victim"}')
    (tmp_path / "victim").mkdir()
    with make_client(store, model_cache_dir=str(tmp_path / "cache" / "models")) as forged:
        body = forged.get("/ready").json()
        assert body["error"] == "not_ready" and "invalid model version" in body["detail"]
        assert str(tmp_path) not in body["detail"] and "victim" not in body["detail"]
        assert_error(post(forged, real_xray()), 503, "model_not_ready")
    assert (tmp_path / "victim").is_dir()


# --- training over HTTP -------------------------------------------------------------------------------------------


def test_training_needs_a_configured_token(store):
    with make_client(store, api_token=None) as open_client:
        response = open_client.get("/train", headers={"Authorization": f"Bearer {TOKEN}"})
        assert_error(response, 403, "training_disabled")
        assert "XRAY_API_TOKEN" in response.json()["detail"]


def test_training_checks_the_bearer_token(client):
    response = client.get("/train")
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"
    assert_error(client.get("/train", headers={"Authorization": "Bearer wrong"}), 403, "forbidden")
    assert_error(client.get("/train/anything", headers={"Authorization": "Bearer wrong"}), 403, "forbidden")


def wait_for(client, job_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/train/{job_id}", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not end within {timeout} s")


def test_predictions_keep_flowing_while_training_and_swap_to_the_new_model(client):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    image = real_xray()
    started = client.get("/train", headers=auth)
    assert started.status_code == 202
    job_id = started.json()["job_id"]
    assert started.json()["status_url"] == f"/train/{job_id}"
    conflict = client.get("/train", headers=auth)
    assert_error(conflict, 409, "training_in_progress")
    assert conflict.json()["job_id"] == job_id

    seen, failures, stop = [], [], threading.Event()

    def keep_predicting():
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline:
            response = post(client, image)
            (seen if response.status_code == 200 else failures).append(
                response.json()["model_version"] if response.status_code == 200 else response.text)

    workers = [threading.Thread(target=keep_predicting) for _ in range(3)]
    for worker in workers:
        worker.start()
    job = wait_for(client, job_id)
    deadline = time.monotonic() + 20  # the training process ended: this instance checks production at once
    while client.get("/health").json()["model_version"] != job["outcome"]["version"] and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)
    stop.set()
    for worker in workers:
        worker.join()

    assert job["status"] == "succeeded", job["error"]
    assert job["outcome"]["pushed"] is True and job["epoch"] == job["epochs"] == 4
    assert [record["epoch"] for record in job["history"]] == [1, 2, 3, 4]
    new_version = job["outcome"]["version"]
    assert failures == []
    assert len(seen) > 3 and set(seen) <= {"smoke-model", new_version}
    assert seen[0] == "smoke-model" and seen[-1] == new_version
    assert client.get("/health").json()["model_version"] == new_version
    assert client.get("/train/unknown-job", headers=auth).status_code == 404


def test_a_failed_job_is_reported_and_serving_goes_on(client, store):
    shutil.rmtree(store / "data")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    job = wait_for(client, client.get("/train", headers=auth).json()["job_id"])
    assert job["status"] == "failed" and "no files under" in job["error"]
    assert post(client, real_xray()).status_code == 200


def test_the_service_reads_models_under_the_configs_models_prefix(tmp_path, store):
    (store / "models").rename(store / "zoo")
    config = tmp_path / "zoo.yaml"
    config.write_text((REPO / "configs" / "smoke.yaml").read_text() + "pusher:\n  models_prefix: zoo\n")
    with make_client(store, config, model_cache_dir=str(tmp_path / "cache")) as zoo:
        assert zoo.get("/ready").json() == {"status": "ready", "model_version": "smoke-model"}
