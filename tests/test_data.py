"""Patient ids, patient-level splits and the training dataset."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from tests.conftest import synthetic_xray
from xray.config import AugmentationConfig
from xray.data import CachedImages, XrayDataset, build_augmentation, patient_id, split_patients
from xray.preprocessing import Preprocessing


@pytest.mark.parametrize(
    ("name", "patient"),
    [
        ("person1000_bacteria_2931.jpeg", "person1000"),
        ("person1000_virus_1681.jpeg", "person1000"),
        ("person447_virus_921_1.jpeg", "person447"),
        ("IM-0429-0001-0002.jpeg", "im-0429"),
        ("IM-0115-0001.jpeg", "im-0115"),
        ("NORMAL2-IM-1427-0001.jpeg", "normal2-im-1427"),
        ("scan.png", "image:abc"),
    ],
)
def test_patient_id_follows_the_kermany_names(name, patient):
    assert patient_id(name, fallback="abc") == patient


def test_splits_are_stratified_and_keep_fractions():
    patients = {f"p{index}": "PNEUMONIA" if index % 4 else "NORMAL" for index in range(400)}
    assignment = split_patients(patients, 0.15, 0.15, seed=1)
    for class_name in ("NORMAL", "PNEUMONIA"):
        members = [patient for patient, name in patients.items() if name == class_name]
        test = sum(assignment[patient] == "test" for patient in members)
        assert abs(test / len(members) - 0.15) < 0.01


def test_splits_barely_move_when_new_patients_arrive():
    patients = {f"p{index}": "NORMAL" for index in range(300)}
    before = split_patients(patients, 0.15, 0.15, seed=3)
    after = split_patients(patients | {f"new{index}": "NORMAL" for index in range(30)}, 0.15, 0.15, seed=3)
    moved = sum(before[patient] != after[patient] for patient in patients)
    assert moved <= 15, f"{moved} of 300 existing patients changed split"


def test_seed_changes_the_split():
    patients = {f"p{index}": "NORMAL" for index in range(100)}
    assert split_patients(patients, 0.2, 0.2, seed=1) != split_patients(patients, 0.2, 0.2, seed=2)


def test_small_classes_still_reach_every_split():
    assignment = split_patients({"a": "NORMAL", "b": "NORMAL", "c": "NORMAL"}, 0.1, 0.1, seed=0)
    assert sorted(assignment.values()) == ["test", "train", "validation"]


def test_dataset_yields_normalised_single_channel_tensors():
    images = np.full((4, 16, 16), 128, dtype=np.uint8)
    dataset = XrayDataset(images, [0, 1, 0, 1], Preprocessing(16, mean=0.5, std=0.25),
                          build_augmentation(AugmentationConfig()))
    image, label = dataset[1]
    assert image.shape == (1, 16, 16) and image.dtype == torch.float32
    assert label.item() == 1.0
    plain, _ = XrayDataset(images, [0, 1, 0, 1], Preprocessing(16, mean=0.5, std=0.25))[0]
    assert torch.allclose(plain, torch.full((1, 16, 16), (128 / 255 - 0.5) / 0.25), atol=1e-6)


def test_a_split_is_read_from_the_memory_mapped_cache_not_copied(tmp_path):
    cache = tmp_path / "cache.npy"
    np.save(cache, np.arange(5 * 4 * 4, dtype=np.uint8).reshape(5, 4, 4))
    images = CachedImages(cache, [4, 1])
    assert len(images) == 2
    assert np.array_equal(images[0], np.load(cache)[4]) and np.array_equal(images[1], np.load(cache)[1])
    assert isinstance(images._images, np.memmap)  # read through the mapping: nothing but the pages touched
    copy = pickle.loads(pickle.dumps(images))  # what a DataLoader worker or another rank receives
    assert copy._images is None and np.array_equal(copy[0], images[0])
    plain, _ = XrayDataset(images, [1, 0], Preprocessing(4, mean=0.5, std=0.25))[1]
    assert torch.allclose(plain[0], (torch.from_numpy(np.load(cache)[1]).float() / 255 - 0.5) / 0.25)


def test_blur_and_noise_augmentation_change_sharpness_both_ways():
    """The robustness suite's worst cases (blur, noise) are trained against when asked for."""
    still = {"rotation_degrees": 0.0, "translate": 0.0, "scale_min": 1.0, "scale_max": 1.0, "brightness": 0.0,
             "contrast": 0.0, "blur_sigma": 0.0, "noise": 0.0}  # fmt: skip
    torch.manual_seed(0)
    image = torch.from_numpy(np.random.default_rng(0).integers(60, 200, (1, 64, 64)).astype(np.uint8))

    def roughness(config: AugmentationConfig) -> list[float]:
        augment = build_augmentation(config)
        return [float(augment(image).float().diff(dim=-1).abs().mean()) for _ in range(40)]

    plain = float(image.float().diff(dim=-1).abs().mean())
    assert roughness(AugmentationConfig(**still)) == [plain] * 40
    blurred = roughness(AugmentationConfig(**still | {"blur_sigma": 2.0}))
    assert min(blurred) < plain * 0.6 and max(blurred) == plain, "half the images blurred, half untouched"
    noisy = roughness(AugmentationConfig(**still | {"noise": 30.0}))
    assert 5 < sum(value > plain for value in noisy) < 35 and sum(value == plain for value in noisy) > 5


