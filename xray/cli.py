"""Command line: `python -m xray train | predict | upload-data | runs | calibrate`.

Only light modules are imported here. Each command imports what it needs (torch comes with
`train` and `predict`), so `--help`, `upload-data` and `runs` answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import signal
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from xray.config import load_config
from xray.logs import quiet_libraries
from xray.settings import DEFAULT_CONFIG_PATH, Settings

if TYPE_CHECKING:
    from xray.decoding import DecodeLimits

logger = logging.getLogger("xray")

# Failures that are the user's to fix, by module, answered with one line and exit status 2. A module's
# errors count once it is imported: an error of a module nothing imported cannot have been raised.
USER_ERRORS = {
    "xray.config": ("ConfigError",),
    "xray.storage": ("StorageError",),
    "xray.data": ("DataError",),
    "xray.package": ("PackageError",),
    "xray.model": ("WeightsUnavailableError",),
    "xray.runs": ("RunNotFoundError",),
    "xray.jobs": ("TrainingBusyError", "LeaseLostError"),
}
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LISTED_SKIPS = 20


class UsageError(Exception):
    """A command line that names something unusable (a missing folder, for instance)."""


class NotRegularFileError(OSError):
    """A FIFO, socket or device where a file was expected: reading one could block forever or never end."""

    REASON = "not a regular file (a FIFO, socket or device)"

    def __init__(self) -> None:
        super().__init__(self.REASON)


@contextlib.contextmanager
def open_regular_file(path: Path) -> Iterator[tuple[BinaryIO, int]]:
    """Open `path` (following links) for reading with its size, if it is a regular file; else NotRegularFileError.

    Opened without blocking, so a FIFO swapped in after the check is refused instead of waiting for a writer.
    """
    if not stat.S_ISREG(path.stat().st_mode):
        raise NotRegularFileError()
    with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as handle:
        status = os.fstat(handle.fileno())
        if not stat.S_ISREG(status.st_mode):
            raise NotRegularFileError()
        yield handle, status.st_size


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception classes of USER_ERRORS among the modules imported so far, and UsageError."""
    found: list[type[BaseException]] = [UsageError]
    for module_name, class_names in USER_ERRORS.items():
        module = sys.modules.get(module_name)
        found += [getattr(module, name) for name in class_names if module is not None]
    return tuple(found)


def plural(count: int, noun: str) -> str:
    """`1 file`, `2 files`."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def settings() -> Settings:
    """The deployment settings (XRAY_* variables), read when a command needs them."""
    return Settings.from_environment()


def open_store(arguments: argparse.Namespace):
    """The storage `--storage` names (from the current folder), else XRAY_STORAGE_URI (from XRAY_HOME)."""
    from xray.storage import open_storage

    return open_storage(arguments.storage or settings().storage_uri)


def log_run_id(run_id: str) -> None:
    """Put the run id in every log line from now on, so a run's lines can be found in any log."""
    for handler in logging.getLogger().handlers:
        if handler.formatter is not None and handler.formatter._fmt == LOG_FORMAT:  # ours, not a host's handler
            handler.setFormatter(logging.Formatter(LOG_FORMAT.replace("%(name)s", f"[run {run_id}] %(name)s")))


