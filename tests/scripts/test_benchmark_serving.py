"""scripts/benchmark_serving.py: what it serves stands for the recipe it names."""

from __future__ import annotations

import pytest

from tests.conftest import REPO, load_script
from xray.config import load_config
from xray.package import read_card


@pytest.mark.parametrize("config_name", ["config.yaml", "masked.yaml"])
def test_the_untrained_package_preprocesses_as_its_config_does(tmp_path, config_name):
    """The default equalises and masks nothing; masked.yaml masks 8% and does not equalise: both reach the card."""
    transformation = load_config(REPO / "configs" / config_name).transformation
    package = load_script("benchmark_serving").untrained_package(tmp_path, REPO / "configs" / config_name)
    preprocessing = read_card(package).preprocessing
    assert preprocessing["image_size"] == transformation.image_size
    assert preprocessing["intensity"] == transformation.intensity, "serving cost must include the recipe's mapping"
    assert preprocessing["border_mask"] == transformation.border_mask
