"""Serving's forward pass: the ONNX export scores exactly as the torch weights, or is not shipped at all."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from xray.config import ConfigError
from xray.inference import Predictor
from xray.model import build_model
from xray.package import ModelCard, fetch_package, load_package, read_card, upload_package, write_package
from xray.runtime import ONNX_FILE, RuntimeUnavailableError
from xray.settings import Settings
from xray.storage import LocalStorage

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"


def default_card(version: str = "v1") -> ModelCard:
    """The shipped default's architecture and preprocessing (EfficientNet-Lite0, 128 px, JPEG draft decode,
    histogram equalisation)."""
    return ModelCard(version=version, architecture="efficientnet_lite0", classes=["NORMAL", "PNEUMONIA"],
                     preprocessing={"image_size": 128, "mean": 0.475, "std": 0.235, "channels": 1,
                                    "color": "grayscale", "resize": "bilinear", "decode": "jpeg-draft-2x",
                                    "intensity": "equalize"},
                     threshold=0.5, temperature=1.3, bias=-0.2)  # fmt: skip


@pytest.fixture(scope="module")
def default_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", pretrained=False).eval()
    return write_package(tmp_path_factory.mktemp("package") / "v1", model, default_card())


def real_xrays() -> list[bytes]:
    files = sorted((SAMPLE / "NORMAL").glob("*.jpeg"))[:6] + sorted((SAMPLE / "PNEUMONIA").glob("*.jpeg"))[:6]
    assert len(files) == 12, f"the bundled sample in {SAMPLE} is missing"
    return [path.read_bytes() for path in files]


def test_onnx_and_torch_give_the_same_probabilities_on_real_xrays(default_package):
    onnx = Predictor.from_package(default_package, settings=Settings(inference_runtime="onnx"))
    torch_ = Predictor.from_package(default_package, settings=Settings(inference_runtime="torch"))
    assert (onnx.forward.name, torch_.forward.name) == ("onnx", "torch")
    pixels = np.stack([onnx.decode(data) for data in real_xrays()])
    from_onnx, from_torch = onnx.probabilities(pixels), torch_.probabilities(pixels)
    assert from_onnx.shape == (12,)
    np.testing.assert_allclose(from_onnx, from_torch, rtol=0, atol=1e-5)
    labels = [[result.label for result in predictor.predict_pixels(list(pixels))] for predictor in (onnx, torch_)]
    assert labels[0] == labels[1]


def test_the_card_records_the_export_and_its_check(default_package):
    card = read_card(default_package)
    assert card.onnx["file"] == ONNX_FILE
    assert 0 <= card.onnx["max_logit_difference"] <= card.onnx["tolerance"] == 1e-4
    assert (default_package / ONNX_FILE).stat().st_size > 1_000_000  # the weights are inside, not external data


def test_auto_serves_onnx_when_the_package_has_it(default_package):
    assert Predictor.from_package(default_package, settings=Settings()).forward.name == "onnx"


def test_a_mismatching_export_is_left_out_and_torch_serves(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("xray.runtime.ONNX_TOLERANCE", -1.0)  # no export can pass: as if it differed
    model = build_model("small_cnn").eval()
    small = {**default_card().preprocessing, "image_size": 32, "channels": 1}
    card = dataclasses.replace(default_card(), architecture="small_cnn", preprocessing=small)
    with caplog.at_level(logging.WARNING, logger="xray.package"):
        package = write_package(tmp_path / "v1", model, card)
    assert "ships without ONNX" in caplog.text and "differs from torch" in caplog.text
    assert not (package / ONNX_FILE).exists()
    assert read_card(package).onnx == {}
    assert Predictor.from_package(package, settings=Settings()).forward.name == "torch"
    with pytest.raises(RuntimeUnavailableError, match="no model.onnx.*XRAY_INFERENCE_RUNTIME=torch"):
        Predictor.from_package(package, settings=Settings(inference_runtime="onnx"))


def test_published_packages_carry_the_export_and_older_ones_still_fetch(tmp_path, default_package):
    storage = LocalStorage(tmp_path / "store")
    upload_package(storage, default_package, "v1")
    fetched = fetch_package(storage, "v1", tmp_path / "cache")
    assert (fetched / ONNX_FILE).read_bytes() == (default_package / ONNX_FILE).read_bytes()

    model, _ = load_package(default_package)  # a package written before the export existed: weights and card only
    old = write_package(tmp_path / "old", model, default_card("v0"))
    (old / ONNX_FILE).unlink()
    card_path = old / "model_card.json"
    raw = json.loads(card_path.read_text())
    del raw["onnx"]
    card_path.write_text(json.dumps(raw))
    upload_package(storage, old, "v0")
    assert not storage.exists(f"models/v0/{ONNX_FILE}")
    fetched_old = fetch_package(storage, "v0", tmp_path / "cache")
    assert Predictor.from_package(fetched_old, settings=Settings()).forward.name == "torch"


def test_an_unknown_runtime_setting_is_one_clear_error():
    with pytest.raises(ConfigError, match="XRAY_INFERENCE_RUNTIME='tensorrt' must be one of auto, onnx, torch"):
        Settings.from_environment({"XRAY_INFERENCE_RUNTIME": "tensorrt"})
    assert Settings.from_environment({"XRAY_INFERENCE_RUNTIME": "ONNX"}).inference_runtime == "onnx"