@contextlib.contextmanager
def stopped_by_sigterm() -> Iterator[None]:
    """SIGTERM (`docker stop`, a preempted machine, torchrun ending the ranks) unwinds the block like Ctrl-C does.

    So the training lease is freed and the job recorded as failed at once, not left to expire.
    """
    def stop(signal_number: int, frame: object) -> None:
        raise SystemExit(f"stopped by signal {signal_number} (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def train(arguments: argparse.Namespace) -> int:
    """Run the five stages: the run id first, then the outcome of each stage."""
    from xray.runs import require_run

    config = load_config(arguments.config)
    if arguments.run_id:
        require_run(config.artifacts_dir, arguments.run_id)
    storage = open_store(arguments)

    def announce(event: dict) -> None:
        # The pipeline names the run (under torchrun, rank 0's id for every rank): say it before anything else.
        if event.get("stage") == "started":
            run_id = event["run_id"]
            print(f"run id: {run_id}  (artifacts in {Path(config.artifacts_dir) / run_id}; "
                  f"resume with --run-id {run_id})", flush=True)  # fmt: skip
            log_run_id(run_id)

    from xray import distributed
    from xray.jobs import exclusive_training, record_outcome
    from xray.pipeline import StageTimer, run_pipeline
    from xray.runs import new_run_id

    timer = StageTimer()
    run_id = arguments.run_id or new_run_id()  # under torchrun, rank 0's id names the run on every rank
    if not distributed.is_main():
        result = run_pipeline(config, storage, run_id=run_id, timer=timer, progress=announce)
        return 0
    with stopped_by_sigterm(), exclusive_training(storage, settings(), run_id) as (job, record):  # as GET /train
        result = run_pipeline(config, storage, run_id=run_id, timer=timer,
                              progress=lambda event: (record(event), announce(event)))  # fmt: skip
        record_outcome(job, result)
    evaluation = result.evaluation
    trainer = evaluation.trainer
    ingestion = trainer.transformation.ingestion
    images = sum(ingestion.class_counts.values())
    print(f"  data_ingestion       {timer.seconds.get('data_ingestion', 0):7.1f} s  "
          f"{plural(images, 'image')} {ingestion.class_counts}, {ingestion.rejected_count} rejected, "
          f"{plural(ingestion.duplicate_count, 'duplicate')}")  # fmt: skip
    print(f"  data_transformation  {timer.seconds.get('data_transformation', 0):7.1f} s  "
          f"patients per split {trainer.transformation.patient_counts}")
    print(f"  model_trainer        {timer.seconds.get('model_trainer', 0):7.1f} s  "
          f"{trainer.architecture}, {plural(trainer.epochs_run, 'epoch')} on {trainer.device}, "
          f"best epoch {trainer.best_epoch} (validation ROC-AUC {trainer.best_validation_roc_auc:.4f})")
    print(f"  model_evaluation     {timer.seconds.get('model_evaluation', 0):7.1f} s  "
          f"{'accepted' if evaluation.accepted else 'rejected'}: {evaluation.reason}")
    print(f"  model_pusher         {timer.seconds.get('model_pusher', 0):7.1f} s  {result.reason}")
    metrics = evaluation.test_metrics
    print(f"test split ({plural(metrics['count'], 'image')}, threshold {evaluation.threshold:.4f}): "
          + ", ".join(f"{name} {metrics[name]:.4f}" for name in
                      ("roc_auc", "pr_auc", "accuracy", "sensitivity", "specificity", "precision", "f1")))
    print(f"confusion matrix [[TN, FP], [FN, TP]]: {metrics['confusion_matrix']}")
    if result.pushed:
        bentoml_note = f" (BentoML {result.bentoml_tag})" if result.bentoml_tag else ""
        print(f"production model: {result.version}{bentoml_note}")
    return 0


def collect_images(paths: list[str]) -> list[Path]:
    """The files named, and the image files inside the folders named, in a stable order."""
    from xray.data import IMAGE_SUFFIXES

    found: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise UsageError(f"{path} does not exist")
    return found


def read_input(path: Path, limits: DecodeLimits) -> bytes:
    """The content of a file to score; one over `limits.max_bytes` is refused by its size, before it is read.

    At most limit + 1 bytes are read, so a file that grows after its size was taken costs no more memory.
    """
    from xray.decoding import too_large_error

    with open_regular_file(path) as (handle, size):
        if size > limits.max_bytes:
            raise too_large_error(size, limits.max_bytes)
        data = handle.read(limits.max_bytes + 1)
    if len(data) > limits.max_bytes:
        raise too_large_error(None, limits.max_bytes)
    return data


def predict(arguments: argparse.Namespace) -> int:
    """Score images with the production model (or --model PACKAGE_DIR) into a CSV."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from xray.decoding import DecodeError, DecodeLimits
    from xray.inference import DEFAULT_BATCH_SIZE, Predictor, usable_cores
    from xray.package import PackageError, fetch_production

    files = collect_images(arguments.paths)
    if arguments.model:
        package_dir = Path(arguments.model)
    else:
        storage = open_store(arguments)
        models_prefix = load_config(arguments.config or settings().config_path).pusher.models_prefix
        package_dir = fetch_production(storage, settings().model_cache_dir, models_prefix)
        if package_dir is None:
            raise PackageError(f"no production model in {storage.uri}: train one with `python -m xray train`")
    batch_size = arguments.batch_size or DEFAULT_BATCH_SIZE
    # Decoding and scoring take turns here, so the forward pass may use every core.
    predictor = Predictor.from_package(package_dir, batch_size=batch_size, threads=usable_cores())
    limits = DecodeLimits()

    def prepare(path: Path):
        try:
            return predictor.decode(read_input(path, limits), limits), None
        except DecodeError as error:
            return None, f"{error.code}: {error.problem}"
        except OSError as error:  # unreadable (permissions, a directory swapped in): this file's row, not the run's
            return None, f"unreadable: {error.strerror or error}"

    failures = 0
    with ThreadPoolExecutor() as pool, open(arguments.out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "probability", "label"])
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            prepared = list(pool.map(prepare, chunk))
            good = [pixels for pixels, _ in prepared if pixels is not None]
            probabilities = iter(predictor.probabilities(np.stack(good)) if good else [])
            for path, (_, problem) in zip(chunk, prepared, strict=True):
                if problem:
                    failures += 1
                    logger.warning("could not score %s: %s", path, problem)
                    writer.writerow([str(path), "", "ERROR"])
                    continue
                prediction = predictor.to_prediction(next(probabilities))
                writer.writerow([str(path), f"{prediction.probability:.6f}", prediction.label])
    print(f"scored {len(files) - failures} of {plural(len(files), 'image')} with model {predictor.version} "
          f"-> {arguments.out}")  # fmt: skip
    return 1 if failures else 0


@dataclass
class SortedUploads:
    """The files of an upload folder: images to upload, and the rest by why they are skipped."""

    images: list[Path] = field(default_factory=list)
    others: list[Path] = field(default_factory=list)  # regular files that are not JPEG, PNG or DICOM
    irregular: list[Path] = field(default_factory=list)  # FIFOs, sockets, devices
    unreadable: dict[Path, str] = field(default_factory=dict)  # path: the reason, as the system gives it


def sort_uploads(folder: Path) -> SortedUploads:
    """Sort the files of `folder` into images (sniffed by content, as ingestion does) and the skipped.

    Hidden files and folders are left out, as storage never uploads them. Only regular files are opened.
    """
    from xray.decoding import sniff_format

    found = SortedUploads()
    for directory, folder_names, file_names in os.walk(folder):
        folder_names[:] = sorted(name for name in folder_names if not name.startswith("."))
        for name in sorted(file_names):
            if name.startswith("."):
                continue
            path = Path(directory, name)
            try:
                with open_regular_file(path) as (handle, _):
                    head = handle.read(256)
            except NotRegularFileError:
                found.irregular.append(path)
                continue
            except OSError as error:
                found.unreadable[path] = error.strerror or str(error)
                continue
            (found.images if sniff_format(head) is not None else found.others).append(path)
    return found


def skipped_line(names: list[str], reason: str) -> str:
    """`skipped 2 files that <reason>: a, b`, naming the first LISTED_SKIPS; `{be}` in reason is `is` or `are`."""
    more = f", and {len(names) - LISTED_SKIPS} more" if len(names) > LISTED_SKIPS else ""
    reason = reason.format(be="is" if len(names) == 1 else "are")
    return f"skipped {plural(len(names), 'file')} that {reason}: {', '.join(names[:LISTED_SKIPS])}{more}"


def print_skips(folder: Path, found: SortedUploads) -> None:
    """One line per reason a file of `folder` was not uploaded, naming the files (relative to `folder`)."""

    def relative(path: Path) -> str:
        return path.relative_to(folder).as_posix()

    if found.others:
        print(skipped_line(sorted(map(relative, found.others)), "{be} not a JPEG, PNG or DICOM image"))
    if found.irregular:
        print(skipped_line(sorted(map(relative, found.irregular)), f"{{be}} {NotRegularFileError.REASON}"))
    if found.unreadable:
        named = sorted(f"{relative(path)} ({reason})" for path, reason in found.unreadable.items())
        print(skipped_line(named, "could not be read"))


def upload_data(arguments: argparse.Namespace) -> int:
    """Copy the images of a labelled folder (`[split/]CLASS/image`) into the storage's data prefix."""
    folder = Path(arguments.folder)
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder")
    classes = {path.name for path in folder.rglob("*") if path.is_dir()}
    if not classes & {"NORMAL", "PNEUMONIA"}:
        raise UsageError(f"{folder} has no NORMAL/ or PNEUMONIA/ folder: expected {folder}/[split/]CLASS/image")
    found = sort_uploads(folder)
    storage = open_store(arguments)
    prefix = arguments.prefix.strip("/")
    chosen = set(found.images)  # storage opens these only: never a FIFO or an unreadable file
    report = storage.upload_folder(folder, prefix, workers=arguments.workers, include=chosen.__contains__)
    print(f"uploaded {plural(report.transferred, 'image')} to {storage.uri}/{prefix} ({report.skipped} unchanged)")
    print_skips(folder, found)
    return 0


def runs(arguments: argparse.Namespace) -> int:
    """List recent runs: id, start, last stage, test metrics and promotion, from artifacts and production."""
    from xray.package import production_version
    from xray.runs import format_runs, list_runs

    config = load_config(arguments.config)
    production = production_version(open_store(arguments), config.pusher.models_prefix)
    found = list_runs(config.artifacts_dir, production, limit=arguments.limit or None)
    if arguments.json:
        print(json.dumps({"artifacts_dir": config.artifacts_dir, "production_version": production,
                          "runs": [run.to_dict() for run in found]}, indent=2))  # fmt: skip
    else:
        print(format_runs(found))
    return 0


def calibrate(arguments: argparse.Namespace) -> int:
    """Re-fit the production model's temperature, bias and threshold on a site's labelled sample."""
    from xray.site_calibration import calibrate_site

    config = load_config(arguments.config)
    storage = open_store(arguments)
    result = calibrate_site(config, storage, Path(arguments.folder), arguments.target_sensitivity,
                            settings().model_cache_dir, dry_run=arguments.dry_run)  # fmt: skip
    metrics, parent = result.metrics, result.parent_metrics
    print(f"calibrated {result.parent_version} on {result.provenance['sample_size']} images "
          f"{result.provenance['sample_counts']} (sample {result.provenance['sample_manifest_sha256'][:12]})")
    print(f"  calibration: {result.calibration['reason']}")
    print(f"  threshold {result.threshold:.4f} ({result.threshold_rule})")
    if result.caution:
        print(f"  caution: {result.caution}")
    print(f"  on the sample: sensitivity {metrics['sensitivity']:.3f}, specificity {metrics['specificity']:.3f} "
          f"(parent at its threshold {parent['threshold']:.4f}: {parent['sensitivity']:.3f}, "
          f"{parent['specificity']:.3f}); ROC-AUC {metrics['roc_auc']:.4f}")
    if result.dry_run:
        print(f"dry run: {'would be promoted to production' if result.promoted else 'would NOT be promoted'}: "
              f"{result.reason}  (nothing written; run again without --dry-run to do it)")  # fmt: skip
        return 0 if result.promoted else 1
    print(f"version {result.version} {'promoted to production' if result.promoted else 'NOT promoted'}: "
          f"{result.reason}  (package in {result.package_dir})")
    return 0 if result.promoted else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="python -m xray", description="Chest X-ray pneumonia classifier pipeline.",
        epilog="Relative paths in XRAY_* variables and configs start from XRAY_HOME (default: the current folder).",
    )  # fmt: skip
    parser.add_argument("--storage", help="storage URI: a folder, file:// or s3://bucket/prefix "
                                          "(default: $XRAY_STORAGE_URI, else store/ under XRAY_HOME)")  # fmt: skip
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = (f"experiment YAML (default {DEFAULT_CONFIG_PATH}; a relative path is looked up under XRAY_HOME, "
                   "then in the project's folder)")  # fmt: skip
    train_command = commands.add_parser("train", help="ingest, transform, train, evaluate and push a model")
    train_command.add_argument("--config", default=DEFAULT_CONFIG_PATH, help=config_help)
    train_command.add_argument("--run-id", help="resume this existing run from its last checkpoint")
    train_command.set_defaults(handler=train)
    predict_command = commands.add_parser("predict", help="score images into a CSV")
    predict_command.add_argument("paths", nargs="+", help="image files or folders")
    predict_command.add_argument("--out", default="results.csv", help="CSV to write (path,probability,label)")
    predict_command.add_argument("--model", help="a model package folder instead of the production model")
    predict_command.add_argument("--config", help="experiment YAML naming the models prefix (default: $XRAY_CONFIG)")
    predict_command.add_argument("--batch-size", type=int, help="images per forward pass (default: the inference "
                                                                "core's, 16)")  # fmt: skip
    predict_command.set_defaults(handler=predict)
    upload_command = commands.add_parser("upload-data", help="copy the images of a labelled folder into storage")
    upload_command.add_argument("folder", help="a folder of [split/]NORMAL|PNEUMONIA/image files")
    upload_command.add_argument("--prefix", default="data", help="storage prefix (default: data)")
    upload_command.add_argument("--workers", type=int, help="parallel uploads (default: storage's, 32, measured in "
                                                            "README 'Transfer speed')")  # fmt: skip
    upload_command.set_defaults(handler=upload_data)
    runs_command = commands.add_parser("runs", help="list recent training runs and which one is in production")
    runs_command.add_argument("--config", default=DEFAULT_CONFIG_PATH, help=config_help)
    runs_command.add_argument("--limit", type=int, default=10, help="most runs to list (0: all; default 10)")
    runs_command.add_argument("--json", action="store_true", help="machine-readable output")
    runs_command.set_defaults(handler=runs)
    calibrate_command = commands.add_parser("calibrate", help="re-fit calibration and threshold on a site's sample")
    calibrate_command.add_argument("folder", help="a labelled sample from the site: FOLDER/NORMAL/, FOLDER/PNEUMONIA/")
    calibrate_command.add_argument("--target-sensitivity", type=float,
                                   help="as a lower confidence bound (default: the config's evaluation target)")
    calibrate_command.add_argument("--config", default=DEFAULT_CONFIG_PATH, help="experiment YAML (gate rules)")
    calibrate_command.add_argument("--dry-run", action="store_true",
                                   help="fit, gate and report, but write and promote nothing")
    calibrate_command.set_defaults(handler=calibrate)
    return parser


def stdout_is_gone() -> bool:
    """After a BrokenPipeError: whether it was standard output's reader that closed (then it goes to /dev/null).

    A pipe whose reader is gone polls as an error on its write end; another broken pipe (a network peer) is raised.
    """
    import select

    try:
        descriptor = sys.stdout.fileno()
        poller = select.poll()
        poller.register(descriptor, select.POLLOUT)
        gone = any(mask & select.POLLERR for _, mask in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no file descriptor (captured output), or no poll here
        return False
    if gone:
        os.dup2(os.open(os.devnull, os.O_WRONLY), descriptor)  # no second error as Python exits
    return gone


def main(argv: list[str] | None = None) -> int:
    """Parse, run, and turn a known failure into one clear line and exit code 2."""
    arguments = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if arguments.verbose else logging.INFO, format=LOG_FORMAT)
    quiet_libraries()
    try:
        status = arguments.handler(arguments)
        sys.stdout.flush()  # here, not at exit: a reader that stopped early (`| head`) is answered below
        return status
    except BrokenPipeError:
        if not stdout_is_gone():
            raise
        return 0  # what the reader asked for was printed
    except Exception as error:
        if not isinstance(error, user_errors()):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
