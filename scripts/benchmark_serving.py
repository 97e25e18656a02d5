#!/usr/bin/env python
"""Measure POST /predict latency and throughput for the FastAPI app and the BentoML service,
beside the raw forward pass of the same model, and print the figures.

    .venv/bin/python scripts/benchmark_serving.py --store store
    .venv/bin/python scripts/benchmark_serving.py --package store/models/<version> --requests 100

Trains nothing. The model is the production model of `--store` (a storage URI; default
./store) or the package folder `--package`. Each server is started here, one at a time, on
a free 127.0.0.1 port and stopped at the end:

- `app`: app.py's FastAPI app under uvicorn, as `python app.py` runs it (one process),
  loading the model from storage as in production;
- `bentoml`: `bentoml serve xray.service:XrayService`, loading the model from a
  throw-away BentoML home the package is saved into (adaptive batching on /predict).

Clients are asyncio tasks sharing one httpx connection pool, `--requests` per level at
each concurrency in `--concurrency`, after a warm-up (which also trains BentoML's batching
optimiser). They run on the same machine, so on a small CPU they take a share of it.
The raw forward pass is timed in this process with no server running, before and after
the servers: `torch.no_grad`, eval mode, preprocessing excluded, the median of
`--raw-runs` runs, on a worker thread as in both servers, at torch's default thread count
and at one thread. The ratios use the fastest of these: on a CPU shared with another busy
process, torch's multi-threaded (OpenMP) forward pass was at times 10-300x slower here
(95 ms instead of 0.4 ms for the smoke model) while the servers were not, so a large gap
between the lines means a noisy machine and figures to take with care.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_IMAGE_FOLDER = REPO.parent / "shared" / "data" / "kermany224" / "val"


@dataclass
class LevelResult:
    """One server at one concurrency."""

    server: str
    clients: int
    requests: int
    errors: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    requests_per_s: float


def free_port() -> int:
    """A loopback TCP port nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile (share in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share / 100 * len(ordered) + 0.5) - 1))]


def default_image() -> Path:
    """The first X-ray of the shared Kermany validation split."""
    for folder in ("PNEUMONIA", "NORMAL"):
        found = sorted((DEFAULT_IMAGE_FOLDER / folder).glob("*.jpeg"))
        if found:
            return found[0]
    raise SystemExit(f"no X-ray under {DEFAULT_IMAGE_FOLDER}: pass --image")


def resolve_package(arguments: argparse.Namespace, workdir: Path) -> tuple[Path, str]:
    """(package folder, storage URI whose production model it is), publishing `--package` to a temporary store."""
    from xray.package import fetch_production, publish, read_card
    from xray.storage import LocalStorage, open_storage

    if arguments.package:
        package = Path(arguments.package).resolve()
        store = LocalStorage(workdir / "store")
        publish(store, package, read_card(package).version)
        return package, store.uri
    uri = arguments.store if "://" in arguments.store else str(Path(arguments.store).resolve())
    package = fetch_production(open_storage(uri), workdir / "package-cache")
    if package is None:
        raise SystemExit(f"{arguments.store} has no production model: train one (python -m xray train) or pass "
                         "--package")  # fmt: skip
    return package, uri


def raw_forward(package: Path, image_path: Path, runs: int, threads: int) -> dict[str, float]:
    """Median milliseconds of the model's forward pass at batch 1 and 32, and of Predictor.predict at batch 1."""
    import torch

    from xray.decoding import DecodeLimits, decode_image
    from xray.inference import Predictor
    from xray.preprocessing import normalise

    predictor = Predictor.from_package(package)
    image = decode_image(image_path.read_bytes(), DecodeLimits(max_bytes=1 << 30))
    single = normalise(predictor.prepare(image), predictor.preprocessing)
    batch = single.expand(32, -1, -1, -1).contiguous()

    def median_ms(function) -> float:
        for _ in range(2):  # warm-up
            function()
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            function()
            times.append((time.perf_counter() - started) * 1000)
        return statistics.median(times)

    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            forward_1 = median_ms(lambda: predictor.model(single))
            forward_32 = median_ms(lambda: predictor.model(batch))
        predict_1 = median_ms(lambda: predictor.predict([image]))
    finally:
        torch.set_num_threads(default_threads)
    return {"forward_batch1_ms": forward_1, "forward_batch32_ms": forward_32,
            "forward_batch32_images_per_s": 32_000 / forward_32, "predict_batch1_ms": predict_1,
            "torch_threads": threads}  # fmt: skip


