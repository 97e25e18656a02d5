#!/usr/bin/env python
"""POST /predict throughput and latency for `python app.py` and `bentoml serve`, beside the raw
forward pass of the same model measured in the same run, and the servers' peak memory under
hostile uploads.

    .venv/bin/python scripts/benchmark_serving.py --store store
    .venv/bin/python scripts/benchmark_serving.py --package store/models/<version>
    .venv/bin/python scripts/benchmark_serving.py --untrained      # the default config's model, random weights

Trains nothing. The model is the production model of `--store`, the package `--package`, or
with `--untrained` the default config's architecture and image size with random weights (a
forward pass costs the same whatever the weights). Uploads are a mix: by default the 16
full-resolution X-rays of ../shared/data/kermany224/val, each client starting at its own one.

Each server is started here in its own process group on a free 127.0.0.1 port, with the
environment's XRAY_* settings, and stopped at the end:
- `app`: `python app.py` (uvicorn, one process, the model loaded from storage);
- `bentoml`: `bentoml serve xray.service:XrayService`, the package saved into a throw-away
  BentoML home.

Clients are closed-loop asyncio tasks (aiohttp, bodies encoded once) in this process: each
sends its next request when the last is answered, for `--duration` seconds per level. Every
level runs `--runs` times, interleaved, and the table shows the median of those runs. The
clients share the machine's cores with the server, as they did when issue 9 was measured.

Raw forward: in this process with no server running, before and after the servers, on the
serving thread count (XRAY_TORCH_THREADS; xray.inference.serving_threads): the
median time of the forward pass as served (ONNX Runtime when the package has model.onnx, else
channels-last torch; XRAY_INFERENCE_RUNTIME) at batch 1, and at batch 16 as images/s; and the
decode of the upload mix straight to model size. The ratios compare the servers with those.

Hostile phase (`--hostile-seconds`, 0 to skip): 8 clients send the hostile uploads of
scripts/hostile_uploads.py plus one legal worst case (a 16-bit PNG just under the pixel
limit, which is decoded); the peak resident memory of the server's process tree is sampled
every 50 ms and every answer's status is counted. The machine is shared: the load average is
printed at the start and the end; compare ratios, not absolute figures, across runs.
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
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
DEFAULT_IMAGE_FOLDER = REPO.parent / "shared" / "data" / "kermany224" / "val"

Upload = tuple[str, bytes]  # (content type header, multipart body)


@dataclass
class LevelResult:
    """One server at one concurrency in one run."""

    server: str
    run: int
    clients: int
    requests: int
    errors: int
    statuses: dict[str, int]
    p50_ms: float
    p99_ms: float
    requests_per_s: float
    peak_rss_mib: float


def free_port() -> int:
    """A loopback TCP port nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile (share in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share / 100 * len(ordered) + 0.5) - 1))]


def multipart(filename: str, data: bytes, field: str = "file") -> Upload:
    """A multipart/form-data body holding one file, and its content type, encoded once."""
    boundary = uuid.uuid4().hex
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()  # fmt: skip
    return f"multipart/form-data; boundary={boundary}", head + data + f"\r\n--{boundary}--\r\n".encode()


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def untrained_package(workdir: Path, config_path: Path = REPO / "configs" / "config.yaml") -> Path:
    """A config's (the default's) architecture, image size and intensity mapping, random weights, as a package."""
    from xray.config import load_config
    from xray.model import build_model_for
    from xray.package import ModelCard, write_package
    from xray.preprocessing import Preprocessing

    config = load_config(config_path)
    size = config.transformation.image_size
    architecture = config.trainer.architecture
    preprocessing = Preprocessing(size, 0.5, 0.25, intensity=config.transformation.intensity,
                                  border_mask=config.transformation.border_mask)  # fmt: skip
    card = ModelCard(version=f"untrained-{architecture}-{size}", architecture=architecture,
                     classes=["NORMAL", "PNEUMONIA"], preprocessing=preprocessing.to_dict(),
                     threshold=0.5, metrics={"roc_auc": 0.0})  # fmt: skip
    return write_package(workdir / "untrained", build_model_for(architecture, card.preprocessing), card)


