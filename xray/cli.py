"""Command line: `python -m xray train | predict | upload-data | calibrate`."""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from xray.config import ConfigError, load_config
from xray.data import IMAGE_SUFFIXES, DataError
from xray.decoding import DecodeError, DecodeLimits, decode_image
from xray.inference import DEFAULT_BATCH_SIZE, Predictor
from xray.model import WeightsUnavailableError
from xray.package import PackageError, fetch_production
from xray.pipeline import StageTimer, run_pipeline
from xray.settings import Settings
from xray.storage import StorageError, open_storage

logger = logging.getLogger("xray")

USER_ERRORS = (ConfigError, StorageError, DataError, PackageError, WeightsUnavailableError)


def train(arguments: argparse.Namespace) -> int:
    """Run the five stages and print the outcome of each."""
    config = load_config(arguments.config)
    storage = open_storage(arguments.storage or Settings.from_environment().storage_uri)
    timer = StageTimer()
    result = run_pipeline(config, storage, run_id=arguments.run_id, timer=timer)
    evaluation = result.evaluation
    trainer = evaluation.trainer
    ingestion = trainer.transformation.ingestion
    print(f"run id: {ingestion.run.run_id}  (artifacts in {ingestion.run.run_dir})")
    print(f"  data_ingestion       {timer.seconds.get('data_ingestion', 0):7.1f} s  "
          f"{sum(ingestion.class_counts.values())} images {ingestion.class_counts}, "
          f"{ingestion.rejected_count} rejected, {ingestion.duplicate_count} duplicates")
    print(f"  data_transformation  {timer.seconds.get('data_transformation', 0):7.1f} s  "
          f"patients per split {trainer.transformation.patient_counts}")
    print(f"  model_trainer        {timer.seconds.get('model_trainer', 0):7.1f} s  "
          f"{trainer.architecture}, {trainer.epochs_run} epochs on {trainer.device}, best epoch {trainer.best_epoch} "
          f"(validation ROC-AUC {trainer.best_validation_roc_auc:.4f})")
    print(f"  model_evaluation     {timer.seconds.get('model_evaluation', 0):7.1f} s  "
          f"{'accepted' if evaluation.accepted else 'rejected'}: {evaluation.reason}")
    print(f"  model_pusher         {timer.seconds.get('model_pusher', 0):7.1f} s  {result.reason}")
    metrics = evaluation.test_metrics
    print(f"test split ({metrics['count']} images, threshold {evaluation.threshold:.4f}): "
          + ", ".join(f"{name} {metrics[name]:.4f}" for name in
                      ("roc_auc", "pr_auc", "accuracy", "sensitivity", "specificity", "precision", "f1")))
    print(f"confusion matrix [[TN, FP], [FN, TP]]: {metrics['confusion_matrix']}")
    if result.pushed:
        bentoml_note = f" (BentoML {result.bentoml_tag})" if result.bentoml_tag else ""
        print(f"production model: {result.version}{bentoml_note}")
    return 0


def collect_images(paths: list[str]) -> list[Path]:
    """The files named, and the image files inside the folders named, in a stable order."""
    found: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise DataError(f"{path} does not exist")
    return found


def predict(arguments: argparse.Namespace) -> int:
    """Score images with the production model (or --model PACKAGE_DIR) into a CSV."""
    if arguments.model:
        package_dir = Path(arguments.model)
    else:
        settings = Settings.from_environment()
        storage = open_storage(arguments.storage or settings.storage_uri)
        package_dir = fetch_production(storage, settings.model_cache_dir)
        if package_dir is None:
            raise PackageError(f"no production model in {storage.uri}: train one with `python -m xray train`")
    predictor = Predictor.from_package(package_dir, batch_size=arguments.batch_size)
    files = collect_images(arguments.paths)
    limits = DecodeLimits()

    def prepare(path: Path):
        try:
            return predictor.prepare(decode_image(path.read_bytes(), limits)), None
        except DecodeError as error:
            return None, f"{error.code}: {error.detail}"

    failures = 0
    with ThreadPoolExecutor() as pool, open(arguments.out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "probability", "label"])
        for start in range(0, len(files), arguments.batch_size):
            chunk = files[start : start + arguments.batch_size]
            prepared = list(pool.map(prepare, chunk))
            good = [pixels for pixels, _ in prepared if pixels is not None]
            probabilities = iter(predictor.probabilities(np.stack(good)) if good else [])
            for path, (_, problem) in zip(chunk, prepared, strict=True):
                if problem:
                    failures += 1
                    logger.warning("skipped %s: %s", path, problem)
                    writer.writerow([str(path), "", "ERROR"])
                    continue
                prediction = predictor.to_prediction(next(probabilities))
                writer.writerow([str(path), f"{prediction.probability:.6f}", prediction.label])
    print(f"scored {len(files) - failures} of {len(files)} images with model {predictor.version} -> {arguments.out}")
    return 1 if failures else 0


