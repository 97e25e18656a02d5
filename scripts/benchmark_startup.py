"""How fast a new user's commands answer: `--help`, `upload-data` of 10 images, and `python app.py` to /health.

    .venv/bin/python scripts/benchmark_startup.py [--runs 3] [--images ../shared/data/kermany224/val]

Each figure is the median of `--runs` fresh processes (wall time from start to exit, or to the
first 200 from /health). The machine's load average is printed with them: on a shared machine,
compare figures only within one run of this script.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "kermany224" / "val"


def timed(command: list[str], environment: dict[str, str], cwd: Path) -> float:
    """Seconds one command takes from start to exit; it must succeed."""
    started = time.perf_counter()
    subprocess.run(command, env=environment, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def time_to_health(environment: dict[str, str], cwd: Path, timeout: float = 120.0) -> float:
    """Seconds from starting `python app.py` until GET /health first answers 200."""
    port = free_port()
    started = time.perf_counter()
    server = subprocess.Popen([sys.executable, str(REPO / "app.py")], env=environment | {"PORT": str(port)}, cwd=cwd,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        while time.perf_counter() - started < timeout:
            if server.poll() is not None:
                raise RuntimeError(f"app.py exited with status {server.returncode} before /health answered")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as answer:
                    if answer.status == 200:
                        return time.perf_counter() - started
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"/health did not answer within {timeout:.0f} s")
    finally:
        server.terminate()
        server.wait(timeout=30)


def labelled_copy(images: Path, count: int, destination: Path) -> Path:
    """`count` images of `images` (its NORMAL/ and PNEUMONIA/ folders, alternating) in a fresh labelled folder."""
    classes = ("NORMAL", "PNEUMONIA")
    chosen = sorted(path for path in images.rglob("*") if path.is_file() and path.parent.name in classes)
    by_class = {name: [path for path in chosen if path.parent.name == name] for name in classes}
    mixed = [path for pair in zip(by_class["NORMAL"], by_class["PNEUMONIA"], strict=False) for path in pair][:count]
    if len(mixed) < count:
        raise SystemExit(f"{images} holds fewer than {count} NORMAL/PNEUMONIA images")
    for path in mixed:
        (destination / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, destination / path.parent.name / path.name)
    return destination


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per figure (median reported)")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder with NORMAL/ and PNEUMONIA/")
    parser.add_argument("--count", type=int, default=10, help="images to upload")
    arguments = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="xray-startup-") as scratch:
        root = Path(scratch)
        folder = labelled_copy(arguments.images, arguments.count, root / "images")
        environment = {key: value for key, value in os.environ.items() if not key.startswith("XRAY_")}
        environment |= {"BENTOML_DO_NOT_TRACK": "true", "XRAY_HOME": str(root)}
        help_times, upload_times, health_times = [], [], []
        for run in range(arguments.runs):
            help_times.append(timed([sys.executable, "-m", "xray", "--help"], environment, root))
            store = {"XRAY_STORAGE_URI": str(root / f"store-{run}")}
            upload_times.append(timed([sys.executable, "-m", "xray", "upload-data", str(folder)], environment | store,
                                      root))  # fmt: skip
            health_times.append(time_to_health(environment | store, root))
        load = os.getloadavg()
        print(f"cores: {os.cpu_count()}  load average (1, 5, 15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        print(f"median of {arguments.runs} runs (all runs in brackets), seconds:")
        for name, times in (("python -m xray --help", help_times),
                            (f"python -m xray upload-data ({arguments.count} images)", upload_times),
                            ("python app.py until /health answers 200", health_times)):  # fmt: skip
            print(f"  {name:<48} {statistics.median(times):6.2f}  [{', '.join(f'{t:.2f}' for t in times)}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
