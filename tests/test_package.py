"""The model package: safe weights, a complete card, and a production pointer written last."""

from __future__ import annotations

import json

import pytest
import torch

from xray.model import build_model
from xray.package import (
    ModelCard,
    PackageError,
    fetch_production,
    load_package,
    production_version,
    publish,
    write_package,
)
from xray.storage import LocalStorage


def card(version="v1"):
    return ModelCard(version=version, architecture="small_cnn", classes=["NORMAL", "PNEUMONIA"],
                     preprocessing={"image_size": 32, "mean": 0.5, "std": 0.25, "channels": 1,
                                    "color": "grayscale", "resize": "bilinear"}, threshold=0.4)


def test_round_trip_gives_the_same_predictions(tmp_path):
    model = build_model("small_cnn").eval()
    write_package(tmp_path / "package", model, card())
    loaded, loaded_card = load_package(tmp_path / "package")
    images = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(images), loaded(images))
    assert loaded_card == card()


def test_weights_file_is_safetensors_not_a_pickle(tmp_path):
    write_package(tmp_path / "package", build_model("small_cnn"), card())
    data = (tmp_path / "package" / "model.safetensors").read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_length])
    assert header["__metadata__"] == {"architecture": "small_cnn"}
    assert "backbone.0.weight" in header


def test_incomplete_package_is_a_clear_error(tmp_path):
    write_package(tmp_path / "package", build_model("small_cnn"), card())
    (tmp_path / "package" / "model.safetensors").unlink()
    with pytest.raises(PackageError, match="model.safetensors is missing"):
        load_package(tmp_path / "package")


class RecordingStorage(LocalStorage):
    """Local storage that remembers the order keys were written in."""

    def __init__(self, root):
        super().__init__(root)
        self.writes = []

    def upload_file(self, local_path, key):
        self.writes.append(key)
        super().upload_file(local_path, key)

    def write_json(self, key, value):
        self.writes.append(key)
        super().write_json(key, value)


def test_pointer_is_written_after_the_package(tmp_path):
    storage = RecordingStorage(tmp_path / "store")
    write_package(tmp_path / "package", build_model("small_cnn"), card("v7"))
    assert production_version(storage) is None and fetch_production(storage, tmp_path / "cache") is None
    publish(storage, tmp_path / "package", "v7")
    assert storage.writes[-1] == "models/production.json"
    assert set(storage.writes[:-1]) == {"models/v7/model.safetensors", "models/v7/model_card.json"}
    assert production_version(storage) == "v7"
    fetched = fetch_production(storage, tmp_path / "cache")
    assert json.loads((fetched / "model_card.json").read_text())["version"] == "v7"
