#!/usr/bin/env python
"""Build a local store of N small, real-looking labelled X-rays for scale tests.

    .venv/bin/python scripts/generate_store.py --count 100000 --out /tmp/xray-store-100k

Each image is a resized copy of one of the shared Kermany X-rays (cycling through them) with
seeded perturbations: a small rotation and shift, brightness, contrast, gamma, sensor noise and
JPEG quality, so no two files are identical byte for byte (the ingestion stage drops exact
duplicates). Copies keep their source's patient in the file name, so patient-level splits stay
free of leaks. Files land in OUT/<prefix>/<CLASS>/, a folder `LocalStorage(OUT)` reads as is.
The same --count and --seed always give the same files; an existing file is left alone.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared/data/kermany224/train"
CLASSES = ("NORMAL", "PNEUMONIA")


def perturbed_copy(source: Path, number: int, seed: int, size: int) -> bytes:
    """JPEG bytes of `source` resized to about `size` px and perturbed by a generator seeded with (seed, number)."""
    generator = np.random.default_rng([seed, number])
    with Image.open(source) as opened:
        image = opened.convert("L")
    side = int(size * generator.uniform(0.85, 1.15))
    image = image.resize((side, side), Image.Resampling.BILINEAR)
    shift = generator.uniform(-0.04, 0.04, 2) * side
    image = image.rotate(generator.uniform(-6, 6), resample=Image.Resampling.BILINEAR, translate=tuple(shift))
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    pixels = pixels ** generator.uniform(0.85, 1.15)
    pixels = (pixels - 0.5) * generator.uniform(0.85, 1.15) + 0.5 + generator.uniform(-0.06, 0.06)
    pixels += generator.normal(0, generator.uniform(0.005, 0.02), pixels.shape)
    image = Image.fromarray(np.clip(pixels * 255, 0, 255).astype(np.uint8), mode="L")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(generator.integers(80, 96)))
    return buffer.getvalue()


def write_range(sources: list[tuple[Path, str]], start: int, stop: int, out: Path, seed: int, size: int) -> int:
    """Write images start..stop-1 (image n copies source n mod len(sources)); return how many were new."""
    written = 0
    for number in range(start, stop):
        source, class_name = sources[number % len(sources)]
        path = out / class_name / f"{source.stem}_copy{number:07d}.jpeg"
        if path.exists():
            continue
        path.write_bytes(perturbed_copy(source, number, seed, size))
        written += 1
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, required=True, help="number of images")
    parser.add_argument("--out", required=True, help="store folder to create")
    parser.add_argument("--prefix", default="data", help="storage prefix inside the store (default: data)")
    parser.add_argument("--source", default=str(DEFAULT_SOURCE), help="labelled folder of <CLASS>/<image> X-rays")
    parser.add_argument("--size", type=int, default=96, help="approximate side of the generated images in px")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    arguments = parser.parse_args()

    source = Path(arguments.source)
    sources = sorted((path, name) for name in CLASSES for path in (source / name).glob("*") if path.is_file())
    if not sources:
        parser.error(f"no images under {source}/NORMAL or {source}/PNEUMONIA")
    out = Path(arguments.out) / arguments.prefix
    for name in CLASSES:
        (out / name).mkdir(parents=True, exist_ok=True)
    step = max(1, arguments.count // (arguments.processes * 8))
    with ProcessPoolExecutor(max_workers=arguments.processes) as pool:
        ranges = [(start, min(start + step, arguments.count)) for start in range(0, arguments.count, step)]
        futures = [pool.submit(write_range, sources, *bounds, out, arguments.seed, arguments.size) for bounds in ranges]
        written = sum(future.result() for future in futures)
    print(f"{arguments.count} images in {out} ({written} new, from {len(sources)} sources)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
