#!/usr/bin/env python
"""Training speed on a GPU, then the whole pipeline on it, and the model it writes scored on CPU.

    python scripts/benchmark_gpu.py --data ../shared/data/kermany224/train --val ../shared/data/kermany224/val

1. Prepares the data once (ingestion and transformation of --data with --config).
2. Times the raw model step (forward, backward, optimiser, on batches already on the GPU) as the
   ceiling for the config's batch size (and 8 times it, and with fused AdamW), and the augmenting
   DataLoader alone at several process counts; then trains --epochs epochs of the config on CUDA
   in each loader layout (no loader process, then the automatic count), sampling GPU utilisation.
3. Runs `python -m xray train` on CUDA over a fresh store of the same data: ingestion to push.
4. Scores --val with the package that run wrote, in a process that sees no GPU
   (`python -m xray predict`, the serving core), copies the package and the scores to --out, and
   compares serving's CPU probabilities with eager torch on the GPU for the same images.

Prints each figure as it comes and a table at the end; writes results.json to --out. Needs a CUDA
GPU; `--device cpu` runs the same steps on a CPU, to check the script itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from xray.components import data_ingestion, data_transformation, model_trainer  # noqa: E402
from xray.config import PipelineConfig, load_config  # noqa: E402
from xray.data import XrayDataset, build_augmentation, load_split  # noqa: E402
from xray.inference import Predictor, usable_cores  # noqa: E402
from xray.model import build_model  # noqa: E402
from xray.package import load_package  # noqa: E402
from xray.pipeline import start_run  # noqa: E402
from xray.preprocessing import Preprocessing, intensity_windows  # noqa: E402
from xray.runtime import TorchForward  # noqa: E402
from xray.storage import LocalStorage  # noqa: E402


class UtilisationSampler:
    """GPU utilisation (percent of time a kernel ran) sampled through NVML every 0.1 s while active."""

    def __init__(self, index: int = 0) -> None:
        self.samples: list[int] = []
        self.handle = None
        self.stopped = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.read = lambda: pynvml.nvmlDeviceGetUtilizationRates(self.handle).gpu
        except Exception as error:  # no NVML (a CPU check, or nvidia-ml-py absent): no samples
            print(f"no GPU utilisation: {error}", flush=True)

    def __enter__(self) -> UtilisationSampler:
        if self.handle is not None:
            self.thread = threading.Thread(target=self.sample, daemon=True)
            self.thread.start()
        return self

    def sample(self) -> None:
        while not self.stopped.wait(0.1):
            self.samples.append(int(self.read()))

    def __exit__(self, *exception) -> None:
        self.stopped.set()

    def mean(self) -> float | None:
        return statistics.mean(self.samples) if self.samples else None


def configured(config: PipelineConfig, workdir: Path, device: str, epochs: int, workers: int) -> PipelineConfig:
    """The config under test, with this benchmark's folder, device, epoch count and loader processes."""
    trainer = dataclasses.replace(config.trainer, epochs=epochs, device=device, early_stopping_patience=99,
                                  max_minutes=0, loader_workers=workers)  # fmt: skip
    return dataclasses.replace(config, artifacts_dir=str(workdir / "artifacts"), trainer=trainer)


def time_layout(config: PipelineConfig, transformation, storage: LocalStorage, device: str) -> dict:
    """Train the prepared splits once; the history's per-epoch figures and the mean GPU utilisation."""
    shutil.rmtree(Path(transformation.ingestion.run.run_dir) / model_trainer.STAGE, ignore_errors=True)
    with UtilisationSampler() as sampler:
        artifact = model_trainer.run(config, transformation, storage)
    history = json.loads(Path(artifact.history_path).read_text())
    workers = model_trainer.loader_workers(config.trainer.loader_workers, torch.device(device))
    return {"loader_workers": workers, "device": artifact.device, "gpu_utilisation_percent": sampler.mean(),
            "epochs": [{key: record[key] for key in ("epoch", "seconds", "images_per_second", "validation_roc_auc")}
                       for record in history]}  # fmt: skip


def time_raw_step(config: PipelineConfig, device: str, steps: int, batch_size: int, fused: bool = False) -> float:
    """Images/s of the bare training step at `batch_size` and the config's image size, data already on the device
    (`fused`: AdamW's single-kernel update instead of the trainer's default)."""
    target = torch.device(device)
    trainer, size = config.trainer, config.transformation.image_size
    channels = len(intensity_windows(config.transformation.intensity))
    model = build_model(trainer.architecture, False, channels).to(target).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=trainer.learning_rate, fused=fused or None)
    criterion = torch.nn.BCEWithLogitsLoss()
    images = torch.randn(batch_size, channels, size, size, device=target).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 2, (batch_size,), device=target).float()
    precision = model_trainer.mixed_precision(target)

    def step() -> None:
        with torch.autocast(target.type, dtype=precision, enabled=precision is not None):
            loss = criterion(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(10):
        step()
    if target.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if target.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - started)


