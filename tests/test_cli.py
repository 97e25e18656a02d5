"""The command line a user types: train, predict, upload-data, and its errors."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SHARED_DATA, ServingClient, encode, hostile_uploads, make_dataset, synthetic_xray
from xray.cli import LOG_FORMAT, main
from xray.decoding import DecodeLimits, too_large_error
from xray.jobs import JobStore, TrainingLease
from xray.storage import LocalStorage

# Write-only: reading it is refused with PermissionError, to root as to anyone, so a test can count on it.
UNREADABLE = Path("/proc/sys/vm/drop_caches")
needs_unreadable = pytest.mark.skipif(not UNREADABLE.is_file(), reason=f"no {UNREADABLE} to stand for unreadable")


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A project folder with the configs, run from its root as a user would."""
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XRAY_STORAGE_URI", str(tmp_path / "store"))
    return tmp_path


def test_upload_train_predict(workspace, capsys, caplog):
    make_dataset(workspace / "images")
    assert main(["upload-data", "images"]) == 0
    assert "uploaded 48 images" in capsys.readouterr().out
    assert main(["upload-data", "images"]) == 0
    assert "uploaded 0 images" in capsys.readouterr().out

    log = io.StringIO()
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)
    caplog.set_level(logging.INFO)
    try:
        assert main(["train", "--config", "configs/smoke.yaml"]) == 0
    finally:
        logging.getLogger().removeHandler(handler)
    output = capsys.readouterr().out
    first_line = output.splitlines()[0]
    assert first_line.startswith("run id: ")
    run_id = first_line.split()[2]
    assert (workspace / "artifacts" / run_id / "model_pusher" / "artifact.json").is_file()
    for stage in ("data_ingestion", "data_transformation", "model_trainer", "model_evaluation", "model_pusher"):
        assert stage in output
    assert "roc_auc" in output and "production model:" in output
    lines = log.getvalue().splitlines()
    assert lines and all(f"[run {run_id}]" in line for line in lines if line[:4].isdigit())
    store = LocalStorage(workspace / "store")
    assert TrainingLease(store, 120).read() is None, "the training lease is freed when the run ends"
    job = JobStore(store).get(run_id)  # what GET /train/<run id> answers, on any instance
    assert job.status == "succeeded" and job.outcome["pushed"] and [record["epoch"] for record in job.history] == [1, 2]

    assert main(["runs", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [run["run_id"] for run in listed["runs"]] == [run_id]
    (run,) = listed["runs"]
    assert run["last_stage"] == "model_pusher" and run["finished"]
    assert run["promotion"] == "in production" and run["version"] == listed["production_version"]
    assert 0 <= run["test_metrics"]["roc_auc"] <= 1
    assert main(["runs"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("run id") and table[1].startswith(run_id) and "in production" in table[1]

    (workspace / "uploads").mkdir()
    (workspace / "uploads" / "a.png").write_bytes(encode(synthetic_xray("PNEUMONIA", 1), "PNG"))
    (workspace / "uploads" / "b.jpeg").write_bytes(encode(synthetic_xray("NORMAL", 2)))
    assert main(["predict", "uploads", "--out", "results.csv"]) == 0
    with open(workspace / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["path"].split("/")[-1] for row in rows] == ["a.png", "b.jpeg"]
    assert all(0 <= float(row["probability"]) <= 1 and row["label"] in {"NORMAL", "PNEUMONIA"} for row in rows)


def test_train_refuses_while_another_training_holds_the_lease(workspace, capsys):
    """One training at a time across instances: a `GET /train` job elsewhere holds the lease in the same storage."""
    make_dataset(workspace / "images", per_class=4)
    assert main(["upload-data", "images"]) == 0
    store = LocalStorage(workspace / "store")
    held = TrainingLease(store, 120).acquire("20261130-070000-abc123")
    assert main(["train", "--config", "configs/smoke.yaml"]) == 2
    error = capsys.readouterr().err
    assert "training job 20261130-070000-abc123 holds the training lease" in error and "Traceback" not in error
    assert not (workspace / "artifacts").exists(), "no run is started"
    assert TrainingLease(store, 120).read() == held, "the other job keeps its lease"


def test_resuming_a_run_that_does_not_exist_lists_the_recent_runs(workspace, capsys):
    for run_id in ("20260101-000000-aaaaaa", "20260102-000000-bbbbbb"):
        (workspace / "artifacts" / run_id).mkdir(parents=True)
        (workspace / "artifacts" / run_id / "config.json").write_text("{}")
    assert main(["train", "--config", "configs/smoke.yaml", "--run-id", "20260102-000000-bbbbbx"]) == 2
    captured = capsys.readouterr()
    assert "recent runs: 20260102-000000-bbbbbb, 20260101-000000-aaaaaa" in captured.err
    assert captured.out == "" and not (workspace / "artifacts" / "20260102-000000-bbbbbx").exists()


def test_runs_lists_an_interrupted_run_and_its_last_stage(workspace, capsys):
    run_dir = workspace / "artifacts" / "20260103-101500-cccccc"
    (run_dir / "data_ingestion").mkdir(parents=True)
    (run_dir / "config.json").write_text("{}")
    (run_dir / "data_ingestion" / "artifact.json").write_text("{}")
    (run_dir / "model_trainer").mkdir()  # a checkpoint folder, no artifact: stopped while training
    (workspace / "artifacts" / "cache").mkdir()
    assert main(["runs", "--json"]) == 0
    (run,) = json.loads(capsys.readouterr().out)["runs"]
    assert (run["run_id"], run["started"]) == ("20260103-101500-cccccc", "2026-01-03T10:15:00+00:00")
    assert run["last_stage"] == "model_trainer (unfinished)" and not run["finished"]
    assert run["promotion"] == "not evaluated" and run["test_metrics"] == {}


def test_upload_data_uploads_images_only_and_lists_what_it_skipped(workspace, capsys):
    make_dataset(workspace / "images", per_class=1)
    (workspace / "images" / "readme.txt").write_text("Kermany et al., 2018")
    (workspace / "images" / "NORMAL" / "scan.jpeg").write_bytes(b"not really a JPEG")
    (workspace / "images" / "PNEUMONIA" / "no-suffix").write_bytes(encode(synthetic_xray("PNEUMONIA", 9), "PNG"))
    assert main(["upload-data", "images"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].startswith("uploaded 3 images to ")
    assert lines[1] == "skipped 2 files that are not a JPEG, PNG or DICOM image: NORMAL/scan.jpeg, readme.txt"
    assert len(lines) == 2 and captured.err == ""
    stored = sorted(path.relative_to(workspace / "store" / "data").as_posix()
                    for path in (workspace / "store" / "data").rglob("*") if path.is_file())  # fmt: skip
    assert "readme.txt" not in stored and "NORMAL/scan.jpeg" not in stored and len(stored) == 3


def test_one_upload_is_one_image_not_one_images(workspace, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    (workspace / "one" / "NORMAL").mkdir(parents=True)
    (workspace / "one" / "NORMAL" / "a.png").write_bytes(encode(synthetic_xray("NORMAL", 1), "PNG"))
    (workspace / "one" / "NORMAL" / "notes.txt").write_text("x")
    assert main(["upload-data", "one"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"uploaded 1 image to {workspace / 'store'}/data (0 unchanged)",
        "skipped 1 file that is not a JPEG, PNG or DICOM image: NORMAL/notes.txt",
    ]
    told_again = [record for record in caplog.records if record.levelno >= logging.INFO and "pload" in record.message]
    assert told_again == []  # the summary is printed once, not logged as well


def test_a_malformed_setting_is_one_line_naming_the_variable(workspace, capsys, monkeypatch):
    make_dataset(workspace / "images", per_class=1)
    monkeypatch.setenv("XRAY_MAX_UPLOAD_BYTES", "20MB")
    assert main(["upload-data", "images"]) == 2
    error = capsys.readouterr().err
    assert error == "error: environment variable XRAY_MAX_UPLOAD_BYTES='20MB' must be a whole number\n"


def test_configs_and_the_store_are_found_from_another_folder(workspace, capsys, monkeypatch):
    make_dataset(workspace / "images", per_class=1)
    monkeypatch.delenv("XRAY_STORAGE_URI")
    monkeypatch.setenv("XRAY_HOME", str(workspace))
    (workspace / "sub").mkdir()
    monkeypatch.chdir(workspace / "sub")
    shutil.rmtree(workspace / "configs")  # only the project's own configs/ is left to find
    assert main(["upload-data", "../images"]) == 0
    assert (workspace / "store" / "data" / "NORMAL").is_dir() and not (workspace / "sub" / "store").exists()
    assert main(["runs", "--config", "configs/smoke.yaml"]) == 0
    assert "no runs yet" in capsys.readouterr().out


def test_commands_that_need_no_model_never_import_torch(workspace):
    make_dataset(workspace / "images", per_class=1)
    script = ("import sys; from xray.cli import main; "
              "codes = [main(['upload-data', 'images']), main(['runs'])]; "
              "heavy = sorted(name for name in ('torch', 'torchvision', 'matplotlib') if name in sys.modules); "
              "print(codes, heavy)")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.splitlines()[-1] == "[0, 0] []"
    help_text = subprocess.run([sys.executable, "-m", "xray", "--help"], capture_output=True, text=True, timeout=60,
                               check=True).stdout  # fmt: skip
    assert "upload-data" in help_text and "runs" in help_text and "--storage" in help_text


def test_a_file_that_cannot_be_scored_is_logged_once(workspace, trained_store, capsys, caplog):
    (workspace / "uploads").mkdir()
    (workspace / "uploads" / "good.png").write_bytes(encode(synthetic_xray("NORMAL", 1), "PNG"))
    (workspace / "uploads" / "empty.png").write_bytes(b"")
    caplog.set_level(logging.INFO)
    assert main(["--storage", str(trained_store), "predict", "uploads", "--out", "out.csv"]) == 1
    about_the_file = [record for record in caplog.records if "empty" in record.getMessage()]
    assert [(record.levelname, record.getMessage()) for record in about_the_file] == [
        ("WARNING", f"could not score {Path('uploads') / 'empty.png'}: empty_file: The file is empty")
    ]
    assert "scored 1 of 2 images" in capsys.readouterr().out


def test_predict_without_a_model_says_how_to_train(workspace, capsys):
    (workspace / "x.png").write_bytes(encode(synthetic_xray("NORMAL", 1), "PNG"))
    assert main(["predict", "x.png"]) == 2
    assert "no production model" in capsys.readouterr().err


def test_train_on_an_empty_store_is_a_clear_error(workspace, capsys):
    assert main(["train", "--config", "configs/smoke.yaml"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: no files under") and "Traceback" not in error


def test_bad_config_is_a_clear_error(workspace, capsys):
    (workspace / "configs" / "bad.yaml").write_text("trainer:\n  epohcs: 2\n")
    assert main(["train", "--config", "configs/bad.yaml"]) == 2
    assert "unknown key 'trainer.epohcs'" in capsys.readouterr().err


def test_upload_of_a_folder_without_classes_is_refused(workspace, capsys):
    (workspace / "empty").mkdir()
    assert main(["upload-data", "empty"]) == 2
    assert "no NORMAL/ or PNEUMONIA/ folder" in capsys.readouterr().err


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="the shared Kermany data is not beside the repository")
def test_predict_scores_real_full_resolution_xrays(workspace, capsys):
    make_dataset(workspace / "images")
    main(["upload-data", "images"])
    main(["train", "--config", "configs/smoke.yaml"])
    assert main(["predict", str(SHARED_DATA / "val"), "--out", "real.csv"]) == 0
    with open(workspace / "real.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 16


def test_cli_and_http_give_the_same_probability(workspace, trained_store, capsys):

    from xray.api import create_app
    from xray.settings import Settings

    uploads = workspace / "uploads"
    uploads.mkdir()
    for index in range(3):
        (uploads / f"{index}.png").write_bytes(encode(synthetic_xray("PNEUMONIA" if index else "NORMAL", index), "PNG"))
    assert main(["--storage", str(trained_store), "predict", str(uploads), "--out", "cli.csv"]) == 0
    with open(workspace / "cli.csv") as handle:
        from_cli = {row["path"].split("/")[-1]: float(row["probability"]) for row in csv.DictReader(handle)}
    with ServingClient(create_app(Settings(storage_uri=str(trained_store)))) as client:
        for name, probability in from_cli.items():
            answer = client.post("/predict", files={"file": (name, (uploads / name).read_bytes(), "image/png")}).json()
            assert answer["probability"] == pytest.approx(probability, abs=1e-5)  # float32 sums differ with batch size


def test_predict_writes_error_for_hostile_files_and_scores_the_rest(workspace, capsys):
    from xray.model import build_model
    from xray.package import ModelCard, write_package
    from xray.preprocessing import Preprocessing

    card = ModelCard(version="tiny", architecture="small_cnn", classes=["NORMAL", "PNEUMONIA"],
                     preprocessing=Preprocessing(32, 0.5, 0.25).to_dict(), threshold=0.5)  # fmt: skip
    package = write_package(workspace / "package", build_model("small_cnn"), card)
    folder = workspace / "uploads"
    folder.mkdir()
    (folder / "a-good.png").write_bytes(encode(synthetic_xray("NORMAL", 1), "PNG"))
    uploads = [upload for upload in hostile_uploads() if upload.filename.endswith(".dcm")]
    for upload in uploads:
        (folder / upload.filename).write_bytes(upload.data)
    assert main(["predict", str(folder), "--model", str(package), "--out", "results.csv"]) == 1
    with open(workspace / "results.csv") as handle:
        labels = {row["path"].split("/")[-1]: row["label"] for row in csv.DictReader(handle)}
    assert labels.pop("a-good.png") in {"NORMAL", "PNEUMONIA"}
    assert labels == {upload.filename: "ERROR" for upload in uploads}


def test_predict_reads_models_under_the_configs_models_prefix(workspace, trained_store, capsys):
    store = shutil.copytree(trained_store, workspace / "store")
    (store / "models").rename(store / "zoo")
    zoo_config = (REPO / "configs" / "smoke.yaml").read_text() + "pusher:\n  models_prefix: zoo\n"
    (workspace / "zoo.yaml").write_text(zoo_config)
    (workspace / "x.png").write_bytes(encode(synthetic_xray("NORMAL", 1), "PNG"))
    assert main(["predict", "x.png"]) == 2
    assert main(["predict", "x.png", "--config", "zoo.yaml", "--out", "zoo.csv"]) == 0
    assert "with model smoke-model" in capsys.readouterr().out


@needs_unreadable
def test_predict_scores_the_other_files_when_one_cannot_be_read(workspace, trained_package, capsys, caplog):
    (workspace / "uploads").mkdir()
    (workspace / "uploads" / "a-good.png").write_bytes(encode(synthetic_xray("NORMAL", 1), "PNG"))
    (workspace / "uploads" / "x.jpg").symlink_to(UNREADABLE)
    caplog.set_level(logging.WARNING)
    assert main(["predict", "uploads", "--model", str(trained_package), "--out", "out.csv"]) == 1
    with open(workspace / "out.csv") as handle:
        labels = {row["path"].split("/")[-1]: row["label"] for row in csv.DictReader(handle)}
    assert labels.pop("x.jpg") == "ERROR" and labels["a-good.png"] in {"NORMAL", "PNEUMONIA"}
    assert f"could not score {Path('uploads') / 'x.jpg'}: unreadable: Permission denied" in caplog.messages
    assert "scored 1 of 2 images" in capsys.readouterr().out


def test_predict_refuses_a_file_over_the_size_limit_without_reading_it(workspace, trained_package, capsys, caplog):
    """A file past the decode limit is refused by its size, so a huge one costs no memory (3 GB took 3.7 GB)."""
    import tracemalloc

    def peak_bytes(arguments: list[str]) -> int:
        tracemalloc.start()
        try:
            assert main(arguments) in (0, 1)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    limit = DecodeLimits().max_bytes
    (workspace / "uploads").mkdir()
    (workspace / "uploads" / "a-good.png").write_bytes(encode(synthetic_xray("NORMAL", 1), "PNG"))
    command = ["predict", "uploads", "--model", str(trained_package), "--out", "out.csv"]
    assert main(command) == 0  # imports and caches are filled here, outside the measurement
    scoring_one_image = peak_bytes(command)
    with open(workspace / "uploads" / "huge.jpg", "wb") as handle:
        handle.truncate(limit + 1)  # sparse: no disk used
    caplog.set_level(logging.WARNING)
    extra = peak_bytes(command) - scoring_one_image
    assert extra < limit // 2, f"predict held {extra:,} more bytes at once for a file it refuses"
    with open(workspace / "out.csv") as handle:
        labels = {row["path"].split("/")[-1]: row["label"] for row in csv.DictReader(handle)}
    assert labels.pop("huge.jpg") == "ERROR" and labels["a-good.png"] in {"NORMAL", "PNEUMONIA"}
    refusal = too_large_error(limit + 1, limit)
    assert f"could not score {Path('uploads') / 'huge.jpg'}: too_large: {refusal.problem}" in caplog.messages


def test_upload_data_skips_a_fifo_instead_of_waiting_on_it(workspace):
    make_dataset(workspace / "images", per_class=1)
    os.mkfifo(workspace / "images" / "NORMAL" / "p.jpg")
    try:  # in a process of its own, so a command that waits on the FIFO fails this test instead of hanging the suite
        result = subprocess.run([sys.executable, "-m", "xray", "upload-data", "images"], capture_output=True,
                                text=True, timeout=60)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("upload-data waited on a FIFO instead of skipping it")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("uploaded 2 images to ")
    assert lines[1:] == ["skipped 1 file that is not a regular file (a FIFO, socket or device): NORMAL/p.jpg"]
    stored = sorted(path.name for path in (workspace / "store" / "data").rglob("*") if path.is_file())
    assert len(stored) == 2 and "p.jpg" not in stored


@needs_unreadable
def test_upload_data_skips_an_unreadable_file_and_names_it(workspace, capsys):
    make_dataset(workspace / "images", per_class=1)
    (workspace / "images" / "NORMAL" / "locked.jpg").symlink_to(UNREADABLE)
    assert main(["upload-data", "images"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("uploaded 2 images to ")
    assert lines[1:] == ["skipped 1 file that could not be read: NORMAL/locked.jpg (Permission denied)"]
    assert not (workspace / "store" / "data" / "NORMAL" / "locked.jpg").exists()


@pytest.mark.parametrize("unbuffered", ["1", ""])
def test_output_piped_into_a_reader_that_stops_early_ends_quietly(workspace, unbuffered):
    """`python -m xray runs | head -3`: the reader closes the pipe; no BrokenPipeError traceback, exit status 0."""
    environment = {**os.environ, "PYTHONUNBUFFERED": unbuffered}
    process = subprocess.Popen([sys.executable, "-m", "xray", "runs", "--json"], cwd=workspace, env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    process.stdout.close()  # before the command prints anything
    _, error = process.communicate(timeout=120)
    assert process.returncode == 0 and b"BrokenPipeError" not in error, error.decode()


def test_a_training_stopped_by_sigterm_frees_the_lease_and_records_why(workspace):
    """`docker stop` sends SIGTERM: the lease is freed at once, not left to block GET /train until it expires."""
    import signal

    make_dataset(workspace / "images", per_class=8)
    assert main(["upload-data", "images"]) == 0
    process = subprocess.Popen([sys.executable, "-m", "xray", "train", "--config", "configs/smoke.yaml"],
                               cwd=workspace, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    first_line = process.stdout.readline()
    assert first_line.startswith("run id: "), first_line
    run_id = first_line.split()[2]
    store = LocalStorage(workspace / "store")
    assert TrainingLease(store, 120).read().job_id == run_id
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=120)
    assert TrainingLease(store, 120).read() is None
    job = JobStore(store).get(run_id)
    assert job.status == "failed" and "SIGTERM" in job.error
