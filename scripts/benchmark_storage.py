#!/usr/bin/env python
"""Time `Storage.download_prefix` and `upload_folder` against `aws s3 sync` and plain boto3, on a moto S3 server.

    .venv/bin/python scripts/benchmark_storage.py --runs 3      # the AWS CLI from PATH, or --aws PATH

Starts its own moto server (ThreadedMotoServer on 127.0.0.1, a free port) in a child process, so the
server never shares a GIL with the client being timed; uploads the labelled folder (default: the 5,216
shared training X-rays) and prints, per method, the median of `--runs` runs and each run:
- download of `data/`: ours, `aws s3 sync`, plain boto3 `get_object` on `--threads` threads;
- a no-op re-sync into the folder just downloaded (ours and `aws s3 sync`);
- upload of the folder (ours and `aws s3 sync` the other way).
Each row also shows the moto server's CPU seconds meanwhile (Linux): one GIL serves all requests,
so that is a floor no client goes below. Stock moto spends a third of that CPU, on every request and
under a global lock, listing the folders of its own installed package to find the service; the server
here computes that list once (`lighten_moto_dispatch`). That saves the server the same CPU per request
for every client, and a client gets faster only where it waited on the server (real S3 has no such
floor). `--stock-moto` serves without it. Without an AWS CLI, the plain boto3 figures are the
baseline. `--sweep 8,16,32,64` adds download times of ours at each worker count (how the default
was picked).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xray.storage import DEFAULT_TRANSFER_WORKERS, S3Storage, create_s3_client  # noqa: E402

BUCKET = "xray-benchmark"
FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "benchmark",
    "AWS_SECRET_ACCESS_KEY": "benchmark-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def lighten_moto_dispatch() -> None:
    """Make moto's server list its own service folders once, not on every request (a third of its CPU).

    moto's `DomainDispatcherApplication.get_backend_for_host` scans the installed `moto/` package with
    `os.listdir` and one `isdir` per entry for each request, under the lock that serialises dispatch; the
    list only changes when moto is reinstalled, so the result is the same, just computed once.
    """
    import moto.backends

    modules = tuple(moto.backends.list_of_moto_modules())

    def listed_once() -> tuple[str, ...]:
        """The service folders found when the server started."""
        return modules

    moto.backends.list_of_moto_modules = listed_once


def moto_dispatch() -> str:
    """How this process's moto finds a request's service: what the benchmark prints."""
    import moto.backends

    lightened = moto.backends.list_of_moto_modules.__name__ == "listed_once"
    return "folder list computed once" if lightened else "stock"


def serve_moto(port_queue: multiprocessing.Queue, stock: bool = False) -> None:
    """Child process: run a moto S3 server on a free local port until terminated or orphaned.

    Unless `stock`, with `lighten_moto_dispatch`; sends its port and `moto_dispatch()` to the parent.
    """
    import logging

    from moto.server import ThreadedMotoServer

    if not stock:
        lighten_moto_dispatch()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    parent = os.getppid()
    port_queue.put((server.get_host_and_port()[1], moto_dispatch()))
    while os.getppid() == parent:  # a benchmark killed before its cleanup must not leave the server running
        time.sleep(1)


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, from /proc; NaN where there is no /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(action: Callable[[], object], server_pid: int) -> tuple[float, float]:
    """Seconds one call takes, and the CPU seconds the S3 server spent meanwhile."""
    started, server_started = time.perf_counter(), cpu_seconds(server_pid)
    action()
    return time.perf_counter() - started, cpu_seconds(server_pid) - server_started


def plain_boto3_download(client, prefix: str, destination: Path, threads: int) -> None:
    """The baseline: list, then one `get_object` per key on a thread pool, written straight to its file."""
    keys = [item["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
            for item in page.get("Contents", [])]  # fmt: skip

    def fetch(key: str) -> None:
        path = destination / key[len(prefix) :]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(fetch, keys))


def empty_prefix(client, prefix: str) -> None:
    """Delete every object under `prefix`, so uploads always start from nothing and moto's memory stays flat."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        objects = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if objects:
            client.delete_objects(Bucket=BUCKET, Delete={"Objects": objects, "Quiet": True})


def aws_sync(aws: str, endpoint: str, source: str, destination: str) -> None:
    """One `aws s3 sync` with the CLI's default settings."""
    subprocess.run([aws, "s3", "sync", "--only-show-errors", "--endpoint-url", endpoint, source, destination],
                   check=True, env=os.environ.copy())  # fmt: skip


