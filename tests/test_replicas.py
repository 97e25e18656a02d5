"""Several `python app.py` replicas sharing one bucket on moto's S3 server, over real HTTP.

What a load balancer in front of them would see: a training started through one replica is
polled through another, a second training anywhere is refused, every replica serves a newly
promoted model within XRAY_MODEL_POLL_SECONDS, a replica started while storage was down becomes
ready once it is back, and a training process killed with SIGKILL leaves the server serving.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, MotoServer, encode, synthetic_xray
from xray.storage import S3Storage

TOKEN = "replica-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
POLL_SECONDS = 1.0
START_SECONDS = 90


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Replica:
    """One `python app.py` process on a free port, in its own process group."""

    def __init__(self, name: str, environment: dict[str, str], folder: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (folder / f"{name}.log").open("w")
        environment = {**environment, "PORT": str(self.port), "XRAY_MODEL_CACHE": str(folder / f"{name}-cache")}
        self.process = subprocess.Popen([sys.executable, str(REPO / "app.py")], cwd=folder, env=environment,
                                        stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def wait_alive(self) -> None:
        """Wait for liveness, then for the end of the replica's first look at production (made in the background)."""
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"replica exited: {self.log_text()}"
            try:
                ready = self.client.get("/ready")
                if ready.status_code == 200 or "being loaded" not in ready.json()["detail"]:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"replica did not finish starting within {START_SECONDS} s: {self.log_text()}")

    def log_text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-4000:]

    def predict(self) -> httpx.Response:
        image = encode(synthetic_xray("PNEUMONIA", 11))
        return self.client.post("/predict", files={"file": ("scan.jpeg", image, "image/jpeg")})

    def stop(self) -> None:
        self.client.close()
        for signum, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.process.pid, signum)
            except ProcessLookupError:
                break
            try:
                self.process.wait(grace)
                break
            except subprocess.TimeoutExpired:
                continue
        self.log.close()


def wait_until(condition, timeout: float, message: str, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(step)
    raise AssertionError(message)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, trained_store: Path) -> Iterator[dict]:
    """A bucket holding the smoke data and model, and the environment a replica needs to use it."""
    folder = tmp_path_factory.mktemp("replicas")
    with pytest.MonkeyPatch.context() as patch:
        empty = folder / "aws-empty"
        empty.write_text("")
        server = MotoServer()
        aws = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": server.endpoint,
               "AWS_SHARED_CREDENTIALS_FILE": str(empty), "AWS_CONFIG_FILE": str(empty),
               "AWS_EC2_METADATA_DISABLED": "true"}  # fmt: skip
        for name, value in aws.items():
            patch.setenv(name, value)
        storage = S3Storage("xray-replicas")
        storage.client.create_bucket(Bucket="xray-replicas")
        storage.upload_folder(trained_store, "")
        config = folder / "train.yaml"
        config.write_text((REPO / "configs" / "smoke.yaml").read_text()
                          .replace("minimum_score: 0.0", "minimum_score: 0.0\n  minimum_improvement: -1.0")
                          + f"artifacts_dir: {folder / 'artifacts'}\npusher:\n  save_to_bentoml: false\n")  # fmt: skip
        environment = {**os.environ, **aws, "XRAY_STORAGE_URI": "s3://xray-replicas", "XRAY_API_TOKEN": TOKEN,
                       "XRAY_CONFIG": str(config), "XRAY_MODEL_POLL_SECONDS": str(POLL_SECONDS),
                       "XRAY_TRAINING_LEASE_SECONDS": "60", "XRAY_TRAINING_THREADS": "1"}  # fmt: skip
        replicas = {name: Replica(name, environment, folder) for name in ("a", "b")}
        # c starts now too (start-up is the slow part) but on a second endpoint onto the same in-process
        # buckets, which is down: storage is out of reach when it starts.
        outage = MotoServer()
        outage.stop()
        replicas["c"] = Replica("c", {**environment, "AWS_ENDPOINT_URL": outage.endpoint}, folder)
        try:
            for replica in replicas.values():
                replica.wait_alive()
            yield {"replicas": replicas, "storage": storage, "outage": outage}
        finally:
            for replica in replicas.values():
                replica.stop()
            server.stop()
            outage.stop()


def test_training_through_one_replica_is_followed_through_another_and_every_replica_serves_the_new_model(cluster):
    a, b = cluster["replicas"]["a"], cluster["replicas"]["b"]
    assert a.client.get("/ready").json()["model_version"] == b.client.get("/ready").json()["model_version"]
    old_version = b.predict().json()["model_version"]

    started = a.client.get("/train", headers=AUTH)
    assert started.status_code == 202, started.text
    job_id = started.json()["job_id"]
    conflict = b.client.get("/train", headers=AUTH)
    assert conflict.status_code == 409 and conflict.json()["job_id"] == job_id

    def finished():
        job = b.client.get(f"/train/{job_id}", headers=AUTH).json()
        return job if job["status"] in ("succeeded", "failed") else None

    job = wait_until(finished, 240, f"job {job_id} did not finish: {a.log_text()}", step=0.5)
    assert job["status"] == "succeeded", job["error"]
    assert job["outcome"]["pushed"] and job["outcome"]["version"] == job_id != old_version
    assert [record["epoch"] for record in job["history"]] == [1, 2]

    for replica in (b, a):  # the poll interval, plus loading the package on a busy machine
        wait_until(lambda replica=replica: replica.predict().json()["model_version"] == job_id, POLL_SECONDS + 15,
                   f"a replica still serves {old_version}: {replica.log_text()}")  # fmt: skip
    assert b.client.get("/ready").json() == {"status": "ready", "model_version": job_id}
    assert not cluster["storage"].exists("jobs/lease.json")


def test_a_sigkilled_training_process_leaves_the_server_serving_and_the_lease_free(cluster):
    a, b = cluster["replicas"]["a"], cluster["replicas"]["b"]
    started = b.client.get("/train", headers=AUTH)
    assert started.status_code == 202, started.text
    job_id = started.json()["job_id"]
    job = wait_until(lambda: (job := a.client.get(f"/train/{job_id}", headers=AUTH).json())["pid"] and job, 60,
                     "the training process never recorded its pid")  # fmt: skip
    os.kill(job["pid"], signal.SIGKILL)

    def failed():
        job = a.client.get(f"/train/{job_id}", headers=AUTH).json()
        return job if job["status"] == "failed" else None

    job = wait_until(failed, 30, f"job not marked failed: {b.log_text()}")
    assert "SIGKILL" in job["error"]
    assert b.process.poll() is None and b.predict().status_code == 200
    assert b.client.get("/health").status_code == 200
    wait_until(lambda: not cluster["storage"].exists("jobs/lease.json"), 30, "the lease was not freed")


def test_a_replica_started_while_storage_is_down_becomes_ready_when_it_is_back(cluster):
    replica, outage = cluster["replicas"]["c"], cluster["outage"]
    assert replica.client.get("/health").status_code == 200  # alive, started without storage
    not_ready = replica.client.get("/ready")
    assert not_ready.status_code == 503 and not_ready.json()["error"] == "not_ready"
    detail = not_ready.json()["detail"]
    assert "storage cannot be reached" in detail
    assert "127.0.0.1" not in detail and "xray-replicas" not in detail and "testing" not in detail
    assert replica.predict().status_code == 503
    outage.start()
    wait_until(lambda: replica.client.get("/ready").status_code == 200, POLL_SECONDS + 30,
               f"replica c did not become ready: {replica.log_text()}")  # fmt: skip
    assert replica.predict().status_code == 200
