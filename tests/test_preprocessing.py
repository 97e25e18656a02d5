"""Serving preprocessing repeats training preprocessing exactly."""

from __future__ import annotations

import dataclasses

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
    normalise_array,
    normalise_intensity,
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


def test_intensity_normalisation_undoes_a_scanners_display_curve():
    """Histogram equalisation is blind to any monotone grey-level map, such as another gamma or contrast."""
    generator = np.random.default_rng(0)
    pixels = np.clip(generator.normal(110, 35, (3, 64, 64)), 0, 255).astype(np.uint8)
    darker = (255 * (pixels / 255.0) ** 1.6).astype(np.uint8)
    flatter = (60 + pixels * 0.5).astype(np.uint8)
    equalized = normalise_intensity(pixels, "equalize").astype(float)
    for changed in (darker, flatter):
        assert np.abs(normalise_intensity(changed, "equalize") - equalized).mean() < 4, "equalized: about the same"
        assert np.abs(changed.astype(float) - pixels).mean() > 12, "raw: far apart"
    windowed = normalise_intensity(flatter, "percentile")
    assert windowed.shape == flatter.shape and windowed.dtype == np.uint8
    assert np.percentile(windowed, 1) <= 3 and np.percentile(windowed, 99) >= 252, "the 1-99% window fills 0-255"
    assert np.array_equal(normalise_intensity(pixels, "none"), pixels)


def test_equalize_with_raw_feeds_the_equalised_and_the_decoded_image_as_two_channels():
    generator = np.random.default_rng(1)
    pixels = np.clip(generator.normal(110, 35, (3, 32, 32)), 0, 255).astype(np.uint8)
    both = Preprocessing(image_size=32, mean=0.5, std=0.25, intensity="equalize_with_raw")
    array = normalise_array(pixels, both)
    assert both.input_channels == 2 and array.shape == (3, 2, 32, 32)
    equalised = normalise_array(pixels, dataclasses.replace(both, intensity="equalize"))
    raw = normalise_array(pixels, dataclasses.replace(both, intensity="none"))
    assert np.array_equal(array[:, :1], equalised) and np.array_equal(array[:, 1:], raw)
    assert torch.equal(normalise(pixels, both), torch.from_numpy(array)), "training sees what serving sees"
    with pytest.raises(ValueError, match="makes its own input channels"):
        dataclasses.replace(both, channels=3)


def test_border_mask_blanks_the_border_to_the_training_mean():
    pixels = np.full((40, 40), 200, dtype=np.uint8)
    tensor = normalise(pixels, Preprocessing(image_size=40, mean=0.5, std=0.25, border_mask=0.1))
    assert tensor.shape == (1, 1, 40, 40)
    assert (tensor[0, 0, :4] == 0).all() and (tensor[0, 0, :, -4:] == 0).all()
    assert tensor[0, 0, 20, 20] == pytest.approx((200 / 255 - 0.5) / 0.25)


def test_cards_written_before_the_levers_still_load():
    old = Preprocessing.from_dict({"image_size": 128, "mean": 0.5, "std": 0.2, "channels": 1, "color": "grayscale",
                                   "resize": "bilinear"})  # fmt: skip
    assert old.intensity == "none" and old.border_mask == 0.0
