"""`bentoml serve` end to end: the Bento answers like `python app.py`, through the same micro-batcher.

Each test starts a real BentoML server (a subprocess in its own process group, on a free
127.0.0.1 port), so these are the slow tests of the suite: about 15-25 s per server on
two CPU cores. The BentoML home is the test session's (conftest sets BENTOML_HOME), where
`trained_store` saved the smoke model; the server is pinned to that model with
XRAY_BENTOML_MODEL because other tests may save newer ones there.
"""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
XRAY_FOLDER = Path(__file__).resolve().parents[2] / "shared" / "data" / "kermany224" / "val" / "PNEUMONIA"
BENTOML = [sys.executable, "-m", "bentoml"]
STARTUP_SECONDS = 120
REQUEST_SECONDS = 30
# bentoml's model store listing compiles gitwildmatch patterns, which pathspec deprecates
pytestmark = pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")


def free_port() -> int:
    """A TCP port nothing listens on right now, on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def xray_upload() -> tuple[str, bytes]:
    """A real pneumonia X-ray from the shared Kermany copy, or a generated gray JPEG where it is absent."""
    real = sorted(XRAY_FOLDER.glob("*.jpeg"))[:1]
    if real:
        return real[0].name, real[0].read_bytes()
    pixels = np.random.default_rng(0).normal(100, 30, (96, 96)).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="JPEG")
    return "generated.jpeg", buffer.getvalue()


def smoke_model_tag() -> str:
    """The BentoML model store tag of the `trained_store` smoke model."""
    import bentoml

    tags = [str(model.tag) for model in bentoml.models.list("xray-pneumonia")
            if model.info.metadata.get("version") == "smoke-model"]  # fmt: skip
    assert tags, "trained_store did not save the smoke model into the BentoML model store"
    return tags[-1]


def server_environment(trained_store: Path) -> dict[str, str]:
    """This process's environment (BENTOML_HOME included) plus the store and the pinned model."""
    return {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "XRAY_STORAGE_URI": str(trained_store),
            "XRAY_BENTOML_MODEL": smoke_model_tag()}  # fmt: skip


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL if it lingers."""
    for signum, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def bentoml_server(target: str, environment: dict[str, str]) -> Iterator[str]:
    """`bentoml serve TARGET` from the repo root on a free loopback port; yields the base URL once ready."""
    port = free_port()
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen([*BENTOML, "serve", target, "--host", "127.0.0.1", "--port", str(port)],
                                   cwd=REPO, env=environment, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
        url = f"http://127.0.0.1:{port}"

        def output() -> str:
            log.seek(0)
            return log.read().decode(errors="replace")[-4000:]

        try:
            deadline = time.monotonic() + STARTUP_SECONDS
            while True:
                if process.poll() is not None:
                    pytest.fail(f"bentoml serve exited with {process.returncode}:\n{output()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"bentoml serve not ready after {STARTUP_SECONDS} s:\n{output()}")
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
            yield url
        except BaseException:
            sys.stderr.write(f"--- bentoml serve output ---\n{output()}\n")
            raise
        finally:
            stop(process)


def test_bentoml_serve_answers_like_the_fastapi_app(trained_store: Path, trained_package: Path) -> None:
    from xray.inference import Predictor

    name, image = xray_upload()
    predictor = Predictor.from_package(trained_package)
    expected = predictor.predict_pixels([predictor.decode(image)])[0]
    with bentoml_server(".", server_environment(trained_store)) as url, \
            httpx.Client(base_url=url, timeout=REQUEST_SECONDS) as client:  # fmt: skip
        health = client.get("/health")
        assert health.status_code == 200
        assert health.json() == {"status": "ok", "model_loaded": True, "model_version": "smoke-model"}

        response = client.post("/predict", files={"file": (name, image, "image/jpeg")})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["label"] in {"NORMAL", "PNEUMONIA"}
        assert 0.0 <= body["probability"] <= 1.0
        assert body["model_version"] == "smoke-model"
        assert body["probability"] == pytest.approx(expected.probability, abs=1e-6)  # same pixels as in process
        assert body["label"] == expected.label and "inference_ms" in body

        refused = client.post("/predict", files={"file": ("notes.txt", b"not an image at all", "text/plain")})
        assert refused.status_code == 415
        assert refused.headers["content-type"].startswith("application/json")
        assert refused.json()["error"] == "unsupported_format"

        batch = client.post(
            "/predict/batch",
            files=[("files", (name, image, "image/jpeg")), ("files", ("bad.png", b"\x89PNG nonsense", "image/png"))],
        )
        assert batch.status_code == 200, batch.text
        good, bad = batch.json()
        assert good["probability"] == body["probability"] and bad["status"] in (400, 415, 422)

        with ThreadPoolExecutor(max_workers=8) as pool:  # concurrent requests share batches, answers unchanged
            answers = list(pool.map(lambda _: client.post("/predict", files={"file": (name, image, "image/jpeg")}),
                                    range(16)))  # fmt: skip
        assert [answer.status_code for answer in answers] == [200] * 16
        assert {answer.json()["probability"] for answer in answers} == {body["probability"]}

        # no back door around the upload checks, and BentoML's unknown paths answer the API's JSON
        for path in ("/classify", "/no/such/path"):
            missing = client.post(path, files={"file": (name, image, "image/jpeg")})
            assert missing.status_code == 404 and missing.json()["error"] == "not_found", missing.text
        assert client.get("/livez").status_code == 200  # BentoML's own routes still answer

        assert client.get("/model").json()["version"] == "smoke-model"
        assert client.get("/docs").status_code == 200


def test_built_bento_serves_the_model(trained_store: Path) -> None:
    environment = server_environment(trained_store)
    built = subprocess.run([*BENTOML, "build", "-o", "tag", "."], cwd=REPO, env=environment,
                           capture_output=True, text=True, timeout=180)  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    tag = re.search(r"__tag__:(\S+)", built.stdout).group(1)
    assert tag.startswith("xray:")

    name, image = xray_upload()
    with bentoml_server(tag, environment) as url, httpx.Client(base_url=url, timeout=REQUEST_SECONDS) as client:
        response = client.post("/predict", files={"file": (name, image, "image/jpeg")})
        assert response.status_code == 200, response.text
        assert response.json()["model_version"] == "smoke-model"
        assert client.get("/health").json()["model_loaded"] is True


def test_a_malformed_setting_stops_bentoml_serve_with_one_line_naming_it(tmp_path):
    environment = os.environ | {"XRAY_MAX_UPLOAD_BYTES": "20MB", "BENTOML_DO_NOT_TRACK": "true"}
    result = subprocess.run([*BENTOML, "serve", "xray.service:XrayService", "--port", "0", "--working-dir", str(REPO)],
                            env=environment, cwd=tmp_path, capture_output=True, text=True, timeout=180)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == "error: environment variable XRAY_MAX_UPLOAD_BYTES='20MB' must be a whole number\n"
