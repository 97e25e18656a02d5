"""The model package: safe weights, a complete card, and a production pointer written last."""

from __future__ import annotations

import dataclasses
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from xray.model import build_model
from xray.package import (
    ModelCard,
    PackageError,
    PromotionConflictError,
    fetch_package,
    fetch_production,
    load_package,
    production_version,
    promote,
    prune_cache,
    publish,
    upload_package,
    write_package,
)
from xray.storage import LocalStorage, StorageError, open_storage


def card(version="v1"):
    return ModelCard(
        version=version,
        architecture="small_cnn",
        classes=["NORMAL", "PNEUMONIA"],
        preprocessing={
            "image_size": 32,
            "mean": 0.5,
            "std": 0.25,
            "channels": 1,
            "color": "grayscale",
            "resize": "bilinear",
        },
        threshold=0.4,
    )


def test_round_trip_gives_the_same_predictions(tmp_path):
    model = build_model("small_cnn").eval()
    write_package(tmp_path / "package", model, card())
    loaded, loaded_card = load_package(tmp_path / "package")
    images = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(images), loaded(images))
    assert loaded_card == dataclasses.replace(card(), onnx=loaded_card.onnx)
    assert loaded_card.onnx["file"] == "model.onnx" and loaded_card.onnx["max_logit_difference"] <= 1e-4
    assert (tmp_path / "package" / "model.onnx").is_file()


def test_a_two_channel_package_loads_with_its_stem_and_exports_to_onnx(tmp_path):
    """`intensity: equalize_with_raw` packages rebuild a two-channel stem from the card, in torch and in ONNX."""
    two = dataclasses.replace(card(), preprocessing={**card().preprocessing, "intensity": "equalize_with_raw"})
    model = build_model("small_cnn", input_channels=2).eval()
    write_package(tmp_path / "package", model, two)
    loaded, loaded_card = load_package(tmp_path / "package")
    images = torch.randn(2, 2, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(images), loaded(images))
    assert loaded_card.onnx["file"] == "model.onnx" and loaded_card.onnx["max_logit_difference"] <= 1e-4


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

    def write_bytes_if_absent(self, key, data):
        self.writes.append(key)
        return super().write_bytes_if_absent(key, data)


def test_pointer_is_written_after_the_package(tmp_path):
    storage = RecordingStorage(tmp_path / "store")
    write_package(tmp_path / "package", build_model("small_cnn"), card("v7"))
    assert production_version(storage) is None and fetch_production(storage, tmp_path / "cache") is None
    publish(storage, tmp_path / "package", "v7")
    assert storage.writes[-1] == "models/production.json"
    package_files = {"models/v7/model.safetensors", "models/v7/model_card.json", "models/v7/model.onnx"}
    assert set(storage.writes[:-1]) == package_files
    assert production_version(storage) == "v7"
    fetched = fetch_production(storage, tmp_path / "cache")
    assert json.loads((fetched / "model_card.json").read_text())["version"] == "v7"


def published_store(tmp_path, versions=("v1",)):
    storage = LocalStorage(tmp_path / "store")
    for version in versions:
        write_package(tmp_path / version, build_model("small_cnn"), card(version))
        upload_package(storage, tmp_path / version, version)
    return storage


@pytest.mark.parametrize("forged", ["/../../../../victim", "../victim", "a/b", ".hidden", "", None, 7, "x" * 200])
def test_a_forged_version_in_production_json_is_refused(tmp_path, forged):
    storage = LocalStorage(tmp_path / "store")
    victim = tmp_path / "victim"
    victim.mkdir()
    storage.write_json("models/production.json", {"version": forged})
    with pytest.raises(PackageError, match="refusing model version"):
        production_version(storage)
    with pytest.raises(PackageError, match="refusing model version"):
        fetch_production(storage, tmp_path / "cache" / "models")
    assert victim.is_dir()
    with pytest.raises(PackageError, match="refusing model version"):
        fetch_package(storage, "../victim", tmp_path / "cache")


def test_promotion_refuses_when_production_moved_since_evaluation(tmp_path):
    storage = published_store(tmp_path, ("v1", "v2", "v3"))
    promote(storage, "v1", expected=None)
    promote(storage, "v2", expected="v1")
    with pytest.raises(PromotionConflictError, match="production moved to v2 after evaluation compared against v1"):
        promote(storage, "v3", expected="v1")
    with pytest.raises(PromotionConflictError, match="moved to v2 after evaluation compared against no production"):
        promote(storage, "v3", expected=None)
    assert production_version(storage) == "v2"
    assert storage.read_json("models/production.json")["previous"] == "v1"


