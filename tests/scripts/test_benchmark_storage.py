"""scripts/benchmark_storage.py: its figures decide issue 13's transfer targets, so its server must be fair."""

from __future__ import annotations

import os
import subprocess
import sys

import moto.backends
import pytest
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

from tests.conftest import REPO, load_script, make_dataset
from xray.storage import DEFAULT_TRANSFER_WORKERS

SCRIPT = REPO / "scripts" / "benchmark_storage.py"


def test_the_lightened_server_dispatches_alike_without_scanning_its_folder_per_request(monkeypatch):
    # Setting the attribute to itself makes monkeypatch put moto's own function back after the test.
    monkeypatch.setattr(moto.backends, "list_of_moto_modules", moto.backends.list_of_moto_modules)
    script = load_script("benchmark_storage")
    scanned = sorted(moto.backends.list_of_moto_modules())
    assert script.moto_dispatch() == "stock"
    script.lighten_moto_dispatch()

    def no_scan(path):
        raise AssertionError(f"moto's folder scanned again: {path}")

    monkeypatch.setattr(os, "listdir", no_scan)
    assert sorted(moto.backends.list_of_moto_modules()) == scanned
    dispatcher = DomainDispatcherApplication(create_backend_app)
    assert dispatcher.get_backend_for_host("s3.us-east-1.amazonaws.com") == "s3"
    assert dispatcher.get_backend_for_host("s3") == "s3"
    assert script.moto_dispatch() == "folder list computed once"


@pytest.mark.parametrize("server", [[], ["--stock-moto"]], ids=["lightened", "stock"])
def test_it_prints_every_row_with_its_ratio_and_the_server_it_measured(tmp_path, server):
    images = make_dataset(tmp_path / "images", per_class=3)
    finished = subprocess.run([sys.executable, str(SCRIPT), "--data", str(images), "--runs", "1",
                               "--aws", str(tmp_path / "no-aws-cli"), *server], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path)  # fmt: skip
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-2000:]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in finished.stdout.splitlines()
            if line.startswith("| ") and " | " in line}  # fmt: skip
    assert rows[f"download_prefix, {DEFAULT_TRANSFER_WORKERS} workers"][3].endswith("x"), "ours against the baseline"
    assert rows["plain boto3 get_object, 16 threads"][3] == "1.00x", "without an AWS CLI, plain boto3 is it"
    assert "download_prefix no-op re-sync" in rows and f"upload_folder, {DEFAULT_TRANSFER_WORKERS} workers" in rows
    dispatch = "stock" if server else "folder list computed once"  # as the server process reports it
    assert f"(dispatch: {dispatch}); AWS CLI: none" in finished.stdout
