#!/usr/bin/env python
"""Run the whole pipeline on a labelled folder (default: the shared Kermany training set,
`train/` only, so the 16 full-resolution `val/` images stay out of every split) and print
each stage's wall time and the test-split metrics.

    .venv/bin/python scripts/benchmark_pipeline.py --config configs/config.yaml \
        --data ../shared/data/kermany224/train

A fresh local store and artifacts folder are used (under a temporary folder unless
--workdir is given), so the times include downloading and decoding every image.

--hold-out late|early keeps a range of patient numbers out of training and scores it as an
external site of that name, through the product's own external-site path. Kermany's official
splits follow the patient numbers: its 16-image val/ split holds the last numbers of both series.
- late: NORMAL2-IM-1150 and above, and person1350 and above: the patients numbered last.
- early: IM- below 250, NORMAL2-IM- below 560, and person below 300: the training patients
  numbered next to the official 624-image test split. That split holds the NORMAL numbers
  below the training folder's (IM-0001 to 0111, NORMAL2-IM-0007 to 0381), the viral
  PNEUMONIA below them (person1 to 79), and bacterial PNEUMONIA from the training folder's gap
  after person77 (person78 to about 172).
The val/ folder beside --data, when there, is split by the same rule.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xray.config import load_config  # noqa: E402
from xray.data import patient_id  # noqa: E402
from xray.external_sites import external_prefix  # noqa: E402
from xray.pipeline import StageTimer, run_pipeline  # noqa: E402
from xray.storage import LocalStorage  # noqa: E402

# The held-out patient numbers of each --hold-out, as (first, last) per numbering of `xray.data.patient_id`;
# a numbering absent from a hold-out is never held out by it. Of the training folder's images, late holds
# 15% of NORMAL and 22% of PNEUMONIA, early 16% of each.
HOLD_OUTS = {
    "late": {"normal2-im-": (1150, math.inf), "person": (1350, math.inf)},
    "early": {"im-": (0, 249), "normal2-im-": (0, 559), "person": (0, 299)},
}
METRICS = ("roc_auc", "pr_auc", "accuracy", "sensitivity", "specificity", "precision", "f1")


def is_held_out(file_name: str, hold_out: str) -> bool:
    """Whether an image's patient number lies in the range `hold_out` keeps out of training (see HOLD_OUTS)."""
    match = re.fullmatch(r"(.*?)(\d+)", patient_id(file_name, fallback=file_name))
    if not match or match.group(1) not in HOLD_OUTS[hold_out]:
        return False
    first, last = HOLD_OUTS[hold_out][match.group(1)]
    return first <= int(match.group(2)) <= last