def race_promotions(storage, versions, expected):
    """Promote each version from its own thread, all having read the same pointer before any writes."""
    barrier = threading.Barrier(len(versions))
    reading = storage.read_bytes_with_etag
    writing = threading.Lock()

    def read_then_wait(key):
        try:  # a first promotion reads "not found": that thread must reach the barrier too, or the other waits forever
            return reading(key)
        finally:
            barrier.wait(timeout=60)

    def promote_one(version):
        try:
            promote(storage, version, expected)
            return version
        except PromotionConflictError:
            return None

    storage.read_bytes_with_etag = read_then_wait
    for name in ("write_bytes_if_absent", "write_bytes_if_match"):
        original = getattr(storage, name)

        def one_at_a_time(*arguments, original=original):
            with writing:
                return original(*arguments)

        setattr(storage, name, one_at_a_time)
    try:
        with ThreadPoolExecutor(len(versions)) as pool:
            return [winner for winner in pool.map(promote_one, versions) if winner]
    finally:
        for name in ("read_bytes_with_etag", "write_bytes_if_absent", "write_bytes_if_match"):
            delattr(storage, name)


@pytest.mark.parametrize("backend", ["local", "s3-server"])
@pytest.mark.parametrize("first", [True, False], ids=["first-promotion", "replacing"])
def test_two_racing_promotions_exactly_one_wins_and_the_pointer_names_a_complete_package(
    tmp_path, request, backend, first
):
    storage = (LocalStorage(tmp_path / "store") if backend == "local"
               else open_storage(request.getfixturevalue("moto_bucket")))  # fmt: skip
    for version in ("base", "a", "b"):
        write_package(tmp_path / version, build_model("small_cnn"), card(version))
        upload_package(storage, tmp_path / version, version)
    expected = None if first else "base"
    if not first:
        promote(storage, "base", None)
    winners = race_promotions(storage, ["a", "b"], expected)
    assert len(winners) == 1
    assert production_version(storage) == winners[0]
    model, loaded = load_package(fetch_production(storage, tmp_path / "cache"))
    assert loaded.version == winners[0]


def test_local_promotions_racing_for_real_one_wins(tmp_path):
    storage = published_store(tmp_path, ["base"] + [f"v{index}" for index in range(6)])
    promote(storage, "base", None)
    barrier = threading.Barrier(6)

    def promote_one(index):
        barrier.wait()
        try:
            promote(LocalStorage(tmp_path / "store"), f"v{index}", "base")
            return True
        except PromotionConflictError:
            return False

    with ThreadPoolExecutor(6) as pool:
        assert sum(pool.map(promote_one, range(6))) == 1


def test_cache_keeps_only_the_named_versions(tmp_path):
    storage = published_store(tmp_path, ("v1", "v2", "v3"))
    for version in ("v1", "v2", "v3"):
        fetch_package(storage, version, tmp_path / "cache")
    assert prune_cache(tmp_path / "cache", {"v3", "v2"}) == ["v1"]
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == ["v2", "v3"]


def test_a_download_cut_off_by_the_server_stopping_leaves_nothing_and_is_retried(tmp_path, moto_server, moto_bucket):
    """moto stops between the package's two files: no folder under the version's name; once back, it completes."""
    storage = open_storage(moto_bucket).with_timeouts(1, attempts=1)
    write_package(tmp_path / "v1", build_model("small_cnn"), card("v1"))
    publish(storage, tmp_path / "v1", "v1")
    calls = []

    def stop_on_second_file(**_):
        calls.append(1)
        if len(calls) == 2:
            moto_server.stop()

    storage.client.meta.events.register("before-call.s3.GetObject", stop_on_second_file)
    cache = tmp_path / "cache"
    try:
        with pytest.raises(StorageError, match="Cannot reach"):
            fetch_production(storage, cache)
        assert not (cache / "v1").exists()
        assert [path.name for path in cache.rglob("*") if path.is_file()] == []
    finally:
        moto_server.start()
    fetched = fetch_production(storage, cache)
    assert fetched == cache / "v1" and load_package(fetched)[1].version == "v1"
