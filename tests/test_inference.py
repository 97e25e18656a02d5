"""The inference core: the package's preprocessing, calibration and threshold, applied the same way everywhere."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from xray.explain import explain, grad_cam
from xray.inference import Predictor
from xray.metrics import sigmoid
from xray.model import build_model
from xray.package import ModelCard
from xray.preprocessing import normalise

CARD = ModelCard(version="v1", architecture="small_cnn", classes=["NORMAL", "PNEUMONIA"],
                 preprocessing={"image_size": 32, "mean": 0.5, "std": 0.25, "channels": 1,
                                "color": "grayscale", "resize": "bilinear"}, threshold=0.5)  # fmt: skip


def gradient_image(size: int = 48) -> Image.Image:
    ramp = np.tile(np.linspace(0, 255, size, dtype=np.uint8), (size, 1))
    return Image.fromarray(ramp, mode="L")


@pytest.mark.parametrize(("temperature", "bias"), [(1.0, 0.0), (2.0, 1.5), (0.5, -2.0)])
def test_served_probability_applies_the_packages_temperature_and_bias(temperature, bias):
    torch.manual_seed(0)
    model = build_model("small_cnn").eval()
    predictor = Predictor(model, dataclasses.replace(CARD, temperature=temperature, bias=bias))
    image = gradient_image()
    with torch.no_grad():
        logit = model(normalise(predictor.prepare(image), predictor.preprocessing)).double().numpy()
    expected = float(sigmoid(logit, temperature, bias)[0])

    [prediction] = predictor.predict([image])
    _, explained = explain(predictor, predictor.prepare(image))

    assert prediction.probability == pytest.approx(expected, abs=1e-6)
    assert explained.probability == pytest.approx(expected, abs=1e-5)
    assert prediction.label == ("PNEUMONIA" if expected >= 0.5 else "NORMAL")


def test_cards_written_before_the_bias_existed_load_with_no_bias():
    raw = {key: value for key, value in CARD.to_dict().items() if key != "bias"}
    assert ModelCard.from_dict(raw).bias == 0.0


@pytest.mark.parametrize("architecture", ["small_cnn", "resnet18", "efficientnet_lite0"])
def test_heatmap_marks_where_a_pneumonia_answer_comes_from_whatever_the_calibration(architecture):
    """The map is measured from the decision threshold, not from a raw logit of zero that calibration moves."""
    torch.manual_seed(1)
    model = build_model(architecture).eval()
    image = gradient_image(64)
    sure_pneumonia = Predictor(model, dataclasses.replace(CARD, bias=40.0))
    sure_normal = Predictor(model, dataclasses.replace(CARD, bias=-40.0))

    heatmap, prediction = grad_cam(sure_pneumonia, sure_pneumonia.prepare(image))
    assert prediction.label == "PNEUMONIA"
    assert heatmap.shape == (32, 32) and heatmap.min() >= 0 and heatmap.max() == pytest.approx(1.0)

    heatmap, prediction = grad_cam(sure_normal, sure_normal.prepare(image))
    assert prediction.label == "NORMAL" and heatmap.max() == 0.0


def test_a_swapped_out_model_is_freed_by_reference_counting_alone():
    """The serving heap is frozen at each swap (`freeze_heap`): a model left in a reference cycle would leak."""
    import gc
    import time
    import weakref

    from xray.batching import BatchOptions
    from xray.inference import ModelHolder

    holder = ModelHolder()
    gc.disable()  # only reference counting may free it
    try:
        first = Predictor(build_model("small_cnn").eval(), CARD, options=BatchOptions(idle_exit_s=0.05))
        first.predict([gradient_image()])  # its batcher's worker thread has run
        holder.swap(first)
        assert gc.get_freeze_count() > 0
        freed = weakref.ref(first)
        del first
        holder.swap(Predictor(build_model("small_cnn").eval(), dataclasses.replace(CARD, version="v2")))
        deadline = time.monotonic() + 5
        while freed() is not None and time.monotonic() < deadline:
            time.sleep(0.02)  # the old batcher's worker exits after 0.05 s idle
        assert freed() is None, "the swapped-out predictor is still alive: a reference cycle keeps it"
        assert holder.current.version == "v2" and holder.current.predict([gradient_image()])[0].model_version == "v2"
    finally:
        gc.enable()
        gc.unfreeze()
