"""The shortcut measure: how much Grad-CAM mass lies in the image border."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import encode, synthetic_xray
from xray.explain import border_mask, border_share, evidence_maps, shortcut_measure
from xray.inference import Predictor
from xray.preprocessing import decode_pixels


def test_border_share_of_maps_by_hand():
    mask = border_mask(50, 50, 0.12)
    assert mask[0, 0] and mask[5, 25] and not mask[6, 6] and not mask[25, 25]
    assert mask.mean() == pytest.approx(1 - (1 - 0.24) ** 2, abs=0.01)
    maps = np.stack([mask.astype(float), (~mask).astype(float), np.ones((50, 50)), np.zeros((50, 50))])
    shares = border_share(maps, 0.12)
    assert shares[0] == 1.0 and shares[1] == 0.0 and shares[2] == pytest.approx(mask.mean())
    assert np.isnan(shares[3]), "an empty map has no share"


def test_shortcut_measure_on_a_model(trained_package):
    predictor = Predictor.from_package(trained_package)
    size = predictor.preprocessing.image_size
    labels = np.arange(12) % 2
    pixels = np.stack([decode_pixels(encode(synthetic_xray("PNEUMONIA" if label else "NORMAL", index)), size)
                       for index, label in enumerate(labels)])  # fmt: skip
    maps = evidence_maps(predictor, pixels, batch_size=5)
    assert maps.shape == pixels.shape and (maps >= 0).all()
    measure = shortcut_measure(predictor, pixels, labels)
    assert 0 <= measure["share"] <= 1 and measure["fraction"] == 0.12
    assert measure["share"] == pytest.approx(np.nanmean(border_share(maps)))
    assert {"share_normal", "share_pneumonia", "uniform_share", "empty_maps"} <= set(measure)