def timed_raw(when: str, package: Path, image_path: Path, runs: int) -> list[dict[str, float]]:
    """`raw_forward` at torch's default thread count and at 1 thread, on a worker thread as in the servers; printed."""
    import torch

    figures = []
    for threads in sorted({torch.get_num_threads(), 1}, reverse=True):
        with ThreadPoolExecutor(max_workers=1) as pool:
            raw = pool.submit(raw_forward, package, image_path, runs, threads).result()
        print(f"raw {when} the servers, {threads} torch thread(s), median of {runs}: forward batch 1 "
              f"{raw['forward_batch1_ms']:.2f} ms; batch 32 {raw['forward_batch32_ms']:.1f} ms = "
              f"{raw['forward_batch32_images_per_s']:.0f} images/s; Predictor.predict (resize + normalise + forward) "
              f"batch 1 {raw['predict_batch1_ms']:.2f} ms", flush=True)  # fmt: skip
        figures.append({"when": when, **raw})
    return figures


@contextmanager
def server(kind: str, environment: dict[str, str], workdir: Path, startup_s: float, version: str) -> Iterator[str]:
    """Start one server on a free loopback port in its own process group; yield its URL once it serves `version`."""
    import httpx

    port = free_port()
    if kind == "app":
        command = [sys.executable, "-m", "uvicorn", "app:app", "--app-dir", str(REPO), "--host", "127.0.0.1",
                   "--port", str(port)]  # fmt: skip
        cwd = workdir / "app"  # its model cache (artifacts/cache/models) lands here, not in the repo
    else:
        command = [sys.executable, "-m", "bentoml", "serve", "xray.service:XrayService", "--host", "127.0.0.1",
                   "--port", str(port)]  # fmt: skip
        cwd = REPO
    cwd.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{kind}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=cwd, env=environment, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if process.poll() is not None:
                raise SystemExit(f"{kind} server exited with {process.returncode}; log: {log_path}")
            if time.monotonic() > deadline:
                raise SystemExit(f"{kind} server not ready after {startup_s:.0f} s; log: {log_path}")
            try:
                health = httpx.get(f"{url}/health", timeout=2)
                if health.status_code == 200 and health.json().get("model_version") == version:
                    break
            except (httpx.TransportError, ValueError):
                pass
            time.sleep(0.5)
        yield url
    finally:
        for signum, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(process.pid, signum)
                process.wait(timeout=grace)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


async def load(url: str, upload: tuple[str, bytes, str], clients: int, requests: int,
               timeout_s: float) -> tuple[list[float], int, float]:  # fmt: skip
    """`requests` POST /predict from `clients` concurrent tasks: (latencies ms of the 200s, errors, wall seconds)."""
    import httpx

    latencies: list[float] = []
    errors = 0
    remaining = requests
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:

        async def worker() -> None:
            nonlocal remaining, errors
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                try:
                    response = await client.post("/predict", files={"file": upload})
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append((time.perf_counter() - started) * 1000)
                else:
                    errors += 1

        started = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(clients))),
                               timeout=timeout_s * (requests / clients + 1))  # fmt: skip
        return latencies, errors, time.perf_counter() - started


