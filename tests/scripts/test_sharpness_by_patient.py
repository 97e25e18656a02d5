"""scripts/sharpness_by_patient.py: the sharpness table the README's "Later and earlier patients" reads."""

from __future__ import annotations

import subprocess
import sys

from PIL import ImageFilter

from tests.conftest import REPO, encode, kermany_like, synthetic_xray


def test_sharpness_is_printed_per_group_and_the_softened_last_patients_read_softer(tmp_path):
    data = kermany_like(tmp_path / "data")
    for number in range(1400, 1404):  # the last NORMAL patients, softened as the real ones are
        blurred = synthetic_xray("NORMAL", seed=number).filter(ImageFilter.GaussianBlur(2))
        (data / "NORMAL" / f"NORMAL2-IM-{number}-0001.jpeg").write_bytes(encode(blurred))
    finished = subprocess.run([sys.executable, str(REPO / "scripts" / "sharpness_by_patient.py"), "--data", str(data),
                               "--image-size", "32"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    rows = {line[11:39].strip(): line.split() for line in finished.stdout.splitlines()[1:]}
    assert set(rows) == {"IM-", "NORMAL2-IM- below 1350", "NORMAL2-IM- 1350 and above", "person below 1350",
                         "person 1350 to 1799"}  # fmt: skip
    counts = [rows[group][-2] for group in ("IM-", "NORMAL2-IM- 1350 and above", "person 1350 to 1799")]
    assert counts == ["8", "4", "6"]
    assert float(rows["NORMAL2-IM- 1350 and above"][-1]) < 0.8 * float(rows["NORMAL2-IM- below 1350"][-1])
