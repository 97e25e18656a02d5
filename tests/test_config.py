"""Config files load into frozen dataclasses; mistakes stop with the key and the file named."""

from __future__ import annotations

import dataclasses

import pytest

from tests.conftest import REPO
from xray.config import ConfigError, PipelineConfig, load_config
from xray.model import build_model


@pytest.mark.parametrize("name", sorted(path.name for path in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    config = load_config(REPO / "configs" / name)
    build_model(config.trainer.architecture, pretrained=False)  # a variant names a known model
    assert isinstance(config, PipelineConfig)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 1  # type: ignore[misc]


def test_default_file_matches_dataclass_defaults(tmp_path):
    loaded = load_config(REPO / "configs" / "config.yaml", home=tmp_path)
    assert loaded == dataclasses.replace(PipelineConfig(), artifacts_dir=str(tmp_path / "artifacts"))


def test_relative_paths_start_from_xray_home(tmp_path, monkeypatch):
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    (home / "configs").mkdir(parents=True)
    elsewhere.mkdir()
    (home / "configs" / "mine.yaml").write_text("artifacts_dir: runs\n")
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("XRAY_HOME", str(home))
    config = load_config("configs/mine.yaml")
    assert config.artifacts_dir == str(home / "runs")


def test_shipped_configs_are_found_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config("configs/smoke.yaml")
    assert config.name == load_config(REPO / "configs" / "smoke.yaml").name
    assert config.artifacts_dir.startswith(str(tmp_path))
    with pytest.raises(ConfigError, match=f"looked in {tmp_path}/configs/nope.yaml and {REPO}/configs/nope.yaml"):
        load_config("configs/nope.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("trainer:\n  epoch: 3\n", r"unknown key 'trainer.epoch' \(did you mean 'trainer.epochs'\?\)"),
        ("trainer:\n  epochs: three\n", r"'trainer.epochs' must be a whole number"),
        ("trainer:\n  pretrained: 1\n", r"'trainer.pretrained' must be true or false"),
        ("trainer:\n  architecture: small_cnn\n", r"small_cnn has no pretrained weights: set 'trainer.pretrained"),
        ("trainer:\n  architecture: vgg\n", r"'trainer.architecture' is 'vgg'; choose one of resnet18"),
        ("transformation: 5\n", r"'transformation' must be a mapping"),
        ("transformation:\n  validation_fraction: 0.6\n  test_fraction: 0.5\n", "held-out fractions"),
        ("transformation:\n  augmentation:\n    normal_blur_sigma: -1\n",
         r"'transformation.augmentation.normal_blur_sigma' must be at least 0"),
        ("trainer:\n  backbone_learning_rate_scale: 0\n", r"'trainer.backbone_learning_rate_scale' must lie in"),
        ("trainer:\n  weight_average_decay: 1.0\n", r"'trainer.weight_average_decay' must be at least 0 \(off\)"),
        ("transformation:\n  augmentation:\n    detail: 1.0\n", r"'transformation.augmentation.detail' must be below"),
        ("evaluation:\n  sensitivity_confidence: 0.3\n", r"'evaluation.sensitivity_confidence' must be 0 \(the"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("trainer: [\n", "not valid YAML"),
    ],
)
def test_mistakes_name_the_key_and_the_file(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as raised:
        load_config(path)
    assert str(path) in str(raised.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_integers_are_accepted_where_numbers_are_expected(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("trainer:\n  learning_rate: 1\n")
    assert load_config(path).trainer.learning_rate == 1.0
