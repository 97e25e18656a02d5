"""scripts/benchmark_gpu.py: GPU time is rare and costly, so the script must work before a GPU is lent."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

from tests.conftest import REPO, make_dataset

SCRIPT = REPO / "scripts" / "benchmark_gpu.py"


def run_script(*options: str, cwd, hide_gpus: bool = False) -> subprocess.CompletedProcess:
    environment = {**os.environ, "XRAY_HOME": str(cwd), "PYTHONUNBUFFERED": "1"}
    if hide_gpus:
        environment["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run([sys.executable, str(SCRIPT), *options], cwd=cwd, env=environment, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def test_every_step_runs_on_a_cpu_and_the_written_model_scores_every_upload(tmp_path):
    images = make_dataset(tmp_path / "images", per_class=16)
    out = tmp_path / "out"
    finished = run_script("--device", "cpu", "--config", str(REPO / "configs" / "smoke.yaml"), "--data", str(images),
                          "--val", str(images), "--epochs", "1", "--raw-steps", "2", "--workdir",
                          str(tmp_path / "work"), "--out", str(out), cwd=tmp_path)  # fmt: skip
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["raw_step_images_per_second"] > 0
    assert [layout["loader_workers"] for layout in results["layouts"]] == [0, 0], "none on a CPU, automatically"
    assert results["pipeline"]["exit_status"] == 0 and results["pipeline"]["trainer"]["device"] == "cpu"
    assert results["cpu_against_device"]["max_abs_difference"] < 1e-4, "the same model on the same CPU"
    with open(out / "scores_cpu.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 32
    assert (out / "package" / "model.safetensors").is_file()
    assert "| loader processes | epoch |" in finished.stdout


def test_without_a_gpu_it_says_how_to_check_the_script_instead(tmp_path):
    finished = run_script("--out", str(tmp_path / "out"), cwd=tmp_path, hide_gpus=True)
    assert finished.returncode == 2
    assert "no CUDA GPU here; --device cpu checks the script itself" in finished.stderr