def upload_data(arguments: argparse.Namespace) -> int:
    """Copy a labelled folder (`[split/]CLASS/image`) into the storage's data prefix."""
    folder = Path(arguments.folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder")
    classes = {path.name for path in folder.rglob("*") if path.is_dir()}
    if not classes & {"NORMAL", "PNEUMONIA"}:
        raise DataError(f"{folder} has no NORMAL/ or PNEUMONIA/ folder: expected {folder}/[split/]CLASS/image")
    storage = open_storage(arguments.storage or Settings.from_environment().storage_uri)
    report = storage.upload_folder(folder, arguments.prefix.strip("/"), workers=arguments.workers)
    print(f"uploaded {report.transferred} files to {storage.uri}/{arguments.prefix} ({report.skipped} unchanged)")
    return 0


def calibrate(arguments: argparse.Namespace) -> int:
    """Re-fit the production model's temperature, bias and threshold on a site's labelled sample."""
    from xray.site_calibration import calibrate_site

    config = load_config(arguments.config)
    settings = Settings.from_environment()
    storage = open_storage(arguments.storage or settings.storage_uri)
    result = calibrate_site(config, storage, Path(arguments.folder), arguments.target_sensitivity,
                            settings.model_cache_dir)  # fmt: skip
    metrics, parent = result.metrics, result.parent_metrics
    print(f"calibrated {result.parent_version} on {result.provenance['sample_size']} images "
          f"{result.provenance['sample_counts']} (sample {result.provenance['sample_manifest_sha256'][:12]})")
    print(f"  calibration: {result.calibration['reason']}")
    print(f"  threshold {result.threshold:.4f} ({result.threshold_rule})")
    print(f"  on the sample: sensitivity {metrics['sensitivity']:.3f}, specificity {metrics['specificity']:.3f} "
          f"(parent at its threshold {parent['threshold']:.4f}: {parent['sensitivity']:.3f}, "
          f"{parent['specificity']:.3f}); ROC-AUC {metrics['roc_auc']:.4f}")
    print(f"version {result.version} {'promoted to production' if result.promoted else 'NOT promoted'}: "
          f"{result.reason}  (package in {result.package_dir})")
    return 0 if result.promoted else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its subcommands."""
    parser = argparse.ArgumentParser(prog="python -m xray", description="Chest X-ray pneumonia classifier pipeline.")
    parser.add_argument("--storage", help="storage URI (default: $XRAY_STORAGE_URI, else ./store)")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    train_command = commands.add_parser("train", help="ingest, transform, train, evaluate and push a model")
    train_command.add_argument("--config", default="configs/config.yaml", help="experiment YAML")
    train_command.add_argument("--run-id", help="resume this run from its last checkpoint")
    train_command.set_defaults(handler=train)
    predict_command = commands.add_parser("predict", help="score images into a CSV")
    predict_command.add_argument("paths", nargs="+", help="image files or folders")
    predict_command.add_argument("--out", default="results.csv", help="CSV to write (path,probability,label)")
    predict_command.add_argument("--model", help="a model package folder instead of the production model")
    predict_command.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                                 help=f"images per forward pass (default {DEFAULT_BATCH_SIZE})")
    predict_command.set_defaults(handler=predict)
    upload_command = commands.add_parser("upload-data", help="copy a labelled image folder into storage")
    upload_command.add_argument("folder")
    upload_command.add_argument("--prefix", default="data", help="storage prefix (default: data)")
    upload_command.add_argument("--workers", type=int, default=8)
    upload_command.set_defaults(handler=upload_data)
    calibrate_command = commands.add_parser("calibrate", help="re-fit calibration and threshold on a site's sample")
    calibrate_command.add_argument("folder", help="a labelled sample from the site: FOLDER/NORMAL/, FOLDER/PNEUMONIA/")
    calibrate_command.add_argument("--target-sensitivity", type=float,
                                   help="as a lower confidence bound (default: the config's evaluation target)")
    calibrate_command.add_argument("--config", default="configs/config.yaml", help="experiment YAML (gate rules)")
    calibrate_command.set_defaults(handler=calibrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse, run, and turn a known failure into one clear line and exit code 2."""
    arguments = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if arguments.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return arguments.handler(arguments)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
