"""`python app.py`: a misconfiguration is one sentence and exit status 2; start-up imports no model stack."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO


def test_a_malformed_setting_stops_app_py_with_one_line_naming_it(tmp_path):
    environment = os.environ | {"XRAY_MAX_UPLOAD_BYTES": "20MB", "XRAY_STORAGE_URI": str(tmp_path / "store")}
    result = subprocess.run([sys.executable, str(REPO / "app.py")], env=environment, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == "error: environment variable XRAY_MAX_UPLOAD_BYTES='20MB' must be a whole number\n"


def test_the_api_starts_without_importing_torch_or_the_training_stack(tmp_path):
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import app, xray.service; "
              "print(sorted(name for name in ('torch', 'torchvision', 'matplotlib', 'xray.pipeline', 'xray.model') "
              "if name in sys.modules))")  # fmt: skip
    environment = os.environ | {"XRAY_STORAGE_URI": str(tmp_path / "store"), "BENTOML_HOME": str(tmp_path / "bento")}
    result = subprocess.run([sys.executable, "-c", script, str(REPO)], env=environment, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"


def test_serving_an_onnx_package_never_imports_torch_until_a_heatmap_is_asked(tmp_path):
    """ONNX Runtime scores; torch (over half a GiB resident) loads only for /explain's Grad-CAM."""
    import dataclasses

    from tests.test_runtime import default_card
    from xray.model import build_model
    from xray.package import publish, write_package
    from xray.storage import LocalStorage

    card = default_card("v1")
    card = dataclasses.replace(card, architecture="small_cnn", preprocessing={**card.preprocessing, "image_size": 32})
    write_package(tmp_path / "package", build_model("small_cnn").eval(), card)
    publish(LocalStorage(tmp_path / "store"), tmp_path / "package", "v1")
    script = f"""
import sys
import xray.api
from xray.settings import Settings
from tests.conftest import ServingClient, encode, synthetic_xray
settings = Settings(storage_uri={str(tmp_path / "store")!r}, model_cache_dir={str(tmp_path / "cache")!r})
with ServingClient(xray.api.create_app(settings)) as client:
    upload = {{"file": ("x.png", encode(synthetic_xray("NORMAL", 1), "PNG"), "image/png")}}
    answer = client.post("/predict", files=upload)
    assert answer.status_code == 200, answer.text
    print("after predict:", "torch" in sys.modules, client.get("/model").json()["onnx"]["file"])
    assert client.post("/explain", files=upload).status_code == 200
    print("after explain:", "torch" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "after predict: False model.onnx" in result.stdout
    assert "after explain: True" in result.stdout
