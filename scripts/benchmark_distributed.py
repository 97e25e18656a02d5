#!/usr/bin/env python
"""Epoch time of training in 2 processes x 1 thread (torchrun, gloo) against 1 process x 2 threads (and x 1).

    .venv/bin/python scripts/benchmark_distributed.py --epochs 1 --runs 3 [--data FOLDER]

Prepares the data once (ingestion and transformation of --data, default the shared Kermany training
set, with --config), then trains the same config in each layout, alternating, --runs times, and
prints each epoch's seconds and training images per second from the run's history.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from xray import distributed  # noqa: E402
from xray.components import data_ingestion, data_transformation, model_trainer  # noqa: E402
from xray.config import PipelineConfig, load_config  # noqa: E402
from xray.entity.artifacts import DataTransformationArtifact  # noqa: E402
from xray.pipeline import start_run  # noqa: E402
from xray.storage import LocalStorage  # noqa: E402


def configured(arguments: argparse.Namespace, threads: int) -> PipelineConfig:
    """The config under test, with this benchmark's folder, epoch count and thread count."""
    config = load_config(arguments.config)
    trainer = dataclasses.replace(config.trainer, epochs=arguments.epochs, threads=threads, early_stopping_patience=99,
                                  max_minutes=0, device="cpu")  # fmt: skip
    return dataclasses.replace(config, artifacts_dir=str(Path(arguments.workdir) / "artifacts"), trainer=trainer)


def train_child(arguments: argparse.Namespace) -> None:
    """Child (plain or under torchrun): train on the prepared splits."""
    config = configured(arguments, arguments.threads)
    transformation = DataTransformationArtifact.load(Path(arguments.workdir) / "artifacts" / "prepared" /
                                                     data_transformation.STAGE)  # fmt: skip
    with distributed.session(use_cuda=False):
        model_trainer.run(config, transformation, LocalStorage(Path(arguments.workdir) / "store"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "config.yaml"))
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "kermany224" / "train"))
    parser.add_argument("--workdir", default="/tmp/xray-distributed-benchmark")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        train_child(arguments)
        return 0

    workdir = Path(arguments.workdir)
    storage = LocalStorage(workdir / "store")
    storage.upload_folder(Path(arguments.data), "data")
    config = configured(arguments, 2)
    prepared = workdir / "artifacts" / "prepared"
    if not (prepared / data_transformation.STAGE / "artifact.json").is_file():
        ingestion = data_ingestion.run(config, start_run(config, storage, "prepared"), storage)
        data_transformation.run(config, ingestion, storage)

    layouts = {
        "1 process x 1 thread": [sys.executable, __file__, "--threads", "1"],
        "1 process x 2 threads": [sys.executable, __file__, "--threads", "2"],
        # torchrun, run as a module: its console script need not sit beside this Python (a system
        # Python's scripts may be in another folder, as on the GPU machine)
        "2 processes x 1 thread": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                   "--nproc_per_node", "2", __file__, "--threads", "1"],
    }  # fmt: skip
    seconds: dict[str, list[float]] = {name: [] for name in layouts}
    for run in range(arguments.runs):
        for name, command in layouts.items():
            shutil.rmtree(prepared / model_trainer.STAGE, ignore_errors=True)
            options = ["--child", "--config", arguments.config, "--workdir", str(workdir), "--epochs",
                       str(arguments.epochs)]  # fmt: skip
            subprocess.run(command + options, check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
            history = json.loads((prepared / model_trainer.STAGE / "history.json").read_text())
            for record in history:
                seconds[name].append(record["seconds"])
                print(f"run {run + 1}, {name}, epoch {record['epoch']}: {record['seconds']:.1f} s, "
                      f"{record['images_per_second']:.1f} training images/s", flush=True)  # fmt: skip
    print("\n| layout | median epoch s | epochs |")
    print("|---|---|---|")
    for name, values in seconds.items():
        print(f"| {name} | {statistics.median(values):.1f} | {', '.join(f'{value:.1f}' for value in values)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
