"""scripts/benchmark_serving.py: what it serves stands for the default recipe."""

from __future__ import annotations

from tests.conftest import REPO, load_script
from xray.config import load_config
from xray.package import read_card


def test_the_untrained_package_preprocesses_as_the_default_config_does(tmp_path):
    transformation = load_config(REPO / "configs" / "config.yaml").transformation
    package = load_script("benchmark_serving").untrained_package(tmp_path)
    preprocessing = read_card(package).preprocessing
    assert preprocessing["image_size"] == transformation.image_size
    assert preprocessing["intensity"] == transformation.intensity, "serving cost must include the default's mapping"
    assert preprocessing["border_mask"] == transformation.border_mask
