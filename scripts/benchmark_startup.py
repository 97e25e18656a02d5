"""How fast a new user's commands answer: `--help`, `upload-data` of 10 images, and `python app.py` to /health.

    .venv/bin/python scripts/benchmark_startup.py [--runs 3] [--images ../shared/data/kermany224/val]
        [--store STORE_WITH_A_MODEL] [--baseline OTHER_CHECKOUT]

Each figure is the median of `--runs` fresh processes (wall time from start to exit, or to the
first 200 from /health). `--store` serves a copy of a store holding a production model (default:
an empty store); `--baseline` times another checkout (its own `.venv`) in the same run, for a ratio.
The machine's load average is printed with them: on a shared machine, compare figures only within
one run of this script.
"""

from __future__ import annotations

import argparse
import os
import resource
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


def children_cpu() -> float:
    """CPU seconds (user + system) used so far by finished child processes."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str], environment: dict[str, str], cwd: Path, cpu: list[float]) -> float:
    """Seconds one command takes from start to exit (its CPU seconds appended to `cpu`); it must succeed."""
    cpu_before, started = children_cpu(), time.perf_counter()
    subprocess.run(command, env=environment, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - started
    cpu.append(children_cpu() - cpu_before)
    return elapsed


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def time_to_health(python: str, project: Path, environment: dict[str, str], cwd: Path, timeout: float = 180.0) -> float:
    """Seconds from starting `python app.py` until GET /health first answers 200."""
    port = free_port()
    started = time.perf_counter()
    server = subprocess.Popen([python, str(project / "app.py")], env=environment | {"PORT": str(port)}, cwd=cwd,
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


def measure(python: str, project: Path, folder: Path, store: Path | None, root: Path, runs: int,
            environment: dict[str, str]) -> dict[str, list[float]]:  # fmt: skip
    """The three timings of one checkout, `runs` times each, every run with fresh stores."""
    figures: dict[str, list[float]] = {"help": [], "upload": [], "health": [], "help cpu": [], "upload cpu": []}
    for run in range(runs):
        scratch = root / f"{project.name}-{run}"
        scratch.mkdir()
        figures["help"].append(timed([python, "-m", "xray", "--help"], environment, scratch, figures["help cpu"]))
        upload_environment = environment | {"XRAY_STORAGE_URI": str(scratch / "upload-store")}
        figures["upload"].append(timed([python, "-m", "xray", "upload-data", str(folder)], upload_environment, scratch,
                                       figures["upload cpu"]))  # fmt: skip
        served = scratch / "served-store"
        if store is not None:
            shutil.copytree(store, served)
        figures["health"].append(time_to_health(python, project, environment | {"XRAY_STORAGE_URI": str(served)},
                                                scratch))  # fmt: skip
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per figure (median reported)")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder with NORMAL/ and PNEUMONIA/")
    parser.add_argument("--count", type=int, default=10, help="images to upload")
    parser.add_argument("--store", type=Path, help="a store with a production model for app.py (default: empty)")
    parser.add_argument("--baseline", type=Path, help="another checkout of the project to time in the same run")
    arguments = parser.parse_args()

    checkouts = [("this checkout", sys.executable, REPO)]
    if arguments.baseline:
        baseline = arguments.baseline.resolve()
        checkouts.append((f"baseline {baseline}", str(baseline / ".venv" / "bin" / "python"), baseline))
    with tempfile.TemporaryDirectory(prefix="xray-startup-") as scratch:
        root = Path(scratch)
        folder = labelled_copy(arguments.images, arguments.count, root / "images")
        environment = {key: value for key, value in os.environ.items() if not key.startswith("XRAY_")}
        environment |= {"BENTOML_DO_NOT_TRACK": "true"}
        results = {name: measure(python, project, folder, arguments.store, root, arguments.runs, environment)
                   for name, python, project in checkouts}  # fmt: skip
        load = os.getloadavg()
        print(f"cores: {os.cpu_count()}  load average (1, 5, 15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        print(f"app.py serves {'a copy of ' + str(arguments.store) if arguments.store else 'an empty store'}")
        print(f"median of {arguments.runs} runs (all runs in brackets), wall seconds; CPU seconds (user + system) "
              "of the command beside it, which a busy machine inflates less:")
        labels = {"help": "python -m xray --help", "upload": f"python -m xray upload-data ({arguments.count} images)",
                  "health": "python app.py until /health answers 200"}  # fmt: skip
        for name, figures in results.items():
            print(f"{name}:")
            for key, label in labels.items():
                times = figures[key]
                ratio = ""
                if name != "this checkout":
                    ours = statistics.median(results["this checkout"][key])
                    ratio = f"  (this checkout: {ours / statistics.median(times):.2f}x)"
                cpu = figures.get(f"{key} cpu")
                cpu_text = f"  CPU {statistics.median(cpu):.2f}" if cpu else ""
                print(f"  {label:<48} {statistics.median(times):6.2f}  [{', '.join(f'{t:.2f}' for t in times)}]"
                      f"{cpu_text}{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
