"""`python -m xray calibrate FOLDER`: re-fit calibration and threshold on a site's sample, gate and promote."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO, encode, synthetic_xray
from xray.cli import main
from xray.package import read_card
from xray.storage import LocalStorage


def site_sample(folder: Path, normal: int, pneumonia: int, start: int = 700) -> Path:
    """A site's labelled sample: FOLDER/NORMAL/ and FOLDER/PNEUMONIA/."""
    for class_name, count in (("NORMAL", normal), ("PNEUMONIA", pneumonia)):
        (folder / class_name).mkdir(parents=True, exist_ok=True)
        for index in range(start, start + count):
            image = synthetic_xray(class_name, seed=index * 2 + (class_name == "PNEUMONIA"))
            (folder / class_name / f"site-{index}.png").write_bytes(encode(image, "PNG"))
    return folder


@pytest.fixture
def workspace(tmp_path, monkeypatch, trained_store):
    """A project folder with the configs and a copy of the store holding the promoted smoke model."""
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    shutil.copytree(trained_store, tmp_path / "store")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XRAY_STORAGE_URI", str(tmp_path / "store"))
    return tmp_path


def production(workspace: Path) -> str:
    return LocalStorage(workspace / "store").read_json("models/production.json")["version"]


def test_calibrate_writes_a_version_with_provenance_and_promotes_it(workspace, capsys):
    site_sample(workspace / "site", normal=30, pneumonia=60)
    assert main(["calibrate", "site", "--config", "configs/smoke.yaml"]) == 0
    output = capsys.readouterr().out
    assert "promoted to production" in output and "95% lower confidence bound of site sample sensitivity" in output
    version = production(workspace)
    assert version != "smoke-model" and "calibrated" in version
    card = read_card(workspace / "store" / "models" / version)
    provenance = card.provenance
    assert provenance["parent_version"] == "smoke-model" and provenance["sample_size"] == 90
    assert provenance["sample_counts"] == {"NORMAL": 30, "PNEUMONIA": 60}
    assert len(provenance["sample_manifest_sha256"]) == 64
    assert card.metrics["sensitivity"] == 1.0, "60 positives assure 0.95 only when none is missed"
    assert provenance["misses_allowed"] == 0
    assert ("caution: the sample's 60 PNEUMONIA images allow no miss" in output
            and "a sample with 87 PNEUMONIA images allows one miss" in output), output  # fmt: skip
    assert card.metrics["calibration"]["kept"] in ("fitted", "identity")
    assert card.metrics["calibration"]["reason"]
    parent = read_card(workspace / "store" / "models" / "smoke-model")
    assert (card.architecture, card.preprocessing) == (parent.architecture, parent.preprocessing)
    assert (workspace / "store" / "models" / version / "model.safetensors").read_bytes() == \
        (workspace / "store" / "models" / "smoke-model" / "model.safetensors").read_bytes(), "weights unchanged"


def test_the_same_sample_under_other_names_is_not_calibrated_on_twice(workspace, capsys):
    """The manifest hash reads content and labels, not file names: production is not re-calibrated on its sample."""
    site_sample(workspace / "one", normal=12, pneumonia=55)
    shutil.copytree(workspace / "one", workspace / "two")
    for path in (workspace / "two").rglob("*.png"):
        path.rename(path.with_name("renamed-" + path.name))
    assert main(["calibrate", "one", "--config", "configs/smoke.yaml"]) == 0
    first = production(workspace)
    digest = read_card(workspace / "store" / "models" / first).provenance["sample_manifest_sha256"]
    capsys.readouterr()
    assert main(["calibrate", "two", "--config", "configs/smoke.yaml"]) == 2
    error = capsys.readouterr().err
    assert f"production {first} was calibrated on this very sample (sha256 {digest[:12]})" in error
    assert production(workspace) == first
    site_sample(workspace / "two", normal=0, pneumonia=1, start=900)  # one more image: another sample
    assert main(["calibrate", "two", "--config", "configs/smoke.yaml"]) == 0
    assert read_card(workspace / "store" / "models" / production(workspace)).provenance["parent_version"] == first


