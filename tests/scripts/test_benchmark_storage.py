"""scripts/benchmark_storage.py: its figures decide issue 13's transfer targets, so its server must be fair."""

from __future__ import annotations

import os
import subprocess
import sys

import moto.backends
import pytest

from tests.conftest import REPO, make_dataset

SCRIPT = REPO / "scripts" / "benchmark_storage.py"
sys.path.insert(0, str(SCRIPT.parent))

import benchmark_storage  # noqa: E402


def test_the_lightened_server_finds_the_same_services_without_scanning_its_folder_per_request(monkeypatch):
    monkeypatch.setattr(moto.backends, "list_of_moto_modules", moto.backends.list_of_moto_modules)
    scanned = set(moto.backends.list_of_moto_modules())
    benchmark_storage.lighten_moto_dispatch()

    def no_scan(path):
        raise AssertionError(f"moto's folder scanned again: {path}")

    monkeypatch.setattr(os, "listdir", no_scan)
    assert set(moto.backends.list_of_moto_modules()) == scanned
    assert "s3" in moto.backends.list_of_moto_modules(), "moto's dispatch asks `host in list_of_moto_modules()`"


@pytest.mark.parametrize("server", [[], ["--stock-moto"]], ids=["lightened", "stock"])
def test_it_prints_every_row_with_its_ratio_against_the_baseline(tmp_path, server):
    images = make_dataset(tmp_path / "images", per_class=3)
    finished = subprocess.run([sys.executable, str(SCRIPT), "--data", str(images), "--runs", "1",
                               "--aws", str(tmp_path / "no-aws-cli"), *server], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path)  # fmt: skip
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-2000:]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in finished.stdout.splitlines()
            if line.startswith("| ") and " | " in line}  # fmt: skip
    assert rows["download_prefix, 32 workers"][3].endswith("x"), "ours against the baseline"
    assert rows["plain boto3 get_object, 16 threads"][3] == "1.00x", "without an AWS CLI, plain boto3 is it"
    assert "download_prefix no-op re-sync" in rows and "upload_folder, 32 workers" in rows
    dispatch = "stock" if server else "folder list computed once"
    assert f"(dispatch: {dispatch}); AWS CLI: none" in finished.stdout
