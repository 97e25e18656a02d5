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
