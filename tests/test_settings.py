"""Deployment settings: every variable read once, malformed values named."""

import pytest

from xray.config import ConfigError
from xray.settings import Settings


def test_settings_come_from_the_environment():
    settings = Settings.from_environment({"XRAY_STORAGE_URI": "s3://bucket/prefix", "XRAY_API_TOKEN": "secret",
                                          "XRAY_MAX_UPLOAD_BYTES": "1000"})
    assert settings.storage_uri == "s3://bucket/prefix"
    assert (settings.api_token, settings.max_upload_bytes) == ("secret", 1000)
    assert Settings.from_environment({}).storage_uri == "store"
    with pytest.raises(ConfigError, match="XRAY_MAX_UPLOAD_BYTES"):
        Settings.from_environment({"XRAY_MAX_UPLOAD_BYTES": "lots"})


def test_every_setting_names_its_environment_variable_and_a_help_line():
    variables = Settings.variables()
    assert "XRAY_STORAGE_URI" in variables and "XRAY_MAX_UPLOAD_BYTES" in variables
    assert all(name.startswith("XRAY_") and field.metadata["help"] for name, field in variables.items())


def test_a_number_below_its_minimum_is_refused_with_the_variable_named():
    with pytest.raises(ConfigError, match="XRAY_MAX_BATCH_FILES.*at least 1"):
        Settings.from_environment({"XRAY_MAX_BATCH_FILES": "0"})
