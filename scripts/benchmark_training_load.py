#!/usr/bin/env python
"""Serving latency at 8 clients while a training runs (started by GET /train) against idle, and print both.

    .venv/bin/python scripts/benchmark_training_load.py
    .venv/bin/python scripts/benchmark_training_load.py --windows 3 --seconds 15 --clients 8

Builds a throw-away local store: a package of the served architecture (weights untrained:
latency does not depend on their values) as production, and real X-rays from
../shared/data/kermany224/train as training data. Starts `python app.py` on a free port,
then measures `--windows` idle windows of `--seconds` each, then GET /train
and, once the training process is in its model_trainer stage, as many windows under
training. Every request posts one of the 16 full-resolution validation X-rays in turn.
Prints p50/p99 per window, the medians of the windows and their ratio. The training
process runs as `/train` starts it in production: its own torch threads
(XRAY_TRAINING_THREADS, default half the cores) at a lower CPU priority.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data" / "kermany224"
TOKEN = "benchmark-token"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile (share in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(share / 100 * len(ordered)) - 1))]


def build_store(workdir: Path, architecture: str, image_size: int, images_per_class: int) -> Path:
    """A local store with a production package of `architecture` and a slice of the real training images."""
    from xray.data import CLASS_NAMES
    from xray.model import build_model
    from xray.package import ModelCard, publish, write_package
    from xray.preprocessing import Preprocessing
    from xray.storage import LocalStorage

    store = LocalStorage(workdir / "store")
    preprocessing = Preprocessing(image_size=image_size, mean=0.48, std=0.24).to_dict()
    card = ModelCard(version="served", architecture=architecture, classes=list(CLASS_NAMES),
                     preprocessing=preprocessing, threshold=0.5)  # fmt: skip
    publish(store, write_package(workdir / "package", build_model(architecture, pretrained=False), card), "served")
    images = workdir / "images"
    for class_name in CLASS_NAMES:
        target = images / class_name
        target.mkdir(parents=True)
        for path in sorted((SHARED / "train" / class_name).glob("*.jpeg"))[:images_per_class]:
            shutil.copy2(path, target / path.name)
    store.upload_folder(images, "data")
    return workdir / "store"


def measure(url: str, uploads: list[tuple[str, bytes]], clients: int, seconds: float) -> tuple[list[float], int]:
    """Latencies (ms) of POST /predict from `clients` threads for `seconds`, and the error count."""
    latencies: list[float] = []
    errors = [0]
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    def client(offset: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as session:
            index = offset
            while time.monotonic() < stop:
                name, data = uploads[index % len(uploads)]
                started = time.perf_counter()
                response = session.post("/predict", files={"file": (name, data, "image/jpeg")})
                elapsed = (time.perf_counter() - started) * 1000
                with lock:
                    if response.status_code == 200:
                        latencies.append(elapsed)
                    else:
                        errors[0] += 1
                index += 1

    threads = [threading.Thread(target=client, args=(offset,)) for offset in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors[0]


def report(label: str, windows: list[tuple[list[float], int]], seconds: float) -> tuple[float, float]:
    """Print each window and return the medians of the windows' p50 and p99."""
    p50s, p99s = [], []
    for index, (latencies, errors) in enumerate(windows, 1):
        p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
        p50s.append(p50)
        p99s.append(p99)
        print(f"  {label:<9} window {index}: {len(latencies):4d} requests ({len(latencies) / seconds:5.1f}/s), "
              f"{errors} errors, p50 {p50:7.1f} ms, p99 {p99:7.1f} ms")  # fmt: skip
    return statistics.median(p50s), statistics.median(p99s)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=15.0, help="length of one measuring window")
    parser.add_argument("--windows", type=int, default=3, help="windows per condition (medians are reported)")
    parser.add_argument("--config", default=str(REPO / "configs" / "config.yaml"), help="the training run's config")
    parser.add_argument("--images-per-class", type=int, default=400, help="real training images per class")
    arguments = parser.parse_args()

    from xray.config import load_config

    config = load_config(arguments.config)
    uploads = [(path.name, path.read_bytes()) for path in sorted((SHARED / "val").rglob("*.jpeg"))]
    workdir = Path(tempfile.mkdtemp(prefix="xray-training-load-"))
    process = None
    try:
        store = build_store(workdir, config.trainer.architecture, config.transformation.image_size,
                            arguments.images_per_class)  # fmt: skip
        training_config = workdir / "train.yaml"
        training_config.write_text(Path(arguments.config).read_text() + f"\nartifacts_dir: {workdir / 'artifacts'}\n")
        port = free_port()
        environment = {**os.environ, "PORT": str(port), "XRAY_STORAGE_URI": str(store), "XRAY_API_TOKEN": TOKEN,
                       "XRAY_CONFIG": str(training_config), "XRAY_MODEL_CACHE": str(workdir / "cache"),
                       "BENTOML_HOME": str(workdir / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}  # fmt: skip
        log = (workdir / "server.log").open("w")
        process = subprocess.Popen([sys.executable, str(REPO / "app.py")], env=environment, cwd=workdir,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            raise SystemExit(f"the server did not become ready; see {workdir / 'server.log'}")
        print(f"model {config.trainer.architecture} at {config.transformation.image_size} px, {arguments.clients} "
              f"clients, {len(uploads)} full-resolution X-rays, {os.cpu_count()} CPU cores")  # fmt: skip
        measure(url, uploads, arguments.clients, 3.0)  # warm-up
        idle = [measure(url, uploads, arguments.clients, arguments.seconds) for _ in range(arguments.windows)]

        auth = {"Authorization": f"Bearer {TOKEN}"}
        job_id = httpx.get(f"{url}/train", headers=auth, timeout=30).json()["job_id"]
        while (job := httpx.get(f"{url}/train/{job_id}", headers=auth, timeout=30).json())["stage"] != "model_trainer":
            if job["status"] not in ("queued", "running"):
                raise SystemExit(f"training ended before its model_trainer stage: {job}")
            time.sleep(0.5)
        training = [measure(url, uploads, arguments.clients, arguments.seconds) for _ in range(arguments.windows)]
        job = httpx.get(f"{url}/train/{job_id}", headers=auth, timeout=30).json()
        still = job["status"] == "running" and job["stage"] == "model_trainer"

        idle_p50, idle_p99 = report("idle", idle, arguments.seconds)
        busy_p50, busy_p99 = report("training", training, arguments.seconds)
        print(f"median of windows: idle p50 {idle_p50:.1f} ms, p99 {idle_p99:.1f} ms; while training p50 "
              f"{busy_p50:.1f} ms, p99 {busy_p99:.1f} ms; p99 ratio {busy_p99 / idle_p99:.2f}x")  # fmt: skip
        print(f"training job {job_id} was {'still' if still else 'no longer'} in its model_trainer stage at the end "
              f"(epoch {job['epoch']} of {job['epochs']})")  # fmt: skip
        return 0
    finally:
        if process is not None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