def resolve_package(arguments: argparse.Namespace, workdir: Path) -> tuple[Path, str]:
    """(package folder, storage URI whose production model it is), publishing a package to a temporary store."""
    from xray.package import fetch_production, publish, read_card
    from xray.storage import LocalStorage, open_storage

    if arguments.package or arguments.untrained:
        package = Path(arguments.package).resolve() if arguments.package else untrained_package(workdir)
        store = LocalStorage(workdir / "store")
        publish(store, package, read_card(package).version)
        return package, store.uri
    uri = arguments.store if "://" in arguments.store else str(Path(arguments.store).resolve())
    package = fetch_production(open_storage(uri), workdir / "package-cache")
    if package is None:
        raise SystemExit(f"{arguments.store} has no production model: train one (python -m xray train), or pass "
                         "--package or --untrained")  # fmt: skip
    return package, uri


def legacy_store(package: Path, workdir: Path) -> str:
    """A store holding `package` with a card as written before issue 9 (no decode path), for the baseline server."""
    from xray.package import publish, read_card
    from xray.storage import LocalStorage

    legacy = shutil.copytree(package, workdir / "legacy-package")
    card_path = legacy / "model_card.json"
    card = json.loads(card_path.read_text())
    card["preprocessing"].pop("decode", None)
    card_path.write_text(json.dumps(card, indent=2, sort_keys=True))
    store = LocalStorage(workdir / "store-baseline")
    publish(store, legacy, read_card(legacy).version)
    return store.uri


def raw_figures(package: Path, images: list[bytes], runs: int) -> dict[str, float]:
    """Median ms of the forward pass at batch 1, images/s at batch 16, and ms per decode of the mix, as served."""
    import numpy as np
    import torch

    from xray.decoding import DecodeLimits
    from xray.inference import Predictor, use_serving_threads
    from xray.settings import Settings

    use_serving_threads(Settings.from_environment())  # as the servers do
    predictor = Predictor.from_package(package)
    limits = DecodeLimits(max_bytes=1 << 30)
    pixels = np.stack([predictor.decode(data, limits) for data in images])
    batch = np.resize(pixels, (16, *pixels.shape[1:]))

    def median_ms(function, repeats: int) -> float:
        function()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            function()
            times.append((time.perf_counter() - started) * 1000)
        return statistics.median(times)

    forward_1 = median_ms(lambda: predictor.forward_probabilities(pixels[:1]), runs * 5)
    forward_16 = median_ms(lambda: predictor.forward_probabilities(batch), runs)
    decode = median_ms(lambda: [predictor.decode(data, limits) for data in images], runs) / len(images)
    return {"forward_batch1_ms": forward_1, "forward_batch16_images_per_s": 16_000 / forward_16, "decode_ms": decode,
            "torch_threads": torch.get_num_threads(), "runtime": predictor.forward.name}  # fmt: skip


