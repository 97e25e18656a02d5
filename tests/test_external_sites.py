"""External sites: scored and reported per site, never trained on, and a gate against getting worse."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tests.conftest import make_dataset
from xray.components import data_ingestion, data_transformation, model_evaluation, model_trainer
from xray.data import read_manifest
from xray.external_sites import decide_sites
from xray.pipeline import start_run


def test_sites_are_scored_per_site_and_never_trained_on(smoke_config, seeded_storage, tmp_path):
    seeded_storage.upload_folder(make_dataset(tmp_path / "clinic", per_class=6, start=300), "data/external/clinic")
    seeded_storage.upload_folder(make_dataset(tmp_path / "rural", per_class=4, start=400), "data/external/rural")
    ingestion = data_ingestion.run(smoke_config, start_run(smoke_config, seeded_storage, "run-1"), seeded_storage)
    assert sum(ingestion.class_counts.values()) == 48, "only the 48 training images, not the 20 of the sites"
    assert not [row for row in read_manifest(ingestion.manifest_path) if "external" in row["key"]]
    report = json.loads(Path(ingestion.report_path).read_text())
    assert not [entry for entry in report["rejected"] if "external" in entry["key"]]

    transformation = data_transformation.run(smoke_config, ingestion, seeded_storage)
    trainer = model_trainer.run(smoke_config, transformation, seeded_storage)
    artifact = model_evaluation.run(smoke_config, trainer, seeded_storage)
    assert set(artifact.external_sites) == {"clinic", "rural"}
    assert artifact.external_sites["clinic"]["new"]["count"] == 12
    assert artifact.external_sites["rural"]["new"]["confusion_matrix"][0][0] + \
        artifact.external_sites["rural"]["new"]["confusion_matrix"][0][1] == 4
    assert artifact.external_sites["clinic"]["production"] is None
    assert artifact.accepted, "with no production model there is nothing a site could get worse than"
    saved = json.loads(Path(artifact.report_path).read_text())
    assert saved["external_sites"]["rural"]["new"]["threshold"] == artifact.threshold


def site(new: float, production: float | None) -> dict:
    return {"new": {"roc_auc": new}, "production": None if production is None else {"roc_auc": production}}


@pytest.mark.parametrize(
    ("results", "gate", "tolerance", "accepted", "words"),
    [
        ({}, True, 0.0, True, "no external sites"),
        ({"a": site(0.90, 0.92), "b": site(0.99, 0.95)}, True, 0.0, False, "a 0.9000 < production 0.9200"),
        ({"a": site(0.90, 0.92)}, False, 0.0, True, "not gated"),
        ({"a": site(0.90, 0.92)}, True, 0.05, True, "no external site worse"),
        ({"a": site(0.92, 0.92), "b": site(0.97, 0.95)}, True, 0.0, True, "no external site worse"),
        ({"a": site(0.50, None)}, True, 0.0, True, "no production model"),
    ],
)
def test_gate_refuses_a_model_worse_on_any_site(smoke_config, results, gate, tolerance, accepted, words):
    config = dataclasses.replace(smoke_config, evaluation=dataclasses.replace(
        smoke_config.evaluation, external_sites_must_not_worsen=gate, external_site_tolerance=tolerance))
    decision, reason = decide_sites(results, config)
    assert decision is accepted and words in reason


def test_the_gate_is_on_by_default(smoke_config):
    assert smoke_config.evaluation.external_sites_must_not_worsen is True