def time_loader(config: PipelineConfig, transformation, workers: int) -> float:
    """Images/s of the trainer's augmenting DataLoader alone over the training split (no model), after its start."""
    images, labels, _ = load_split(transformation, "train")
    dataset = XrayDataset(images, labels, Preprocessing.from_dict(transformation.preprocessing),
                          build_augmentation(config.transformation.augmentation))  # fmt: skip
    loader = DataLoader(dataset, batch_size=config.trainer.batch_size, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())  # fmt: skip
    for _ in loader:  # starts the processes and warms their caches
        pass
    started, count = time.perf_counter(), 0
    for batch, _ in loader:
        count += len(batch)
    return count / (time.perf_counter() - started)


def compare_devices(package: Path, val: Path, device: str) -> dict:
    """The package's probabilities for --val from serving's CPU forward pass against eager torch on `device`."""
    cpu = Predictor.from_package(package)
    files = sorted(path for path in val.rglob("*") if path.is_file())
    pixels = np.stack([cpu.decode(path.read_bytes()) for path in files])
    on_cpu = cpu.forward_probabilities(pixels)
    model = load_package(package)[0]
    gpu = Predictor(model, cpu.card, forward=TorchForward(model, torch.device(device)))
    on_device = gpu.forward_probabilities(pixels)
    return {"images": len(files), "cpu_runtime": cpu.forward.name, "max_abs_difference":
            float(np.max(np.abs(on_cpu - on_device))), "same_labels":
            bool(np.all((on_cpu >= cpu.card.threshold) == (on_device >= cpu.card.threshold)))}  # fmt: skip


def run_pipeline(arguments: argparse.Namespace, workdir: Path) -> dict:
    """`python -m xray train` on a fresh store of the same data; its wall time, trainer and evaluation figures."""
    store = workdir / "pipeline-store"
    LocalStorage(store).upload_folder(Path(arguments.data), "data")
    raw = yaml.safe_load(Path(arguments.config).read_text()) or {}
    raw["artifacts_dir"] = str(workdir / "pipeline-artifacts")
    raw.setdefault("trainer", {})["device"] = arguments.device
    try:
        import bentoml  # noqa: F401
    except ImportError:  # a GPU image without BentoML: the package still goes to storage, as the CPU image serves it
        raw.setdefault("pusher", {})["save_to_bentoml"] = False
    config_path = workdir / "pipeline.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "xray", "--storage", str(store), "train", "--config", str(config_path)]
    started = time.monotonic()
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.monotonic() - started
    (Path(arguments.out) / "pipeline.log").write_text(finished.stdout + finished.stderr)
    print(finished.stdout[-3000:], finished.stderr[-3000:], sep="\n", flush=True)
    result: dict = {"seconds": round(seconds, 1), "exit_status": finished.returncode}
    if finished.returncode != 0:
        return result
    runs = sorted(path.parent.parent for path in (workdir / "pipeline-artifacts").glob("*/model_trainer/artifact.json"))
    trainer = json.loads((runs[-1] / model_trainer.STAGE / "artifact.json").read_text())
    result["trainer"] = {key: trainer[key] for key in ("device", "seconds", "epochs_run", "best_validation_roc_auc")}
    result["history"] = json.loads(Path(trainer["history_path"]).read_text())
    production = json.loads((store / "models" / "production.json").read_text())
    result["production"] = production
    result["package"] = str(store / "models" / production["version"])
    reports = list(runs[-1].glob("model_evaluation/**/report.json"))
    if reports:
        report = json.loads(reports[0].read_text())
        test = report["test"]
        result["test"] = {key: test[key] for key in ("count", "threshold", "sensitivity", "specificity", "roc_auc")}
        result["worst_case"] = (report.get("robustness") or {}).get("worst_case")
        result["accepted"], result["reason"] = report["accepted"], report["reason"]
    return result


def score_on_cpu(arguments: argparse.Namespace, package: Path) -> dict:
    """Score --val with the package in a process that sees no GPU: the serving core, as a CPU server runs it."""
    out = Path(arguments.out)
    scores = out / "scores_cpu.csv"
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "xray", "predict", "--model", str(package), "--out", str(scores), arguments.val]
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=environment)
    print(finished.stdout[-2000:], finished.stderr[-2000:], sep="\n", flush=True)
    for name in ("model.onnx", "model.safetensors", "model_card.json"):
        if (package / name).is_file():
            (out / "package").mkdir(exist_ok=True)
            shutil.copy2(package / name, out / "package" / name)
    return {"exit_status": finished.returncode, "scores": str(scores)}