def test_normal_blur_softens_every_normal_image_and_no_pneumonia_one():
    """Sharpness must stop telling the classes apart: only NORMAL images are softened, by a random amount."""
    from xray.data import build_normal_blur

    image = np.random.default_rng(0).integers(60, 200, (64, 64)).astype(np.uint8)
    images = np.stack([image, image])
    preprocessing = Preprocessing(64, mean=0.5, std=0.25)
    assert build_normal_blur(AugmentationConfig(normal_blur_sigma=0.0)) is None
    dataset = XrayDataset(images, [0, 1], preprocessing,
                          normal_augmentation=build_normal_blur(AugmentationConfig(normal_blur_sigma=1.0)))  # fmt: skip
    sharp = XrayDataset(images, [0, 1], preprocessing)[0][0]

    def roughness(tensor):
        return float(tensor.diff(dim=-1).abs().mean())

    torch.manual_seed(0)
    normal = [roughness(dataset[0][0]) for _ in range(20)]
    assert max(normal) <= roughness(sharp) and np.mean(normal) < 0.8 * roughness(sharp), "NORMAL images soften"
    assert len(set(normal)) > 5, "by a random amount"
    assert torch.equal(dataset[1][0], sharp), "a PNEUMONIA image is left as it is"


def test_detail_augmentation_weakens_and_strengthens_edges_and_keeps_brightness():
    """Another scanner's edge enhancement, both ways: the robustness suite's `detail` change."""
    from xray.data import ScaleDetail

    image = torch.from_numpy(np.asarray(synthetic_xray("NORMAL", seed=3, size=64))).unsqueeze(0).clone()
    torch.manual_seed(0)
    edges = float(image.float().diff(dim=-1).abs().mean())
    changed = [ScaleDetail(0.4)(image) for _ in range(40)]
    roughness = [float(result.float().diff(dim=-1).abs().mean()) for result in changed]
    assert min(roughness) < 0.8 * edges and max(roughness) > 1.15 * edges, "softer and crisper images both occur"
    assert all(abs(float(result.float().mean()) - float(image.float().mean())) < 1.0 for result in changed)
    assert all(result.dtype == torch.uint8 and result.shape == image.shape for result in changed)


def test_detail_augmentation_is_part_of_training_only_when_asked_for():
    from xray.data import ScaleDetail

    def detail_steps(config: AugmentationConfig) -> list:
        return [inner for step in build_augmentation(config).transforms for inner in getattr(step, "transforms", [step])
                if isinstance(inner, ScaleDetail)]  # fmt: skip

    assert detail_steps(AugmentationConfig()) == [], "off by default"
    assert [step.spread for step in detail_steps(AugmentationConfig(detail=0.4))] == [0.4]
