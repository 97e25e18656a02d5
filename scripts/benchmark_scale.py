#!/usr/bin/env python
"""Time ingestion and transformation, and measure their peak memory, on generated stores of growing size.

    nice -n 10 .venv/bin/python scripts/benchmark_scale.py --sizes 5000,25000,100000 --workdir /tmp/xray-scale

For each size, builds (once) a local store with scripts/generate_store.py, then runs each stage in a
child process with fresh artifacts, so the decoded cache is built from scratch and each stage's peak
RSS (the kernel's ru_maxrss of that child alone, from wait4) is its own. A child that only imports the
pipeline shows the fixed part of that memory. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run_stage(stage: str, store: Path, artifacts: Path, config_path: str) -> None:
    """Child process: run one stage (or only the imports) and print its seconds as JSON."""
    from xray.components import data_ingestion, data_transformation
    from xray.config import load_config
    from xray.entity.artifacts import DataIngestionArtifact
    from xray.pipeline import start_run
    from xray.storage import LocalStorage

    config = dataclasses.replace(load_config(config_path), artifacts_dir=str(artifacts))
    storage = LocalStorage(store)
    started = time.perf_counter()
    if stage == "ingestion":
        data_ingestion.run(config, start_run(config, storage, "scale"), storage)
    elif stage == "transformation":
        ingestion = DataIngestionArtifact.load(artifacts / "scale" / data_ingestion.STAGE)
        data_transformation.run(config, ingestion, storage)
    print(json.dumps({"seconds": time.perf_counter() - started}))


def measured(stage: str, store: Path, artifacts: Path, config_path: str) -> tuple[float, float]:
    """Seconds and peak RSS in MB of one stage in its own child process."""
    command = [sys.executable, __file__, "--stage", stage, "--store", str(store), "--artifacts", str(artifacts),
               "--config", config_path]  # fmt: skip
    child = subprocess.Popen(command, stdout=subprocess.PIPE, cwd=REPO)
    output = child.stdout.read() if child.stdout else b""
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"the {stage} child failed with exit code {child.returncode}")
    return json.loads(output.decode().strip().splitlines()[-1])["seconds"], usage.ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="5000,25000,100000", help="comma-separated image counts")
    parser.add_argument("--workdir", default="/tmp/xray-scale", help="stores and artifacts go here")
    parser.add_argument("--config", default=str(REPO / "configs" / "config.yaml"))
    parser.add_argument("--stage", choices=["imports", "ingestion", "transformation"], help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--artifacts", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.stage:
        run_stage(arguments.stage, Path(arguments.store), Path(arguments.artifacts), arguments.config)
        return 0

    workdir = Path(arguments.workdir)
    rows = []
    for count in [int(size) for size in arguments.sizes.split(",")]:
        store = workdir / f"store-{count}"
        subprocess.run([sys.executable, str(REPO / "scripts" / "generate_store.py"), "--count", str(count),
                        "--out", str(store)], check=True)  # fmt: skip
        artifacts = workdir / f"artifacts-{count}"
        shutil.rmtree(artifacts, ignore_errors=True)
        _, imports_rss = measured("imports", store, artifacts, arguments.config)
        ingestion = measured("ingestion", store, artifacts, arguments.config)
        transformation = measured("transformation", store, artifacts, arguments.config)
        rows.append((count, imports_rss, *ingestion, *transformation))
        print(f"{count} images: ingestion {ingestion[0]:.1f} s, {ingestion[1]:.0f} MB; "
              f"transformation {transformation[0]:.1f} s, {transformation[1]:.0f} MB", flush=True)  # fmt: skip
        shutil.rmtree(artifacts, ignore_errors=True)

    print("\n| images | ingestion s | ingestion peak RSS MB | transformation s | transformation peak RSS MB "
          "| imports alone MB |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for count, imports_rss, ingestion_s, ingestion_mb, transformation_s, transformation_mb in rows:
        print(f"| {count:,} | {ingestion_s:.1f} | {ingestion_mb:.0f} | {transformation_s:.1f} | "
              f"{transformation_mb:.0f} | {imports_rss:.0f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