def benchmark_server(
    kind: str, url: str, upload: tuple[str, bytes, str], arguments: argparse.Namespace
) -> list[LevelResult]:
    """Warm up, then every concurrency level in turn."""
    asyncio.run(load(url, upload, min(8, max(arguments.concurrency)), arguments.warmup, arguments.timeout))
    results = []
    for clients in arguments.concurrency:
        latencies, errors, wall = asyncio.run(load(url, upload, clients, arguments.requests, arguments.timeout))
        if not latencies:
            raise SystemExit(f"{kind}: every request failed at {clients} clients")
        results.append(
            LevelResult(
                kind,
                clients,
                arguments.requests,
                errors,
                percentile(latencies, 50),
                percentile(latencies, 95),
                percentile(latencies, 99),
                len(latencies) / wall,
            )
        )
        print(
            f"  {kind:<8}{clients:>8}{arguments.requests:>10}{errors:>8}{results[-1].p50_ms:>10.1f}"
            f"{results[-1].p95_ms:>10.1f}{results[-1].p99_ms:>10.1f}{results[-1].requests_per_s:>10.1f}",
            flush=True,
        )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--store", default=str(REPO / "store"), help="storage URI with a promoted model")
    source.add_argument("--package", help="a model package folder (model.safetensors + model_card.json)")
    parser.add_argument("--image", type=Path, help="the X-ray to upload (default: one from ../shared/data)")
    parser.add_argument("--servers", nargs="+", choices=("app", "bentoml"), default=["app", "bentoml"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=200, help="requests per concurrency level")
    parser.add_argument("--warmup", type=int, default=40, help="unmeasured requests before the levels")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    parser.add_argument("--startup-timeout", type=float, default=180.0, help="seconds for a server to come up")
    parser.add_argument("--raw-runs", type=int, default=9, help="timed runs per raw forward figure")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    arguments = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="xray-serving-benchmark-"))
    # BentoML reads its home at import: a throw-away one, before anything imports bentoml.
    os.environ["BENTOML_HOME"] = str(workdir / "bentoml_home")
    os.environ["BENTOML_DO_NOT_TRACK"] = "true"
    from xray.package import read_card, save_to_bentoml

    try:
        package, storage_uri = resolve_package(arguments, workdir)
        card = read_card(package)
        bento_tag = save_to_bentoml(package, card, "xray-pneumonia")
        image = arguments.image or default_image()
        content_type = "image/png" if image.suffix.lower() == ".png" else "image/jpeg"
        upload = (image.name, image.read_bytes(), content_type)
        python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        environment = {**os.environ, "XRAY_STORAGE_URI": storage_uri, "XRAY_BENTOML_MODEL": bento_tag,
                       "XRAY_CONFIG": str(REPO / "configs" / "config.yaml"), "PYTHONPATH": python_path}  # fmt: skip
        environment.pop("XRAY_API_TOKEN", None)

        print(
            f"model {card.version} ({card.architecture}, {card.preprocessing_spec.image_size} px), "
            f"image {image.name} ({len(upload[1]):,} bytes), {os.cpu_count()} CPUs",
            flush=True,
        )
        raw_figures = timed_raw("before", package, image, arguments.raw_runs)
        print(f"  {'server':<8}{'clients':>8}{'requests':>10}{'errors':>8}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}"
              f"{'req/s':>10}", flush=True)  # fmt: skip
        results: list[LevelResult] = []
        for kind in arguments.servers:
            with server(kind, environment, workdir, arguments.startup_timeout, card.version) as url:
                results += benchmark_server(kind, url, upload, arguments)

        raw_figures += timed_raw("after", package, image, arguments.raw_runs)
        raw = {
            name: min(figure[name] for figure in raw_figures) for name in ("forward_batch1_ms", "forward_batch32_ms")
        }
        raw["forward_batch32_images_per_s"] = 32_000 / raw["forward_batch32_ms"]
        print("ratios (raw: the fastest of the raw lines above):")
        for kind in arguments.servers:
            levels = {result.clients: result for result in results if result.server == kind}
            if 1 in levels:
                print(
                    f"  {kind}: p50 at 1 client / raw batch-1 forward = "
                    f"{levels[1].p50_ms / raw['forward_batch1_ms']:.1f}x"
                )
            top = max(levels)
            print(
                f"  {kind}: req/s at {top} clients / raw batch-32 images/s = "
                f"{levels[top].requests_per_s / raw['forward_batch32_images_per_s']:.3f}"
            )
        if arguments.json:
            Path(arguments.json).write_text(
                json.dumps(
                    {
                        "model": card.version,
                        "image": str(image),
                        "raw": raw,
                        "raw_runs": raw_figures,
                        "levels": [asdict(result) for result in results],
                    },
                    indent=2,
                )
            )
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