def process_tree_rss(pid: int) -> tuple[int, int]:
    """(resident bytes of a process and its descendants, of the largest one of them); zeros when gone."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    sizes = []
    for process in processes:
        try:
            sizes.append(process.memory_info().rss)
        except psutil.NoSuchProcess:
            continue
    return sum(sizes), max(sizes, default=0)


class MemoryWatch:
    """Samples a process tree's resident memory every 50 ms in a thread: peaks in bytes since the last reset.

    `peak` is the whole tree (BentoML runs a supervisor process beside its worker; shared library
    pages count once per process), `peak_process` the largest single process.
    """

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self.peak_process, self.running = pid, 0, 0, True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        while self.running:
            total, largest = process_tree_rss(self.pid)
            self.peak, self.peak_process = max(self.peak, total), max(self.peak_process, largest)
            time.sleep(0.05)

    def reset(self) -> None:
        self.peak, self.peak_process = process_tree_rss(self.pid)

    def stop(self) -> None:
        self.running = False
        self.thread.join()


@contextmanager
def server(kind: str, environment: dict[str, str], workdir: Path, startup_s: float,
           version: str) -> Iterator[tuple[str, MemoryWatch]]:  # fmt: skip
    """Start one server on a free loopback port in its own process group; yield (URL, memory watch) once ready."""
    import httpx

    port = free_port()
    if kind == "app":
        command, cwd = [sys.executable, str(REPO / "app.py")], workdir / "app"  # model cache under workdir
    elif kind == "baseline":
        baseline = Path(environment["XRAY_BENCHMARK_BASELINE"])
        command, cwd = [sys.executable, str(baseline / "app.py")], workdir / "baseline"
        environment = {**environment, "PYTHONPATH": str(baseline),
                       "XRAY_STORAGE_URI": environment["XRAY_BENCHMARK_BASELINE_STORE"],
                       "XRAY_MODEL_CACHE": str(workdir / "baseline-model-cache")}  # fmt: skip
    elif kind == "baseline-bentoml":
        baseline = Path(environment["XRAY_BENCHMARK_BASELINE"])
        command = [sys.executable, "-m", "bentoml", "serve", "xray.service:XrayService", "--host", "127.0.0.1",
                   "--port", str(port)]  # fmt: skip
        cwd = baseline
        environment = {**environment, "PYTHONPATH": str(baseline),
                       "XRAY_BENTOML_MODEL": environment["XRAY_BENCHMARK_BASELINE_BENTO"]}  # fmt: skip
    else:
        command = [sys.executable, "-m", "bentoml", "serve", "xray.service:XrayService", "--host", "127.0.0.1",
                   "--port", str(port)]  # fmt: skip
        cwd = REPO
    cwd.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{kind}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=cwd, env={**environment, "PORT": str(port)}, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    watch = None
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
        watch = MemoryWatch(process.pid)
        yield url, watch
    finally:
        if watch is not None:
            watch.stop()
        for signum, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(process.pid, signum)
                process.wait(timeout=grace)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


async def closed_loop(url: str, uploads: list[Upload], clients: int, seconds: float,
                      path: str = "/predict") -> tuple[list[float], Counter, float]:  # fmt: skip
    """`clients` tasks posting uploads back to back for `seconds`: (latencies ms of 200s, statuses, wall seconds)."""
    import aiohttp

    latencies: list[float] = []
    statuses: Counter = Counter()
    connector = aiohttp.TCPConnector(limit=clients, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(base_url=url, connector=connector, timeout=timeout) as session:
        deadline = time.perf_counter() + seconds

        async def client(index: int) -> None:
            sent = index
            while time.perf_counter() < deadline:
                content_type, body = uploads[sent % len(uploads)]
                sent += 1
                started = time.perf_counter()
                try:
                    async with session.post(path, data=body, headers={"Content-Type": content_type}) as response:
                        await response.read()
                        status = str(response.status)
                except (TimeoutError, aiohttp.ClientError) as error:
                    status = type(error).__name__
                statuses[status] += 1
                if status == "200":
                    latencies.append((time.perf_counter() - started) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(client(index) for index in range(clients)))
        return latencies, statuses, time.perf_counter() - started


def run_level(kind: str, run: int, url: str, watch: MemoryWatch, uploads: list[Upload], clients: int,
              seconds: float) -> LevelResult:  # fmt: skip
    watch.reset()
    latencies, statuses, wall = asyncio.run(closed_loop(url, uploads, clients, seconds))
    if not latencies:
        raise SystemExit(f"{kind}: every request failed at {clients} clients: {dict(statuses)}")
    ok = statuses["200"]
    result = LevelResult(kind, run, clients, sum(statuses.values()), sum(statuses.values()) - ok, dict(statuses),
                         percentile(latencies, 50), percentile(latencies, 99), ok / wall,
                         watch.peak / 2**20)  # fmt: skip
    print(f"  {kind:<8}{run:>4}{clients:>8}{result.requests:>9}{result.errors:>7}{result.p50_ms:>9.1f}"
          f"{result.p99_ms:>9.1f}{result.requests_per_s:>9.1f}{result.peak_rss_mib:>10.0f}", flush=True)
    return result


def hostile_phase(kind: str, url: str, watch: MemoryWatch, seconds: float) -> dict[str, object]:
    """8 clients sending the hostile uploads (and a legal worst case): peak RSS and the answers' statuses."""
    import io

    import httpx
    import numpy as np
    from hostile_uploads import hostile_uploads
    from PIL import Image

    from xray.settings import Settings

    side = int(Settings.from_environment().max_image_pixels**0.5)
    ramp = (np.arange(side, dtype=np.uint32)[None, :] * 7 + np.arange(side, dtype=np.uint32)[:, None]) % 65536
    buffer = io.BytesIO()
    Image.fromarray(ramp.astype(np.uint16)).save(buffer, format="PNG")
    cases = [*hostile_uploads()]
    uploads = [multipart(case.filename, case.data) for case in cases] + [multipart("deep-at-limit.png",
                                                                                   buffer.getvalue())]  # fmt: skip
    watch.reset()
    _, statuses, _ = asyncio.run(closed_loop(url, uploads, 8, seconds))
    alive = httpx.get(f"{url}/health", timeout=10).status_code == 200
    figures = {"server": kind, "peak_rss_mib": watch.peak / 2**20, "peak_process_rss_mib": watch.peak_process / 2**20,
               "statuses": dict(statuses),
               "alive_after": alive, "deep_png_side": side}  # fmt: skip
    print(f"  {kind}: hostile uploads, 8 clients, {seconds:.0f} s: peak RSS {figures['peak_rss_mib']:.0f} MiB "
          f"(largest process {figures['peak_process_rss_mib']:.0f} MiB), "
          f"answers {dict(sorted(statuses.items()))} (the {side}x{side} 16-bit PNG is legal: 200 or 503); "
          f"{'alive' if alive else 'NOT ANSWERING'} after", flush=True)
    return figures


