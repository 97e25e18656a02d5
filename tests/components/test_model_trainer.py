"""Stage 3: training writes the best checkpoint and history, and resumes where it stopped."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from xray.components import data_ingestion, data_transformation, model_trainer
from xray.config import ConfigError
from xray.pipeline import start_run


def prepared(config, storage):
    ingestion = data_ingestion.run(config, start_run(config, storage, "run-1"), storage)
    return data_transformation.run(config, ingestion, storage)


def with_epochs(config, epochs):
    return dataclasses.replace(config, trainer=dataclasses.replace(config.trainer, epochs=epochs))


def test_training_writes_best_weights_history_and_progress(smoke_config, seeded_storage):
    events = []
    artifact = model_trainer.run(smoke_config, prepared(smoke_config, seeded_storage), seeded_storage,
                                 progress=events.append)
    history = json.loads(Path(artifact.history_path).read_text())
    assert [record["epoch"] for record in history] == [1, 2]
    assert artifact.best_validation_roc_auc == max(record["validation_roc_auc"] for record in history)
    assert artifact.best_validation_roc_auc > 0.8, "the blob is easy to learn"
    assert "fc.weight" not in load_file(artifact.weights_path)  # small_cnn, not a ResNet
    assert [event["epoch"] for event in events] == [1, 2]
    assert artifact.device == "cpu"


def interrupt_in_epoch_two(config, transformation, storage, monkeypatch) -> None:
    """Run training until epoch 2 starts, as a Ctrl-C would stop it, then restore the real epoch."""
    real_epoch = model_trainer.train_one_epoch

    def crash_in_epoch_two(*arguments):
        if arguments[-1] == 2:
            raise KeyboardInterrupt
        return real_epoch(*arguments)

    monkeypatch.setattr(model_trainer, "train_one_epoch", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        model_trainer.run(config, transformation, storage)
    monkeypatch.setattr(model_trainer, "train_one_epoch", real_epoch)


@pytest.mark.parametrize("intensity", ["none", "equalize_with_raw"])
def test_an_interrupted_run_resumes_from_its_last_checkpoint(intensity, smoke_config, seeded_storage, monkeypatch,
                                                             caplog):
    """Also with a two-channel stem, whose checkpoint must load back into the model the config builds."""
    config = with_epochs(smoke_config, 3)
    config = dataclasses.replace(config, transformation=dataclasses.replace(config.transformation, intensity=intensity))
    transformation = prepared(config, seeded_storage)
    interrupt_in_epoch_two(config, transformation, seeded_storage, monkeypatch)
    caplog.set_level("INFO")
    events = []
    resumed = model_trainer.run(config, transformation, seeded_storage, progress=events.append)
    assert [event["epoch"] for event in events] == [2, 3], "epoch 1 must not be trained again"
    assert resumed.epochs_run == 3 and "resuming" in caplog.text


def test_resuming_under_other_settings_is_refused(smoke_config, seeded_storage):
    transformation = prepared(smoke_config, seeded_storage)
    model_trainer.run(with_epochs(smoke_config, 1), transformation, seeded_storage)
    with pytest.raises(ConfigError, match=r"the config \(trainer.epochs\) changed"):
        model_trainer.run(with_epochs(smoke_config, 3), transformation, seeded_storage)


def test_resuming_on_other_data_splits_or_image_size_names_what_changed(smoke_config, seeded_storage):
    """Another manifest or other split fractions could put patients the model trained on into the test split."""
    transformation = prepared(smoke_config, seeded_storage)
    model_trainer.run(smoke_config, transformation, seeded_storage)
    other_data = dataclasses.replace(transformation, ingestion=dataclasses.replace(
        transformation.ingestion, manifest_sha256="0" * 64))  # fmt: skip
    with pytest.raises(ConfigError, match="the data manifest hash changed"):
        model_trainer.run(smoke_config, other_data, seeded_storage)
    split = dataclasses.replace(smoke_config.transformation, validation_fraction=0.3, image_size=40)
    with pytest.raises(ConfigError, match="the image size and the split fractions changed"):
        model_trainer.run(dataclasses.replace(smoke_config, transformation=split), transformation, seeded_storage)


def test_early_stopping_ends_a_run_that_stopped_improving(smoke_config, seeded_storage, monkeypatch):
    scores = iter([0.9, 0.8, 0.7, 0.95, 0.99, 0.99])
    monkeypatch.setattr(model_trainer, "evaluate", lambda *arguments: {
        "validation_loss": 0.5, "validation_roc_auc": next(scores)})
    config = with_epochs(dataclasses.replace(
        smoke_config, trainer=dataclasses.replace(smoke_config.trainer, early_stopping_patience=2)), 6)
    artifact = model_trainer.run(config, prepared(config, seeded_storage), seeded_storage)
    assert artifact.stopped_early and artifact.epochs_run == 3
    assert artifact.best_epoch == 1 and artifact.best_validation_roc_auc == 0.9


def test_time_budget_stops_before_an_epoch_that_would_overrun_it(smoke_config, seeded_storage, monkeypatch):
    clock = iter(range(0, 10_000, 50))  # each call to the clock moves it 50 s on
    monkeypatch.setattr(model_trainer.time, "monotonic", lambda: float(next(clock)))
    config = with_epochs(dataclasses.replace(
        smoke_config, trainer=dataclasses.replace(smoke_config.trainer, max_minutes=4.0)), 10)
    artifact = model_trainer.run(config, prepared(config, seeded_storage), seeded_storage)
    assert artifact.stopped_early and 1 <= artifact.epochs_run < 10
    history = json.loads(Path(artifact.history_path).read_text())
    assert sum(record["seconds"] for record in history) <= 4 * 60


def test_loader_workers_are_none_on_cpu_and_leave_each_gpu_rank_a_core(monkeypatch):
    import torch

    monkeypatch.setattr(model_trainer, "usable_cores", lambda: 16)
    assert model_trainer.loader_workers(-1, torch.device("cpu")) == 0, "workers would take the model's cores"
    assert model_trainer.loader_workers(-1, torch.device("cuda")) == model_trainer.GPU_LOADER_WORKERS
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert model_trainer.loader_workers(-1, torch.device("cuda", 3)) == 3, "16 cores, 4 ranks: 3 workers and itself"
    monkeypatch.setattr(model_trainer, "usable_cores", lambda: 2)
    assert model_trainer.loader_workers(-1, torch.device("cuda")) == 1
    assert model_trainer.loader_workers(5, torch.device("cpu")) == 5, "an explicit count is kept"


def test_training_through_loader_processes_learns_and_records_its_speed(smoke_config, seeded_storage, caplog):
    config = dataclasses.replace(smoke_config, trainer=dataclasses.replace(smoke_config.trainer, loader_workers=2))
    caplog.set_level("INFO")
    artifact = model_trainer.run(config, prepared(config, seeded_storage), seeded_storage)
    history = json.loads(Path(artifact.history_path).read_text())
    assert "2 loader processes per rank" in caplog.text
    assert artifact.best_validation_roc_auc > 0.8, "augmented batches from worker processes must still teach"
    assert all(record["images_per_second"] > 0 for record in history)


def test_a_negative_loader_worker_count_other_than_automatic_is_refused(tmp_path):
    from xray.config import load_config

    path = tmp_path / "bad.yaml"
    path.write_text("trainer:\n  loader_workers: -2\n")
    with pytest.raises(ConfigError, match="loader_workers"):
        load_config(path)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 6, 9, 50])
def test_every_schedule_runs_through_a_run_of_few_batches(steps):
    import torch

    from xray.config import TrainerConfig

    for name in ("onecycle", "cosine", "constant"):
        parameter = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.AdamW([parameter], lr=0.001)
        scheduler = model_trainer.build_scheduler(optimizer, TrainerConfig(epochs=1, scheduler=name), steps)
        rates = []
        for _ in range(steps):  # one epoch of five batches used to divide by zero in OneCycleLR
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        assert 0 < max(rates) <= 0.001 and min(rates) >= 0, f"{name} over {steps} steps: {rates}"


def test_the_loader_processes_of_each_rank_draw_their_own_augmentations():
    import torch

    torch.manual_seed(1234)  # as torch seeds loader process k alike on every rank
    model_trainer.seed_loader_process(0, rank=0)
    rank_zero = torch.rand(4)
    torch.manual_seed(1234)
    model_trainer.seed_loader_process(0, rank=1)
    rank_one = torch.rand(4)
    torch.manual_seed(1234)
    assert torch.equal(rank_zero, torch.rand(4)), "rank 0 keeps torch's own seed: one process trains as before"
    assert not torch.equal(rank_zero, rank_one)


def test_a_normal_run_warms_up_over_its_first_fifth():
    import torch

    from xray.config import TrainerConfig

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=0.001)
    scheduler = model_trainer.build_scheduler(optimizer, TrainerConfig(epochs=2, scheduler="onecycle"), 25)
    rates = []
    for _ in range(50):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates.index(max(rates)) == 9, "the peak is at 0.2 x 50 - 1 steps, as before the 5-step fix"


def with_weight_average(config, decay=0.9):
    return dataclasses.replace(config, trainer=dataclasses.replace(config.trainer, weight_average_decay=decay))


def test_weight_averaging_ships_the_average_not_the_last_step(smoke_config, seeded_storage):
    import torch

    config = with_epochs(with_weight_average(smoke_config), 1)  # one epoch: the checkpoint's weights are the best
    artifact = model_trainer.run(config, prepared(config, seeded_storage), seeded_storage)
    assert artifact.best_validation_roc_auc > 0.8, "the averaged weights must still separate the blob"
    checkpoint = torch.load(artifact.checkpoint_path, weights_only=True)
    shipped = load_file(artifact.weights_path)
    averaged = {name.removeprefix("module."): value for name, value in checkpoint["averaged"].items()}
    name = next(name for name in shipped if name.endswith("weight"))
    assert torch.equal(shipped[name], averaged[name]), "the package holds the average"
    assert not torch.equal(shipped[name], checkpoint["model"][name]), "not the last step's weights"


def test_a_resumed_run_keeps_averaging_from_where_it_stopped(smoke_config, seeded_storage, monkeypatch):
    import torch

    config = with_epochs(with_weight_average(smoke_config), 2)
    transformation = prepared(config, seeded_storage)
    interrupt_in_epoch_two(config, transformation, seeded_storage, monkeypatch)
    steps_per_epoch = int(torch.load(Path(transformation.ingestion.run.run_dir) / "model_trainer/last_checkpoint.pt",
                                     weights_only=True)["averaged"]["n_averaged"])  # fmt: skip
    artifact = model_trainer.run(config, transformation, seeded_storage)
    checkpoint = torch.load(artifact.checkpoint_path, weights_only=True)
    assert steps_per_epoch > 0
    assert int(checkpoint["averaged"]["n_averaged"]) == 2 * steps_per_epoch, "the average was not started afresh"



@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "constant"])
def test_the_backbone_learns_at_its_share_of_the_head_rate_throughout(schedule):

    from xray.config import TrainerConfig
    from xray.model import build_model

    config = TrainerConfig(architecture="small_cnn", pretrained=False, epochs=1, scheduler=schedule,
                           backbone_learning_rate_scale=0.1)  # fmt: skip
    network = build_model("small_cnn")
    optimizer = model_trainer.build_optimizer(network, config)
    scheduler = model_trainer.build_scheduler(optimizer, config, 20)
    backbone, head = optimizer.param_groups
    assert [tuple(parameter.shape) for parameter in head["params"]] == [(1, 64), (1,)], "the head is the last layer"
    assert len(backbone["params"]) + 2 == len(list(network.parameters()))
    head_rates = []
    for _ in range(20):
        assert backbone["lr"] == pytest.approx(0.1 * head["lr"]), f"{schedule} lost the ratio"
        head_rates.append(head["lr"])
        optimizer.step()
        scheduler.step()
    assert max(head_rates) == pytest.approx(config.learning_rate, rel=0.01), "the head peaks at the learning rate"
