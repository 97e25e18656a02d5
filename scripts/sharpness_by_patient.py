#!/usr/bin/env python
"""Print the mean sharpness of a Kermany-style folder's images by class and by patient number.

    .venv/bin/python scripts/sharpness_by_patient.py --data ../shared/data/kermany224/train

Sharpness is the mean absolute Laplacian of each image at the model's size (128 px by default),
decoded by serving's own path (`preprocessing.decode_pixels`). Kermany's NORMAL images are
sharper than its PNEUMONIA ones, and its last NORMAL patients (NORMAL2-IM-1350 and above) are
as soft as the PNEUMONIA ones: the README's "Later and earlier patients" reads the default model's mistakes
on them against this table.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xray.preprocessing import decode_pixels  # noqa: E402

# (class, label, file-name pattern, first number, last number) of each group, in print order.
GROUPS = (
    ("NORMAL", "IM-", r"^IM-(\d+)", 0, 10**6),
    ("NORMAL", "NORMAL2-IM- below 1350", r"^NORMAL2-IM-(\d+)", 0, 1349),
    ("NORMAL", "NORMAL2-IM- 1350 and above", r"^NORMAL2-IM-(\d+)", 1350, 10**6),
    ("PNEUMONIA", "person below 1350", r"^person(\d+)_", 0, 1349),
    ("PNEUMONIA", "person 1350 to 1799", r"^person(\d+)_", 1350, 1799),
    ("PNEUMONIA", "person 1800 and above", r"^person(\d+)_", 1800, 10**6),
)


def measure_sharpness(path: Path, image_size: int) -> float:
    """Mean absolute 4-neighbour Laplacian of the image at model size, in grey levels."""
    pixels = decode_pixels(path.read_bytes(), image_size).astype(np.float32)
    laplacian = 4 * pixels[1:-1, 1:-1] - pixels[:-2, 1:-1] - pixels[2:, 1:-1] - pixels[1:-1, :-2] - pixels[1:-1, 2:]
    return float(np.abs(laplacian).mean())


def find_group(class_name: str, file_name: str) -> str | None:
    """The label of the group a file belongs to, or None."""
    for group_class, label, pattern, first, last in GROUPS:
        match = re.match(pattern, file_name, re.IGNORECASE)
        if group_class == class_name and match and first <= int(match.group(1)) <= last:
            return label
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/kermany224/train"))
    parser.add_argument("--image-size", type=int, default=128)
    arguments = parser.parse_args()
    values: dict[str, list[float]] = {}
    for path in sorted(Path(arguments.data).glob("*/*")):
        label = find_group(path.parent.name.upper(), path.name)
        if label:
            values.setdefault(label, []).append(measure_sharpness(path, arguments.image_size))
    print(f"{'class':<10} {'patients':<28} {'images':>7} {'sharpness':>10}")
    for class_name, label, *_ in GROUPS:
        if label in values:
            print(f"{class_name:<10} {label:<28} {len(values[label]):>7} {np.mean(values[label]):>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
