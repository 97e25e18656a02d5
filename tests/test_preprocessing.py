"""Serving preprocessing repeats training preprocessing exactly."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from xray.preprocessing import Preprocessing, normalise, preprocess, resize_image


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
