"""Training under torchrun: two gloo processes on the CPU run one pipeline and push one model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, make_dataset
from xray import distributed
from xray.package import production_version
from xray.storage import LocalStorage


def test_without_torchrun_there_is_one_main_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.world_size() == 1 and distributed.is_main() and not distributed.is_distributed()
    with distributed.session(use_cuda=False):
        assert distributed.main_only(lambda: 41) + 1 == 42
        assert distributed.gather("only") == ["only"] and distributed.agree(True) is True
        distributed.barrier()
    assert distributed.device_for(torch.device("cuda")) == torch.device("cuda")


def test_torchrun_with_two_processes_trains_once_and_pushes_one_model(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "store")
    storage.upload_folder(make_dataset(tmp_path / "images", per_class=16), "data")
    environment = {**os.environ, "XRAY_STORAGE_URI": str(tmp_path / "store"), "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": str(REPO)}  # fmt: skip
    torchrun = Path(sys.executable).with_name("torchrun")
    completed = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "xray", "train",
         "--config", str(REPO / "configs" / "smoke.yaml")],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    log = completed.stdout + completed.stderr
    assert completed.returncode == 0, log
    assert " ERROR " not in log and "Traceback" not in log, log
    assert log.count("run id:") == 1, "the summary is printed once, by rank 0"

    runs = [path for path in (tmp_path / "artifacts").iterdir() if path.name != "cache"]
    assert len(runs) == 1, runs
    versions = {key.split("/")[1] for key in storage.list("models") if key.count("/") >= 2}
    assert versions == {production_version(storage)}
    history = json.loads((runs[0] / "model_trainer" / "history.json").read_text())
    splits = json.loads((runs[0] / "data_transformation" / "artifact.json").read_text())["split_counts"]
    assert all(record["processes"] == 2 for record in history)
    assert all(record["validation_count"] == sum(splits["validation"].values()) for record in history)
