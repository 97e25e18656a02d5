"""Classes, patient identities, patient-level splits and the training dataset."""

from __future__ import annotations

import csv
import hashlib
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from xray.config import AugmentationConfig
from xray.decoding import DecodeLimits
from xray.entity.artifacts import DataTransformationArtifact
from xray.preprocessing import Preprocessing, normalise, scale_detail

CLASS_NAMES: tuple[str, ...] = ("NORMAL", "PNEUMONIA")
POSITIVE_CLASS = "PNEUMONIA"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".dcm", ".bmp", ".tif", ".tiff")
SPLITS = ("train", "validation", "test")
# `<data prefix>/external/<site>/<CLASS>/<image>`: other hospitals' images, scored per site, never trained on.
EXTERNAL_SITES_FOLDER = "external"
# Training data is the user's own: generous limits, unlike uploads from the internet.
TRAINING_LIMITS = DecodeLimits(max_bytes=200 * 1024 * 1024, max_pixels=200_000_000)

PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_(?:bacteria|virus)", re.IGNORECASE),
    re.compile(r"^((?:NORMAL2-)?IM-\d+)-", re.IGNORECASE),
)


def label_of(class_name: str) -> int:
    """Index of a class name; PNEUMONIA is the positive class (1)."""
    return CLASS_NAMES.index(class_name)


def patient_id(file_name: str, fallback: str) -> str:
    """Patient id from a Kermany-style file name, else `fallback` (one image, one patient)."""
    for pattern in PATIENT_PATTERNS:
        match = pattern.match(file_name)
        if match:
            return match.group(1).lower()
    return f"image:{fallback}"


def order_key(seed: int, patient: str) -> str:
    """A stable, seeded pseudo-random position for a patient, so splits survive new data."""
    return hashlib.sha256(f"{seed}:{patient}".encode()).hexdigest()


def split_patients(
    patients: dict[str, str],
    validation_fraction: float,
    test_fraction: float,
    seed: int,
) -> dict[str, str]:
    """Assign each patient (id -> class) to train/validation/test, stratified by class.

    Patients of each class are ordered by a seeded hash, so adding patients later moves
    only a few existing ones across a boundary. Each held-out split gets at least one
    patient per class when the class has three or more.
    """
    by_class: dict[str, list[str]] = defaultdict(list)
    for patient, class_name in patients.items():
        by_class[class_name].append(patient)
    assignment = {}
    for members in by_class.values():
        members.sort(key=lambda patient: order_key(seed, patient))
        count = len(members)
        test_count = round(count * test_fraction)
        validation_count = round(count * validation_fraction)
        if count >= 3:
            test_count = max(test_count, 1 if test_fraction > 0 else 0)
            validation_count = max(validation_count, 1)
        for position, patient in enumerate(members):
            if position < test_count:
                assignment[patient] = "test"
            elif position < test_count + validation_count:
                assignment[patient] = "validation"
            else:
                assignment[patient] = "train"
    return assignment


def blur_kernel_size(sigma: float) -> int:
    """An odd Gaussian kernel wide enough for `sigma` (three sigmas each side)."""
    return 2 * math.ceil(3 * sigma) + 1


def build_augmentation(config: AugmentationConfig) -> v2.Compose:
    """Training-time changes applied to each uint8 1 x H x W image before normalising."""
    steps: list[v2.Transform] = [
        v2.RandomAffine(
            degrees=config.rotation_degrees,
            translate=(config.translate, config.translate),
            scale=(config.scale_min, config.scale_max),
        ),
        v2.ColorJitter(brightness=config.brightness, contrast=config.contrast),
    ]
    if config.horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    if config.blur_sigma > 0:  # another detector's sharpness: the robustness suite's worst case was blur
        kernel = blur_kernel_size(config.blur_sigma)
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, config.blur_sigma))], p=0.5))
    if config.detail > 0:  # another scanner's edge enhancement: Kermany's last NORMAL patients have less of it
        steps.append(v2.RandomApply([ScaleDetail(config.detail)], p=0.5))
    if config.noise > 0:
        steps.append(v2.RandomApply([AddNoise(config.noise)], p=0.5))
    return v2.Compose(steps)