def working_aws_cli(path: str | None) -> str | None:
    """The AWS CLI at `path` (or on PATH) if it runs, else None."""
    path = path or shutil.which("aws")
    if not path:
        return None
    try:
        subprocess.run([path, "--version"], check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/kermany224/train"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--aws", help="AWS CLI executable (default: `aws` on PATH; skipped if it does not run)")
    parser.add_argument("--threads", type=int, default=16, help="threads of the plain boto3 baseline")
    parser.add_argument("--workers", type=int, default=DEFAULT_TRANSFER_WORKERS, help="workers of ours")
    parser.add_argument("--sweep", default="", help="comma-separated worker counts to also time downloads with")
    parser.add_argument("--workdir", help="where downloads go (default: a temporary folder)")
    parser.add_argument("--stock-moto", action="store_true",
                        help="serve with moto's per-request folder scan (a higher server CPU floor)")  # fmt: skip
    arguments = parser.parse_args()
    os.environ.update(FAKE_AWS)
    aws = working_aws_cli(arguments.aws)
    data = Path(arguments.data)
    files = [path for path in data.rglob("*") if path.is_file() and not path.name.startswith(".")]
    megabytes = sum(path.stat().st_size for path in files) / 1e6

    spawn = multiprocessing.get_context("spawn")
    port_queue: multiprocessing.Queue = spawn.Queue()
    server = spawn.Process(target=serve_moto, args=(port_queue, arguments.stock_moto), daemon=True)
    server.start()
    workdir = Path(arguments.workdir or tempfile.mkdtemp(prefix="xray-storage-benchmark-"))
    try:
        port, dispatch = port_queue.get(timeout=60)
        endpoint = f"http://127.0.0.1:{port}"
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        client = create_s3_client(max_pool_connections=max(arguments.threads, 10))
        client.create_bucket(Bucket=BUCKET)
        storage = S3Storage(BUCKET)
        storage.upload_folder(data, "data", workers=arguments.workers)
        print(f"{len(files)} files, {megabytes:.0f} MB, moto server at {endpoint} (dispatch: {dispatch}); "
              f"AWS CLI: {aws or 'none'}")  # fmt: skip

        results: dict[str, list[float]] = {}
        server_cpu: dict[str, list[float]] = {}

        def record(name: str, action: Callable[[], object]) -> None:
            seconds, server_seconds = timed(action, server.pid)
            results.setdefault(name, []).append(seconds)
            server_cpu.setdefault(name, []).append(server_seconds)
            print(f"  {name}: {seconds:.2f} s (S3 server CPU {server_seconds:.1f} s)", flush=True)

        sweep = [int(count) for count in arguments.sweep.split(",") if count]
        source = f"s3://{BUCKET}/data"
        for run in range(1, arguments.runs + 1):
            print(f"run {run}", flush=True)
            folder = workdir / f"run{run}"
            ours = partial(storage.download_prefix, "data", folder / "ours", workers=arguments.workers)
            record(f"download_prefix, {arguments.workers} workers", ours)
            record("download_prefix no-op re-sync", ours)
            if aws:
                theirs = partial(aws_sync, aws, endpoint, source, str(folder / "aws"))
                record("aws s3 sync download", theirs)
                record("aws s3 sync no-op re-sync", theirs)
            plain = partial(plain_boto3_download, client, "data/", folder / "plain", arguments.threads)
            record(f"plain boto3 get_object, {arguments.threads} threads", plain)
            for count in sweep:
                swept = partial(storage.download_prefix, "data", folder / f"sweep{count}", workers=count)
                record(f"download_prefix, {count} workers (sweep)", swept)
            upload = partial(storage.upload_folder, data, f"upload-ours-{run}", workers=arguments.workers)
            record(f"upload_folder, {arguments.workers} workers", upload)
            empty_prefix(client, f"upload-ours-{run}/")
            if aws:
                record("aws s3 sync upload", partial(aws_sync, aws, endpoint, str(data), f"s3://{BUCKET}/up-{run}"))
                empty_prefix(client, f"up-{run}/")
            shutil.rmtree(folder)
    finally:
        server.terminate()
        server.join(timeout=10)
        if not arguments.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    download_baseline = "aws s3 sync download" if aws else f"plain boto3 get_object, {arguments.threads} threads"
    upload_baseline = "aws s3 sync upload" if aws else None
    medians = {name: statistics.median(times) for name, times in results.items()}
    print(f"\n| {len(files)} files, median of {arguments.runs} | seconds | each run | vs baseline | S3 server CPU s |")
    print("|---|---|---|---|---|")
    for name, times in results.items():
        baseline = upload_baseline if "upload" in name else download_baseline
        ratio = f"{medians[name] / medians[baseline]:.2f}x" if baseline in medians and "no-op" not in name else ""
        floor = statistics.median(server_cpu[name])
        print(f"| {name} | {medians[name]:.2f} | {', '.join(f'{t:.2f}' for t in times)} | {ratio} | {floor:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
