"""The command line a user types: train, predict, upload-data, and its errors."""

from __future__ import annotations

import csv
import shutil

import pytest

from tests.conftest import REPO, SHARED_DATA, encode, make_dataset, synthetic_xray
from xray.cli import main


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A project folder with the configs, run from its root as a user would."""
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XRAY_STORAGE_URI", str(tmp_path / "store"))
    return tmp_path


def test_upload_train_predict(workspace, capsys):
    make_dataset(workspace / "images")
    assert main(["upload-data", "images"]) == 0
    assert "uploaded 48 files" in capsys.readouterr().out
    assert main(["upload-data", "images"]) == 0
    assert "uploaded 0 files" in capsys.readouterr().out

    assert main(["train", "--config", "configs/smoke.yaml"]) == 0
    output = capsys.readouterr().out
    for stage in ("data_ingestion", "data_transformation", "model_trainer", "model_evaluation", "model_pusher"):
        assert stage in output
    assert "run id:" in output and "roc_auc" in output and "production model:" in output

    (workspace / "uploads").mkdir()
    (workspace / "uploads" / "a.png").write_bytes(encode(synthetic_xray("PNEUMONIA", 1), "PNG"))
    (workspace / "uploads" / "b.jpeg").write_bytes(encode(synthetic_xray("NORMAL", 2)))
    assert main(["predict", "uploads", "--out", "results.csv"]) == 0
    with open(workspace / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["path"].split("/")[-1] for row in rows] == ["a.png", "b.jpeg"]
    assert all(0 <= float(row["probability"]) <= 1 and row["label"] in {"NORMAL", "PNEUMONIA"} for row in rows)


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
    from fastapi.testclient import TestClient

    from xray.api import create_app
    from xray.settings import Settings

    uploads = workspace / "uploads"
    uploads.mkdir()
    for index in range(3):
        (uploads / f"{index}.png").write_bytes(encode(synthetic_xray("PNEUMONIA" if index else "NORMAL", index), "PNG"))
    assert main(["--storage", str(trained_store), "predict", str(uploads), "--out", "cli.csv"]) == 0
    with open(workspace / "cli.csv") as handle:
        from_cli = {row["path"].split("/")[-1]: float(row["probability"]) for row in csv.DictReader(handle)}
    with TestClient(create_app(Settings(storage_uri=str(trained_store)))) as client:
        for name, probability in from_cli.items():
            answer = client.post("/predict", files={"file": (name, (uploads / name).read_bytes(), "image/png")}).json()
            assert answer["probability"] == pytest.approx(probability, abs=1e-5)  # float32 sums differ with batch size