def build_normal_blur(config: AugmentationConfig) -> v2.Transform | None:
    """A blur of random sigma up to `normal_blur_sigma` for every NORMAL training image, or None when 0.

    Kermany's NORMAL images are sharper than its PNEUMONIA ones, and its last NORMAL patients are as
    soft as the PNEUMONIA ones: a model that reads sharpness calls them PNEUMONIA. Softening the
    NORMAL images alone takes that cue away (README, "Model quality").
    """
    if config.normal_blur_sigma <= 0:
        return None
    kernel = blur_kernel_size(config.normal_blur_sigma)
    return v2.GaussianBlur(kernel, sigma=(0.01, config.normal_blur_sigma))


class ScaleDetail(torch.nn.Module):
    """Fine detail times a gain drawn from [1 - spread, 1 + spread], on uint8 pixels: the robustness suite's
    `detail` change (`preprocessing.scale_detail`), both ways."""

    def __init__(self, spread: float) -> None:
        super().__init__()
        self.spread = spread

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        gain = 1.0 + (2 * float(torch.rand(())) - 1) * self.spread
        return torch.from_numpy(scale_detail(pixels.numpy(), gain))


class AddNoise(torch.nn.Module):
    """Gaussian noise of a random standard deviation up to `largest` grey levels, on uint8 pixels."""

    def __init__(self, largest: float) -> None:
        super().__init__()
        self.largest = largest

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        deviation = float(torch.rand(())) * self.largest
        return (pixels.float() + deviation * torch.randn(pixels.shape)).round_().clamp_(0, 255).to(torch.uint8)


class XrayDataset(Dataset):
    """Cached uint8 images (an array or `CachedImages`) with labels; augments (if asked) and normalises on access."""

    def __init__(
        self,
        images: np.ndarray | Sequence[np.ndarray],
        labels: Sequence[int],
        preprocessing: Preprocessing,
        augmentation: v2.Compose | None = None,
        normal_augmentation: v2.Transform | None = None,
    ) -> None:
        self.images = images
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.float32)
        self.preprocessing = preprocessing
        self.augmentation = augmentation
        self.normal_augmentation = normal_augmentation  # applied first, to NORMAL images only

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = torch.from_numpy(np.ascontiguousarray(self.images[index])).unsqueeze(0)
        if self.normal_augmentation is not None and self.labels[index] == label_of("NORMAL"):
            pixels = self.normal_augmentation(pixels)
        if self.augmentation is not None:
            pixels = self.augmentation(pixels)
        return normalise(pixels[0], self.preprocessing)[0], self.labels[index]


class DataError(ValueError):
    """Training data that cannot be used, explained so the user can fix the bucket."""


def read_manifest(path: str | Path) -> list[dict[str, str]]:
    """Rows of an ingestion manifest."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


class CachedImages(Sequence[np.ndarray]):
    """Some images of the memory-mapped decoded cache, read one at a time: a split is never copied into RAM.

    The file is opened on first access, in each process that reads it, so DataLoader workers and
    torchrun ranks can share one instance.
    """

    def __init__(self, cache_path: str | Path, indices: Sequence[int]) -> None:
        self.cache_path = str(cache_path)
        self.indices = np.asarray(indices, dtype=np.int64)
        self._images: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> np.ndarray:  # type: ignore[override]
        if self._images is None:
            self._images = np.load(self.cache_path, mmap_mode="r")
        return np.array(self._images[self.indices[position]])  # one image copied: writable, off the mapping

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_images": None}


def load_split(inputs: DataTransformationArtifact, split: str) -> tuple[CachedImages, np.ndarray, list[dict[str, str]]]:
    """Images (memory-mapped, read on access), labels and rows of one split, for the stages after this one."""
    rows = read_manifest(inputs.splits_path)
    chosen = [row for row in rows if row["split"] == split]
    indices = [int(row["index"]) for row in chosen]
    labels = np.array([int(row["label"]) for row in chosen], dtype=np.int64)
    return CachedImages(inputs.cache_path, indices), labels, chosen