def split_by_number(data: Path, workdir: Path, hold_out: str) -> tuple[Path, Path]:
    """Link the kept and the held-out patients of `data` (and of the val/ beside it) into two labelled folders."""
    kept, held = workdir / "kept", workdir / hold_out
    for folder in (kept, held):  # a rerun in the same --workdir starts afresh
        shutil.rmtree(folder, ignore_errors=True)
    sources = [data] + [folder for folder in [data.parent / "val"] if folder.is_dir() and folder != data]
    for source in sources:
        for image in sorted(source.glob("*/*")):
            target = (held if is_held_out(image.name, hold_out) else kept) / image.parent.name / image.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(image.resolve())
    return kept, held


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/config.yaml")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/kermany224/train"))
    parser.add_argument("--workdir", help="keep the store and artifacts here (default: a temporary folder)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--hold-out", choices=sorted(HOLD_OUTS),
                        help="score this range of patient numbers as an external site of its name, never trained on")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("xray.storage").setLevel(logging.WARNING)

    workdir = Path(arguments.workdir or tempfile.mkdtemp(prefix="xray-benchmark-"))
    if any(folder.is_dir() and any(folder.iterdir()) for folder in (workdir / "store", workdir / "artifacts")):
        parser.error(f"{workdir} already holds an earlier run (store/ or artifacts/), whose images and model would "
                     "join this one: give an empty --workdir")  # fmt: skip
    config = load_config(arguments.config)
    config = dataclasses.replace(config, artifacts_dir=str(workdir / "artifacts"),
                                 pusher=dataclasses.replace(config.pusher, save_to_bentoml=False))
    storage = LocalStorage(workdir / "store")
    started = time.perf_counter()
    data = Path(arguments.data)
    if arguments.hold_out:
        data, held = split_by_number(data, workdir / "split", arguments.hold_out)
        storage.upload_folder(held, f"{external_prefix(config)}/{arguments.hold_out}")
    upload = storage.upload_folder(data, config.data.prefix)
    upload_seconds = time.perf_counter() - started
    timer = StageTimer()
    result = run_pipeline(config, storage, timer=timer)
    evaluation = result.evaluation
    trainer = evaluation.trainer

    print(f"\nconfig {arguments.config} ({config.trainer.architecture}, {config.transformation.image_size}px), "
          f"data {arguments.data}, device {trainer.device}")
    print(f"{'stage':<22}{'seconds':>10}")
    print(f"{'(upload-data)':<22}{upload_seconds:>10.1f}   {upload.transferred} files")
    for stage, seconds in timer.seconds.items():
        print(f"{stage:<22}{seconds:>10.1f}")
    print(f"{'total':<22}{sum(timer.seconds.values()):>10.1f}")
    print(f"patients per split: {trainer.transformation.patient_counts}; images: {trainer.transformation.split_counts}")
    print(f"training: {trainer.epochs_run} epochs, best epoch {trainer.best_epoch}, "
          f"best validation ROC-AUC {trainer.best_validation_roc_auc:.4f}")
    target = config.evaluation.target_sensitivity
    rule = json.loads(Path(evaluation.report_path).read_text()).get("threshold_rule", f"target sensitivity {target}")
    print(f"threshold {evaluation.threshold:.4f} ({rule})")
    for split, metrics in (("validation", evaluation.validation_metrics), ("test", evaluation.test_metrics)):
        print(f"{split:<11}" + "  ".join(f"{name} {metrics[name]:.4f}" for name in METRICS)
              + f"  confusion {metrics['confusion_matrix']}")
    test = evaluation.test_metrics
    intervals = test["confidence_intervals"]
    print("test 95% confidence intervals (patient bootstrap, "
          f"{intervals['roc_auc']['resamples']} resamples): "
          + ", ".join(f"{name} {test[name]:.4f} [{intervals[name]['low']:.4f}, {intervals[name]['high']:.4f}]"
                      for name in ("roc_auc", "sensitivity", "specificity")))
    calibration = test["calibration"]
    print(f"calibration (fitted on validation): temperature {calibration['temperature']:.3f}, "
          f"bias {calibration.get('bias', 0.0):+.3f}; ECE validation {calibration['ece_validation_before']:.4f} -> "
          f"{calibration['ece_validation_after']:.4f}, test {calibration['ece_test_before']:.4f} -> "
          f"{calibration['ece_test_after']:.4f}" + (f" ({calibration['kept']} kept)" if "kept" in calibration else ""))
    robustness = test.get("robustness")
    if robustness:
        print(f"robustness (in-distribution test split under acquisition changes, {robustness['seconds']:.0f} s): "
              f"worst specificity {robustness['worst_case']['specificity']:.3f} "
              f"({robustness['worst_case']['specificity_perturbation']}), worst ROC-AUC "
              f"{robustness['worst_case']['roc_auc']:.4f} ({robustness['worst_case']['roc_auc_perturbation']})")
        for row in robustness["perturbations"]:
            print(f"  {row['label']:<32} ROC-AUC {row['roc_auc']:.4f}  specificity {row['specificity']:.3f}  "
                  f"sensitivity {row['sensitivity']:.3f}")
    shortcut = test.get("shortcut")
    if shortcut:
        print(f"Grad-CAM mass in the outer {shortcut['fraction']:.0%}: {shortcut['share']:.3f} "
              f"(NORMAL {shortcut['share_normal']:.3f}, PNEUMONIA {shortcut['share_pneumonia']:.3f}; "
              f"{shortcut['uniform_share']:.3f} if spread evenly)")
    for site, result in evaluation.external_sites.items():
        new = result["new"]
        print(f"external site {site} ({new['count']} images): ROC-AUC {new['roc_auc']:.4f}, "
              f"sensitivity {new['sensitivity']:.3f}, specificity {new['specificity']:.3f}")
    if arguments.json:
        Path(arguments.json).write_text(json.dumps({"stage_seconds": timer.seconds, "upload_seconds": upload_seconds,
                                                    "evaluation": evaluation.to_dict()}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