def median_table(results: list[LevelResult], servers: list[str], levels: list[int]) -> list[str]:
    """The issue's table, each cell the median over runs."""
    def median(kind: str, clients: int, field: str) -> float:
        return statistics.median(getattr(result, field) for result in results
                                 if result.server == kind and result.clients == clients)  # fmt: skip

    header = "| server | " + " | ".join(f"{level} client{'s' * (level > 1)}: req/s (p50 / p99 ms)" for level in levels)
    lines = [header + " | peak RSS MiB |", "|---" * (len(levels) + 2) + "|"]
    for kind in servers:
        cells = [f"{median(kind, level, 'requests_per_s'):.1f} ({median(kind, level, 'p50_ms'):.1f} / "
                 f"{median(kind, level, 'p99_ms'):.0f})" for level in levels]  # fmt: skip
        peak = max(result.peak_rss_mib for result in results if result.server == kind)
        name = {"app": "python app.py", "bentoml": "bentoml serve", "baseline": "python app.py (baseline)",
                "baseline-bentoml": "bentoml serve (baseline)"}[kind]
        lines.append(f"| `{name}` | " + " | ".join(cells)
                     + f" | {peak:.0f} |")  # fmt: skip
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--store", default=str(REPO / "store"), help="storage URI with a promoted model")
    source.add_argument("--package", help="a model package folder (model.safetensors + model_card.json)")
    source.add_argument("--untrained", action="store_true", help="the default config's model with random weights")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGE_FOLDER, help="folder of X-rays to upload")
    parser.add_argument("--servers", nargs="+", choices=("app", "bentoml", "baseline", "baseline-bentoml"),
                        default=["app", "bentoml"])
    parser.add_argument("--baseline", type=Path, help="another checkout whose `python app.py` and `bentoml serve` "
                        "run as servers `baseline` and `baseline-bentoml` (e.g. ../main, the code before issue 9)")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per level and run")
    parser.add_argument("--runs", type=int, default=3, help="runs of every level; the table shows their medians")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds at 8 clients first")
    parser.add_argument("--hostile-seconds", type=float, default=10.0, help="hostile phase length (0: skip)")
    parser.add_argument("--startup-timeout", type=float, default=180.0, help="seconds for a server to come up")
    parser.add_argument("--raw-runs", type=int, default=5, help="timed runs per raw figure")
    parser.add_argument("--json", help="also write every figure to this JSON file")
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
        paths = sorted(path for path in arguments.images.rglob("*") if path.suffix.lower() in (".jpeg", ".jpg", ".png"))
        if not paths:
            raise SystemExit(f"no X-ray under {arguments.images}: pass --images")
        images = [path.read_bytes() for path in paths]
        uploads = [multipart(path.name, data) for path, data in zip(paths, images, strict=True)]
        python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        environment = {**os.environ, "XRAY_STORAGE_URI": storage_uri, "XRAY_BENTOML_MODEL": bento_tag,
                       "XRAY_MODEL_CACHE": str(workdir / "model-cache"),
                       "XRAY_CONFIG": str(REPO / "configs" / "config.yaml"), "PYTHONPATH": python_path}  # fmt: skip
        environment.pop("XRAY_API_TOKEN", None)
        if {"baseline", "baseline-bentoml"} & set(arguments.servers):
            if arguments.baseline is None:
                raise SystemExit("--servers baseline needs --baseline CHECKOUT")
            environment["XRAY_BENCHMARK_BASELINE"] = str(arguments.baseline.resolve())
            environment["XRAY_BENCHMARK_BASELINE_STORE"] = legacy_store(package, workdir)
            legacy = workdir / "legacy-package"
            environment["XRAY_BENCHMARK_BASELINE_BENTO"] = save_to_bentoml(legacy, read_card(legacy),
                                                                           "xray-pneumonia-legacy")  # fmt: skip

        print(f"model {card.version} ({card.architecture}, {card.preprocessing_spec.image_size} px, decode "
              f"{card.preprocessing_spec.decode}); {len(paths)} uploads from {arguments.images} (mean "
              f"{statistics.mean(map(len, images)) / 1024:.0f} KiB); {load_average()}", flush=True)  # fmt: skip
        raw = [raw_figures(package, images, arguments.raw_runs)]
        print(f"raw before the servers ({raw[0]['runtime']}, {raw[0]['torch_threads']} threads): forward batch 1 "
              f"{raw[0]['forward_batch1_ms']:.2f} ms, batch 16 {raw[0]['forward_batch16_images_per_s']:.0f} images/s; "
              f"decode to model size {raw[0]['decode_ms']:.2f} ms/image", flush=True)  # fmt: skip
        print(f"  {'server':<8}{'run':>4}{'clients':>8}{'requests':>9}{'errors':>7}{'p50 ms':>9}{'p99 ms':>9}"
              f"{'req/s':>9}{'RSS MiB':>10}", flush=True)  # fmt: skip
        results: list[LevelResult] = []
        hostile: list[dict[str, object]] = []
        for kind in arguments.servers:
            with server(kind, environment, workdir, arguments.startup_timeout, card.version) as (url, watch):
                asyncio.run(closed_loop(url, uploads, 8, arguments.warmup))
                for run in range(1, arguments.runs + 1):
                    for clients in arguments.concurrency:
                        results.append(run_level(kind, run, url, watch, uploads, clients, arguments.duration))
                if arguments.hostile_seconds > 0:
                    hostile.append(hostile_phase(kind, url, watch, arguments.hostile_seconds))
        raw.append(raw_figures(package, images, arguments.raw_runs))
        print(f"raw after the servers: forward batch 1 {raw[1]['forward_batch1_ms']:.2f} ms, batch 16 "
              f"{raw[1]['forward_batch16_images_per_s']:.0f} images/s; decode {raw[1]['decode_ms']:.2f} ms/image; "
              f"{load_average()}", flush=True)  # fmt: skip

        print(f"\nmedians of {arguments.runs} runs, {arguments.duration:.0f} s per level:")
        print("\n".join(median_table(results, arguments.servers, arguments.concurrency)))
        best_rate = max(figure["forward_batch16_images_per_s"] for figure in raw)
        best_single = min(figure["forward_batch1_ms"] + figure["decode_ms"] for figure in raw)
        print(f"ratios against the raw figures (best of before/after: {best_rate:.0f} images/s forward at batch 16; "
              f"{best_single:.1f} ms decode + batch-1 forward):")  # fmt: skip
        for kind in arguments.servers:
            for clients in arguments.concurrency:
                rate = statistics.median(result.requests_per_s for result in results
                                         if result.server == kind and result.clients == clients)  # fmt: skip
                p50 = statistics.median(result.p50_ms for result in results
                                        if result.server == kind and result.clients == clients)  # fmt: skip
                print(f"  {kind:<8}{clients:>3} clients: {rate / best_rate:.2f} of the raw forward rate; "
                      f"p50 {p50 / best_single:.1f}x the raw single-image cost")
        if arguments.json:
            Path(arguments.json).write_text(json.dumps({
                "model": card.version, "images": [str(path) for path in paths], "raw": raw,
                "levels": [asdict(result) for result in results], "hostile": hostile}, indent=2))  # fmt: skip
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
