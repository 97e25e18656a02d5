"""Stage 5: publish an accepted model as a versioned package and move production to it.

A rejected model changes nothing. The production pointer is written after the package,
so a reader never follows it to a half-written package, and only if it still names the
model evaluation compared against: otherwise nothing is promoted and the reason says so.
The BentoML copy comes after the pointer; its failure is reported, not fatal (production
in storage is what every instance serves).
"""

from __future__ import annotations

import logging
from pathlib import Path

from safetensors.torch import load_file

from xray import package
from xray.config import PipelineConfig
from xray.data import CLASS_NAMES
from xray.entity.artifacts import ModelEvaluationArtifact, ModelPusherArtifact
from xray.model import build_model_for
from xray.storage import Storage

logger = logging.getLogger(__name__)

STAGE = "model_pusher"


def build_card(config: PipelineConfig, inputs: ModelEvaluationArtifact, version: str) -> package.ModelCard:
    """The model card: what the model is, how to feed it, how good it is, how it was made."""
    trainer = inputs.trainer
    transformation = trainer.transformation
    return package.ModelCard(
        version=version,
        architecture=trainer.architecture,
        classes=list(CLASS_NAMES),
        preprocessing=transformation.preprocessing,
        threshold=inputs.threshold,
        temperature=inputs.temperature,
        bias=inputs.bias,
        metrics=inputs.test_metrics,
        validation_metrics=inputs.validation_metrics,
        data_manifest_sha256=transformation.ingestion.manifest_sha256,
        config=config.to_dict(),
        code_version=package.code_version(),
        run_id=transformation.ingestion.run.run_id,
        created_at=package.utc_now(),
        environment=package.environment(),
        training={"best_epoch": trainer.best_epoch, "epochs_run": trainer.epochs_run,
                  "best_validation_roc_auc": trainer.best_validation_roc_auc, "device": trainer.device,
                  "seconds": trainer.seconds, "split_counts": transformation.split_counts,
                  "patient_counts": transformation.patient_counts},  # fmt: skip
    )


def run(config: PipelineConfig, inputs: ModelEvaluationArtifact, storage: Storage) -> ModelPusherArtifact:
    """Write, upload and promote the package of an accepted model; record why otherwise."""
    run_info = inputs.trainer.transformation.ingestion.run
    stage_dir = Path(run_info.run_dir) / STAGE
    if not inputs.accepted:
        artifact = ModelPusherArtifact(evaluation=inputs, pushed=False, version=None, package_dir=None,
                                       storage_prefix=None, bentoml_tag=None,
                                       reason=f"not pushed: {inputs.reason}")  # fmt: skip
        artifact.save(stage_dir)
        return artifact
    version = run_info.run_id
    card = build_card(config, inputs, version)
    model = build_model_for(inputs.trainer.architecture, inputs.trainer.transformation.preprocessing)
    model.load_state_dict(load_file(inputs.trainer.weights_path), strict=True)
    package_dir = package.write_package(stage_dir / "package", model, card)
    models_prefix = config.pusher.models_prefix
    prefix = package.upload_package(storage, package_dir, version, models_prefix)
    try:
        package.promote(storage, version, inputs.production_version, models_prefix)
    except package.PromotionConflictError as conflict:
        logger.warning("not promoting %s: %s", version, conflict)
        artifact = ModelPusherArtifact(evaluation=inputs, pushed=False, version=None, package_dir=str(package_dir),
                                       storage_prefix=prefix, bentoml_tag=None,
                                       reason=f"not pushed: {conflict}; the package stays unpromoted at {prefix}/, "
                                              "train again to evaluate against the new production model")  # fmt: skip
        artifact.save(stage_dir)
        return artifact
    reason = f"pushed as production: {inputs.reason}"
    tag = None
    if config.pusher.save_to_bentoml:
        try:
            tag = package.save_to_bentoml(package_dir, card, config.pusher.bentoml_model_name)
        except Exception as error:  # production in storage moved already; the BentoML copy is a convenience
            logger.error("model %s is in production but its BentoML copy failed: %s", version, error)
            reason += f" (BentoML model store copy failed: {type(error).__name__}: {error})"
    artifact = ModelPusherArtifact(evaluation=inputs, pushed=True, version=version, package_dir=str(package_dir),
                                   storage_prefix=prefix, bentoml_tag=tag, reason=reason)  # fmt: skip
    artifact.save(stage_dir)
    return artifact
