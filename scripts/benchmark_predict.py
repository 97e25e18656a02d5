#!/usr/bin/env python
"""How fast `python -m xray predict` scores a folder, against a one-image-at-a-time loop and
the raw model forward pass on already-preprocessed tensors, measured in the same run.

    .venv/bin/python scripts/benchmark_predict.py --package store/models/<version> \
        --images ../shared/data/kermany224/train/NORMAL --count 400
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from xray.cli import main as cli_main  # noqa: E402
from xray.inference import Predictor  # noqa: E402
from xray.preprocessing import normalise  # noqa: E402


def median_seconds(action, repeats: int) -> float:
    """Median wall time of `action` over `repeats` runs."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", required=True, help="a model package folder")
    parser.add_argument("--images", required=True, help="a folder of X-rays")
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    arguments = parser.parse_args()

    files = sorted(p for p in Path(arguments.images).rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    files = files[: arguments.count]
    folder = Path(tempfile.mkdtemp(prefix="xray-predict-"))
    for path in files:
        shutil.copy2(path, folder / path.name)
    predictor = Predictor.from_package(arguments.package)
    out = folder / "results.csv"

    cli = median_seconds(lambda: cli_main(["predict", str(folder), "--model", arguments.package,
                                           "--out", str(out)]), arguments.repeats)  # fmt: skip

    def one_at_a_time() -> None:
        for path in files:
            predictor.predict_pixels([predictor.decode(path.read_bytes())])

    loop = median_seconds(one_at_a_time, arguments.repeats)
    pixels = np.stack([predictor.decode(path.read_bytes()) for path in files])

    def raw_forward(model: torch.nn.Module, batch_size: int, channels_last: bool) -> Callable[[], None]:
        batches = [normalise(pixels[start : start + batch_size], predictor.preprocessing)
                   for start in range(0, len(files), batch_size)]  # fmt: skip
        if channels_last:
            batches = [batch.contiguous(memory_format=torch.channels_last) for batch in batches]

        def forward() -> None:
            with torch.no_grad():
                for batch in batches:
                    model(batch)

        return forward

    as_saved = copy.deepcopy(predictor.model).to(memory_format=torch.contiguous_format)
    naive = median_seconds(raw_forward(as_saved, 64, False), arguments.repeats)
    core = median_seconds(raw_forward(predictor.model, predictor.batch_size, True), arguments.repeats)
    count = len(files)
    print(f"{count} images, model {predictor.version} ({predictor.card.architecture}, "
          f"{predictor.preprocessing.image_size}px), {torch.get_num_threads()} torch threads; medians of "
          f"{arguments.repeats} runs")
    rows = (
        ("python -m xray predict (decode + preprocess + forward + CSV)", cli),
        ("one image at a time (decode + predict_pixels([pixels]))", loop),
        ("raw forward of the model as saved, batch 64 (no decoding)", naive),
        (f"raw forward, channels-last, batch {predictor.batch_size} (no decoding)", core),
    )
    for name, seconds in rows:
        print(f"{name:<68}{count / seconds:8.1f} images/s")
    print(f"predict: {loop / cli:.2f}x one-at-a-time, {naive / cli:.2f}x the as-saved batch-64 forward "
          f"(which excludes decoding), {core / cli:.0%} of the inference core's own forward rate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
