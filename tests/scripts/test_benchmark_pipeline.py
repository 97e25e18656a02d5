"""scripts/benchmark_pipeline.py --hold-out: a range of patient numbers is scored, never trained on."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO, kermany_like, load_script

SCRIPT = REPO / "scripts" / "benchmark_pipeline.py"


def test_the_late_site_holds_exactly_the_patients_numbered_last_and_the_val_folder(tmp_path):
    script = load_script("benchmark_pipeline")
    kept, late = script.split_by_number(kermany_like(tmp_path / "data"), tmp_path / "work", "late")
    late_names = {path.name for path in late.glob("*/*")}
    assert late_names == {*(f"NORMAL2-IM-{number}-0001.jpeg" for number in range(1150, 1154)),
                          *(f"person{number}_bacteria_{number - 1340}.jpeg" for number in range(1350, 1356)),
                          "NORMAL2-IM-1427-0001.jpeg", "person1946_bacteria_4874.jpeg"}  # fmt: skip
    assert not late_names & {path.name for path in kept.glob("*/*")}
    assert len(list(kept.glob("*/*"))) == 32 + 2 - len(late_names)
    assert not script.is_held_out("IM-1500-0001.jpeg", "late"), "the older IM- series has no late patients"


def test_the_early_site_holds_the_patients_numbered_next_to_the_official_test_split(tmp_path):
    script = load_script("benchmark_pipeline")
    kept, early = script.split_by_number(kermany_like(tmp_path / "data"), tmp_path / "work", "early")
    early_names = {path.name for path in early.glob("*/*")}
    assert early_names == {f"IM-{number:04d}-0001.jpeg" for number in range(100, 108)}
    assert len(list(kept.glob("*/*"))) == 32 + 2 - 8, "the later patients and val/ all train"
    assert script.is_held_out("IM-0249-0001.jpeg", "early") and not script.is_held_out("IM-0250-0001.jpeg", "early")
    assert script.is_held_out("NORMAL2-IM-0559-0001.jpeg", "early")
    assert not script.is_held_out("NORMAL2-IM-0560-0001.jpeg", "early")
    assert script.is_held_out("person299_virus_615.jpeg", "early")
    assert not script.is_held_out("person300_bacteria_1421.jpeg", "early")


def test_a_held_out_late_site_is_scored_and_reported(tmp_path):
    data = kermany_like(tmp_path / "data", per_class=24)
    environment = {**os.environ, "XRAY_HOME": str(tmp_path), "BENTOML_HOME": str(tmp_path / "bentoml")}
    finished = subprocess.run([sys.executable, str(SCRIPT), "--config", str(REPO / "configs" / "smoke.yaml"),
                               "--data", str(data), "--workdir", str(tmp_path / "work"), "--hold-out", "late"],
                              cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-2000:]
    assert "external site late (" in finished.stdout
    counted = next(line for line in finished.stdout.splitlines() if line.startswith("external site late"))
    assert "(24 images)" in counted, counted  # NORMAL2-IM-1150 to 1157, person1350 to 1363, and val/'s two
    again = subprocess.run([sys.executable, str(SCRIPT), "--data", str(data), "--workdir", str(tmp_path / "work"),
                            "--hold-out", "early"], cwd=tmp_path, env=environment, capture_output=True, text=True,
                           timeout=600)  # fmt: skip
    assert again.returncode == 2 and "already holds an earlier run" in again.stderr, "the late run's images would train"

