"""Serving preprocessing repeats training preprocessing exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from xray.preprocessing import (
    DECODE_FULL,
    DECODE_JPEG_DRAFT,
    Preprocessing,
    decode_pixels,
    normalise,
    preprocess,
    resize_image,
)


def test_any_mode_and_size_becomes_a_square_gray_input():
    preprocessing = Preprocessing(image_size=32, mean=0.5, std=0.2)
    for image in (Image.new("RGB", (90, 60), (10, 200, 30)), Image.new("L", (20, 50), 77),
                  Image.new("RGBA", (64, 64), (5, 5, 5, 0))):
        tensor = preprocess(image, preprocessing)
        assert tensor.shape == (1, 1, 32, 32) and tensor.dtype == torch.float32


def test_serving_equals_cached_training_path():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 90), dtype=np.uint8))
    preprocessing = Preprocessing(image_size=24, mean=0.4, std=0.3)
    cached = np.stack([resize_image(image, 24)])
    assert torch.equal(preprocess(image, preprocessing), normalise(cached, preprocessing))


def test_normalisation_uses_recorded_mean_and_std():
    tensor = normalise(np.full((2, 4, 4), 255, dtype=np.uint8), Preprocessing(4, mean=0.5, std=0.25))
    assert tensor.shape == (2, 1, 4, 4)
    assert torch.allclose(tensor, torch.full_like(tensor, 2.0))
    assert normalise(np.zeros((4, 4), np.uint8), Preprocessing(4, 0.0, 1.0, channels=3)).shape == (1, 3, 4, 4)


def test_training_cache_and_serving_produce_identical_pixels_for_real_files(tmp_path):
    from tests.conftest import SHARED_DATA
    from xray.components.data_transformation import cache_images
    from xray.inference import Predictor
    from xray.model import build_model
    from xray.package import ModelCard

    paths = sorted((SHARED_DATA / "val").glob("*/*.jpeg"))
    if not paths:
        pytest.skip(f"real X-rays not present under {SHARED_DATA}")
    cache_images([{"path": str(path)} for path in paths], 128, tmp_path / "cache.npy", workers=2)
    cached = np.load(tmp_path / "cache.npy")
    card = ModelCard(version="v", architecture="small_cnn", classes=["NORMAL", "PNEUMONIA"],
                     preprocessing=Preprocessing(128, 0.5, 0.25).to_dict(), threshold=0.5)  # fmt: skip
    predictor = Predictor(build_model("small_cnn"), card)
    served = np.stack([predictor.decode(path.read_bytes()) for path in paths])
    assert served.shape == (len(paths), 128, 128)
    np.testing.assert_array_equal(served, cached)
    # the draft path sees nearly what a full decode saw: a bilinear shrink of a 2x-or-larger image
    full = np.stack([decode_pixels(path.read_bytes(), 128, decode=DECODE_FULL) for path in paths])
    assert np.abs(full.astype(int) - served).mean() < 2.0


def test_the_decode_path_is_recorded_and_cards_without_it_decode_in_full():
    assert Preprocessing(64, 0.5, 0.25).to_dict()["decode"] == DECODE_JPEG_DRAFT
    old_card_entry = {"image_size": 64, "mean": 0.5, "std": 0.25, "channels": 1, "color": "grayscale",
                      "resize": "bilinear"}  # fmt: skip
    assert Preprocessing.from_dict(old_card_entry).decode == DECODE_FULL
    with pytest.raises(ValueError, match="unknown decode path"):
        Preprocessing(64, 0.5, 0.25, decode="fast")