def test_files_that_are_not_images_do_not_count_towards_the_sample(workspace, capsys, monkeypatch):
    """Counted from the files' bytes, so a short sample is refused before the model is even fetched."""
    import xray.package

    site_sample(workspace / "site", normal=30, pneumonia=51)
    (workspace / "site" / "PNEUMONIA" / "notes.png").write_text("not an image")
    monkeypatch.setattr(xray.package, "fetch_production", lambda *arguments: pytest.fail("the model was fetched"))
    assert main(["calibrate", "site", "--config", "configs/smoke.yaml"]) == 2
    assert "the sample has 51 PNEUMONIA images" in capsys.readouterr().err


def test_a_dry_run_fits_and_gates_but_writes_and_promotes_nothing(workspace, capsys):
    site_sample(workspace / "site", normal=30, pneumonia=60)
    assert main(["calibrate", "site", "--config", "configs/smoke.yaml", "--dry-run"]) == 0
    output = capsys.readouterr().out
    assert "dry run: would be promoted to production" in output and "on the sample: sensitivity" in output
    assert production(workspace) == "smoke-model"
    assert not (workspace / "artifacts" / "calibrations").exists()
    assert sorted(path.name for path in (workspace / "store" / "models").iterdir() if path.is_dir()) == ["smoke-model"]


@pytest.mark.parametrize(
    ("normal", "pneumonia", "target", "message"),
    [(30, 40, None, "the sample has 40 PNEUMONIA images: promising sensitivity >= 0.95 with 95% confidence "
                    "needs at least 52"),
     (30, 40, "0.99", "needs at least 268"),
     (5, 60, None, "the sample has 5 NORMAL images")],
)
def test_a_sample_too_small_to_promise_the_target_is_refused(workspace, capsys, normal, pneumonia, target, message):
    site_sample(workspace / "site", normal=normal, pneumonia=pneumonia)
    extra = ["--target-sensitivity", target] if target else []
    assert main(["calibrate", "site", "--config", "configs/smoke.yaml", *extra]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error and "Traceback" not in error
    assert production(workspace) == "smoke-model", "nothing promoted"


def test_a_lower_target_needs_fewer_images(workspace, capsys):
    site_sample(workspace / "site", normal=20, pneumonia=30)
    assert main(["calibrate", "site", "--config", "configs/smoke.yaml", "--target-sensitivity", "0.9"]) == 0
    card = read_card(workspace / "store" / "models" / production(workspace))
    assert card.provenance["target_sensitivity"] == 0.9


def test_a_sample_that_allows_misses_gets_no_caution(workspace, capsys):
    site_sample(workspace / "site", normal=12, pneumonia=45)
    assert main(["calibrate", "site", "--config", "configs/smoke.yaml", "--target-sensitivity", "0.9"]) == 0
    output = capsys.readouterr().out
    assert read_card(workspace / "store" / "models" / production(workspace)).provenance["misses_allowed"] == 1
    assert "caution" not in output


def test_the_gate_can_refuse_a_calibration(workspace, capsys):
    """The normal gate applies: a calibration that does not clear the minimum score is written but not promoted."""
    config = (workspace / "configs" / "smoke.yaml").read_text().replace("  minimum_score: 0.0", "  minimum_score: 1.01")
    (workspace / "configs" / "strict.yaml").write_text(config)
    site_sample(workspace / "site", normal=30, pneumonia=60)
    assert main(["calibrate", "site", "--config", "configs/strict.yaml"]) == 1
    output = capsys.readouterr().out
    assert "NOT promoted" in output and "below the minimum" in output
    assert production(workspace) == "smoke-model"
    written = list((workspace / "artifacts" / "calibrations").iterdir())
    assert len(written) == 1 and json.loads((written[0] / "model_card.json").read_text())["provenance"]