def run_pipeline_and_score(arguments: argparse.Namespace, workdir: Path, results: dict, save) -> dict:
    """Steps 3 and 4: the whole pipeline, then its package scored on CPU; each result saved as it comes."""
    results["pipeline"] = pipeline = run_pipeline(arguments, workdir)
    save()
    if "package" in pipeline:
        results["cpu_scores"] = score_on_cpu(arguments, Path(pipeline["package"]))
        save()
    return pipeline


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "config.yaml"))
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "kermany224" / "train"))
    parser.add_argument("--val", default=str(REPO.parent / "shared" / "data" / "kermany224" / "val"))
    parser.add_argument("--workdir", default="/tmp/xray-gpu-benchmark")
    parser.add_argument("--out", default="gpu-benchmark")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per loader layout (the first warms up)")
    parser.add_argument("--device", default="cuda", help="cuda; cpu checks the script on a machine without a GPU")
    parser.add_argument("--raw-steps", type=int, default=100)
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--pipeline-only", action="store_true", help="only steps 3 and 4")
    arguments = parser.parse_args()
    if arguments.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU here; --device cpu checks the script itself")

    workdir, out = Path(arguments.workdir), Path(arguments.out)
    shutil.rmtree(workdir, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"torch": torch.__version__, "python": platform.python_version(), "cores": os.cpu_count(),
                     "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}  # fmt: skip
    print(json.dumps(results), flush=True)

    def save() -> None:
        (out / "results.json").write_text(json.dumps(results, indent=2))

    config = load_config(arguments.config)
    if arguments.pipeline_only:
        pipeline = run_pipeline_and_score(arguments, workdir, results, save)
        print(f"python -m xray train: exit {pipeline['exit_status']}, {pipeline['seconds']} s")
        return pipeline["exit_status"]
    storage = LocalStorage(workdir / "store")
    started = time.monotonic()
    storage.upload_folder(Path(arguments.data), "data")
    prepare = configured(config, workdir, arguments.device, arguments.epochs, -1)
    ingestion = data_ingestion.run(prepare, start_run(prepare, storage, "prepared"), storage)
    transformation = data_transformation.run(prepare, ingestion, storage)
    results["prepare_seconds"] = round(time.monotonic() - started, 1)
    print(f"prepared {sum(ingestion.class_counts.values())} images in {results['prepare_seconds']} s", flush=True)

    batch = config.trainer.batch_size
    results["raw_step_images_per_second"] = round(time_raw_step(config, arguments.device, arguments.raw_steps,
                                                                batch), 1)  # fmt: skip
    print(f"raw training step: {results['raw_step_images_per_second']} images/s", flush=True)
    variants = {f"batch {batch}, fused AdamW": (batch, True), f"batch {8 * batch}": (8 * batch, False),
                f"batch {8 * batch}, fused AdamW": (8 * batch, True)}  # fmt: skip
    results["raw_step_variants"] = {}
    for name, (size, fused) in variants.items():
        figure = time_raw_step(config, arguments.device, max(10, arguments.raw_steps // 4), size, fused)
        results["raw_step_variants"][name] = round(figure, 1)
        print(f"raw training step, {name}: {figure:.0f} images/s", flush=True)
    results["loader_images_per_second"] = {}
    for workers in sorted({0, model_trainer.GPU_LOADER_WORKERS, max(1, usable_cores() - 1)}):
        figure = time_loader(config, transformation, workers)
        results["loader_images_per_second"][workers] = round(figure, 1)
        print(f"loader alone, {workers} processes: {figure:.0f} images/s", flush=True)
    save()
    results["layouts"] = []
    for workers in (0, -1):
        layout = time_layout(configured(config, workdir, arguments.device, arguments.epochs, workers), transformation,
                             storage, arguments.device)  # fmt: skip
        results["layouts"].append(layout)
        print(json.dumps(layout), flush=True)
        save()

    if not arguments.skip_pipeline:
        pipeline = run_pipeline_and_score(arguments, workdir, results, save)
        if "package" in pipeline:
            results["cpu_against_device"] = compare_devices(Path(pipeline["package"]), Path(arguments.val),
                                                            arguments.device)  # fmt: skip
            print(json.dumps(results["cpu_against_device"]), flush=True)
            save()

    raw = results["raw_step_images_per_second"]
    print("\n| loader processes | epoch | seconds | training images/s | of the raw step | mean GPU utilisation |")
    print("|---|---|---|---|---|---|")
    for layout in results["layouts"]:
        utilisation = layout["gpu_utilisation_percent"]
        for record in layout["epochs"]:
            print(f"| {layout['loader_workers']} | {record['epoch']} | {record['seconds']:.1f} | "
                  f"{record['images_per_second']:.0f} | {record['images_per_second'] / raw:.2f}x | "
                  f"{'n/a' if utilisation is None else f'{utilisation:.0f}%'} |")  # fmt: skip
    print(f"raw step ceiling: {raw:.0f} images/s (batch {config.trainer.batch_size}, "
          f"{config.transformation.image_size} px)")  # fmt: skip
    for name, figure in results["raw_step_variants"].items():
        print(f"raw step, {name}: {figure:.0f} images/s ({figure / raw:.2f}x)")
    for workers, figure in results["loader_images_per_second"].items():
        print(f"loader alone, {workers} processes: {figure:.0f} images/s ({figure / raw:.2f}x the raw step)")
    if "pipeline" in results:
        print(f"python -m xray train: exit {results['pipeline']['exit_status']}, {results['pipeline']['seconds']} s")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
