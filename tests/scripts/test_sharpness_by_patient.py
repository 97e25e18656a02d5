"""scripts/sharpness_by_patient.py: the sharpness table the README's "Later patients" reads."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO, encode, synthetic_xray
from tests.scripts.test_benchmark_pipeline import kermany_like


def test_sharpness_is_printed_per_group_and_a_blurred_group_reads_softer(tmp_path):
    from PIL import ImageFilter

    data = kermany_like(tmp_path / "data")
    for path in (data / "NORMAL").glob("NORMAL2-IM-*"):
        if int(path.name.split("-")[2]) >= 1150:  # soften some late NORMAL images, as the real late ones are
            blurred = synthetic_xray("NORMAL", seed=1).filter(ImageFilter.GaussianBlur(2))
            path.write_bytes(encode(blurred))
    finished = subprocess.run([sys.executable, str(REPO / "scripts" / "sharpness_by_patient.py"), "--data", str(data),
                               "--image-size", "32"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    rows = {line[11:39].strip(): line.split() for line in finished.stdout.splitlines()[1:]}
    assert set(rows) == {"IM-", "NORMAL2-IM- below 1350", "person below 1350", "person 1350 to 1799"}
    assert rows["IM-"][-2] == "8" and rows["person 1350 to 1799"][-2] == "6"
    assert float(rows["NORMAL2-IM- below 1350"][-1]) < float(rows["IM-"][-1])
