"""Stage 3: train with an imbalance-aware loss, keep the best epoch by validation ROC-AUC.

Each epoch writes a resumable checkpoint (model, optimiser, scheduler, history, RNG
state); running the same run id again continues from it.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from xray import distributed
from xray.config import ConfigError, PipelineConfig, TrainerConfig
from xray.data import XrayDataset, build_augmentation, build_normal_blur, load_split
from xray.entity.artifacts import DataTransformationArtifact, ModelTrainerArtifact
from xray.inference import usable_cores
from xray.metrics import roc_auc
from xray.model import build_model, choose_device, predict_logits
from xray.preprocessing import Preprocessing
from xray.storage import Storage

logger = logging.getLogger(__name__)

STAGE = "model_trainer"
RESUME_FREE_SETTINGS = ("max_minutes", "threads", "device", "early_stopping_patience", "loader_workers")
# Augmenting processes per GPU when `trainer.loader_workers` is automatic (README, "Distributed training and GPUs").
GPU_LOADER_WORKERS = 8
Progress = Callable[[dict[str, Any]], None]


def resume_settings(config: PipelineConfig) -> dict[str, Any]:
    """The settings a checkpoint can only be resumed under (the rest may change between attempts)."""
    trainer = {key: value for key, value in asdict(config.trainer).items() if key not in RESUME_FREE_SETTINGS}
    return {"seed": config.seed, "trainer": trainer, "augmentation": asdict(config.transformation.augmentation)}


def resume_identity(config: PipelineConfig, inputs: DataTransformationArtifact) -> dict[str, Any]:
    """What a checkpoint records of its run: the data, the split, the image size, the preprocessing (intensity
    mapping, border mask, statistics) and the training settings."""
    transformation = config.transformation
    return {"data manifest hash": inputs.ingestion.manifest_sha256, "image size": transformation.image_size,
            "split fractions": [transformation.validation_fraction, transformation.test_fraction],
            "preprocessing": dict(inputs.preprocessing), "training config": resume_settings(config)}  # fmt: skip


def check_resumable(saved: dict[str, Any] | None, current: dict[str, Any], checkpoint_path: Path) -> None:
    """Refuse to resume a checkpoint whose data, split, image size or config differ, naming each difference.

    Resuming on other data or other splits could move patients the model trained on into the test split.
    """
    saved = saved or {}
    changed = [name for name, value in current.items() if saved.get(name) != value]
    if "training config" in changed and isinstance(saved.get("training config"), dict):
        before, after = flatten(saved["training config"]), flatten(current["training config"])
        keys = sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))
        changed[changed.index("training config")] = "config (" + ", ".join(keys) + ")"
    if changed:
        raise ConfigError(f"cannot resume from {checkpoint_path}: the {' and the '.join(changed)} changed since "
                          "it was written; resume with the same data and config, or omit --run-id")  # fmt: skip


def flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys, so a changed setting can be named."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch so a config and seed repeat their metrics."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(network: nn.Module, config: TrainerConfig) -> torch.optim.AdamW:
    """AdamW with two parameter groups: the head (the last linear layer) at the learning rate, the backbone at
    the learning rate times `backbone_learning_rate_scale`, so fine-tuning can keep more of pretrained features."""
    head = [module for module in network.modules() if isinstance(module, nn.Linear)][-1]
    head_ids = {id(parameter) for parameter in head.parameters()}
    backbone = [parameter for parameter in network.parameters() if id(parameter) not in head_ids]
    rate = config.learning_rate
    return torch.optim.AdamW([{"params": backbone, "lr": rate * config.backbone_learning_rate_scale},
                              {"params": list(head.parameters()), "lr": rate}], weight_decay=config.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainerConfig, steps_per_epoch: int):
    """A per-step learning-rate schedule over the whole planned run, keeping each group's share of the rate."""
    total = max(1, config.epochs * steps_per_epoch)
    if config.scheduler == "onecycle":
        # A fifth of the run warms up; OneCycleLR divides by that phase's length less one step, zero at 5 steps.
        warm_up = 0.2 if 0.2 * total != 1 else 0.3
        peaks = [group["lr"] for group in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=total,
                                                   pct_start=warm_up)  # fmt: skip
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def mixed_precision(device: torch.device) -> torch.dtype | None:
    """The autocast type on this device: bfloat16 on a GPU that supports it, float16 on an older GPU, none on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def loader_workers(requested: int, device: torch.device) -> int:
    """DataLoader processes for this rank: `requested`, or when automatic (-1) none on CPU, where they would take
    cores from the model's own threads, and on CUDA one fewer than the rank's share of the cores, from 1 (the rank
    mostly waits on its GPU) to GPU_LOADER_WORKERS."""
    if requested >= 0:
        return requested
    if device.type != "cuda":
        return 0
    cores_per_rank = usable_cores() // distributed.local_world_size()
    return max(1, min(GPU_LOADER_WORKERS, cores_per_rank - 1))


def seed_loader_process(worker_id: int, rank: int) -> None:
    """Give this rank's loader processes their own augmentations: torch seeds worker k alike on every rank."""
    torch.manual_seed((torch.initial_seed() + 1_000_003 * rank) % 2**63)


def average_weights(network: nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of `network`'s weights and batch-norm statistics, or None when off (decay 0).

    The average is what validation scores and what ships: it settles in a flatter region of the loss than
    the last step's weights, which tends to hold up better on data unlike the training set.
    """
    if not decay:
        return None
    return AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def train_one_epoch(model, loader, criterion, optimizer, scheduler, device, channels_last,
                    scaler: torch.amp.GradScaler | None, averaged: AveragedModel | None,
                    epoch: int) -> tuple[float, int]:  # fmt: skip
    """One pass over this rank's share of the training split, updating `averaged` after every step; returns the
    summed loss and the image count."""
    model.train()
    total, count = 0.0, 0
    precision = mixed_precision(device)
    quiet = None if distributed.is_main() else True  # None: a bar only on a terminal; one rank draws it
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=quiet, unit="batch")
    for images, labels in bar:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=precision, enabled=precision is not None):
            loss = criterion(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        if averaged is not None:
            averaged.update_parameters(model.module if isinstance(model, DistributedDataParallel) else model)
        total += loss.item() * len(labels)
        count += len(labels)
        bar.set_postfix(loss=f"{total / count:.4f}")
    return total, count


def evaluate(model, dataset: XrayDataset, batch_size: int, criterion, device, channels_last) -> dict[str, float]:
    """Validation loss and ROC-AUC over the whole split: each rank scores every world_size-th image, then all
    ranks gather every prediction, so the figures are those of one process."""
    share = list(range(distributed.rank(), len(dataset), distributed.world_size()))
    loader = DataLoader(Subset(dataset, share), batch_size=batch_size, pin_memory=device.type == "cuda")
    precision = mixed_precision(device)
    with torch.autocast(device.type, dtype=precision, enabled=precision is not None):
        logits = predict_logits(model, loader, device, channels_last)
    gathered = distributed.gather((share, logits.numpy()))
    merged = torch.empty(len(dataset))
    for indices, values in gathered:
        merged[indices] = torch.from_numpy(values).float()
    labels = dataset.labels
    return {
        "validation_loss": float(criterion(merged.to(device), labels.to(device)).item()),
        "validation_roc_auc": roc_auc(labels.numpy(), torch.sigmoid(merged).numpy()),
        "validation_count": len(dataset),
    }


def save_weights(model: nn.Module, path: Path) -> None:
    """Write the model's weights as safetensors, atomically."""
    temporary = path.with_suffix(".partial")
    save_file({name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()},
              str(temporary))  # fmt: skip
    temporary.replace(path)


def run(
    config: PipelineConfig,
    inputs: DataTransformationArtifact,
    storage: Storage,
    *,
    progress: Progress | None = None,
) -> ModelTrainerArtifact:
    """Train, checkpoint every epoch, and keep the weights of the best validation epoch."""
    trainer = config.trainer
    stage_dir = Path(inputs.ingestion.run.run_dir) / STAGE
    main = distributed.is_main()
    if main:
        stage_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed + distributed.rank())  # each rank its own augmentations; DDP syncs the weights
    if trainer.threads:
        torch.set_num_threads(trainer.threads)
    device = distributed.device_for(choose_device(trainer.device))
    channels_last = trainer.channels_last and device.type in ("cpu", "cuda")
    preprocessing = Preprocessing.from_dict(inputs.preprocessing)

    train_images, train_labels, _ = load_split(inputs, "train")
    validation_images, validation_labels, _ = load_split(inputs, "validation")
    augmentation = build_augmentation(config.transformation.augmentation)
    generator = torch.Generator().manual_seed(config.seed)
    train_dataset = XrayDataset(train_images, train_labels, preprocessing, augmentation,
                                build_normal_blur(config.transformation.augmentation))  # fmt: skip
    sampler = None
    if distributed.is_distributed():
        sampler = DistributedSampler(train_dataset, distributed.world_size(), distributed.rank(), seed=config.seed)
    workers = loader_workers(trainer.loader_workers, device)
    seed_workers = functools.partial(seed_loader_process, rank=distributed.rank())
    train_loader = DataLoader(train_dataset, batch_size=trainer.batch_size, shuffle=sampler is None,
                              sampler=sampler, generator=generator, drop_last=False, num_workers=workers,
                              persistent_workers=workers > 0, pin_memory=device.type == "cuda",
                              worker_init_fn=seed_workers)  # fmt: skip
    validation_dataset = XrayDataset(validation_images, validation_labels, preprocessing)

    network = build_model(trainer.architecture, trainer.pretrained, preprocessing.input_channels).to(device)
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
    model = DistributedDataParallel(network) if distributed.is_distributed() else network
    averaged = average_weights(network, trainer.weight_average_decay)
    shipped = averaged.module if averaged is not None else network  # what validation scores and the package holds
    positives = float(train_labels.sum())
    pos_weight = torch.tensor((len(train_labels) - positives) / max(positives, 1.0), device=device)
    criterion = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    optimizer = build_optimizer(network, trainer)
    scheduler = build_scheduler(optimizer, trainer, len(train_loader))
    scaler = torch.amp.GradScaler("cuda") if mixed_precision(device) == torch.float16 else None

    checkpoint_path = stage_dir / "last_checkpoint.pt"
    weights_path = stage_dir / "best_model.safetensors"
    history: list[dict[str, float]] = []
    best_auc, best_epoch, start_epoch, stale = -math.inf, 0, 1, 0
    if checkpoint_path.is_file():
        checkpoint = torch.load(checkpoint_path, map_location=device, weights_only=True)
        check_resumable(checkpoint.get("identity"), resume_identity(config, inputs), checkpoint_path)
        network.load_state_dict(checkpoint["model"])
        if averaged is not None:
            averaged.load_state_dict(checkpoint["averaged"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        generator.set_state(checkpoint["generator"])
        history = checkpoint["history"]
        best_auc, best_epoch, stale = checkpoint["best_auc"], checkpoint["best_epoch"], checkpoint["stale"]
        start_epoch = checkpoint["epoch"] + 1
        if main:
            torch.set_rng_state(checkpoint["torch_rng"])
        else:  # the checkpoint holds rank 0's random state: the others draw afresh, still each their own
            torch.manual_seed(config.seed + distributed.rank() + 1000 * start_epoch)
        logger.info("resuming from %s at epoch %d", checkpoint_path, start_epoch)

    processes = ""
    if sampler is not None:
        processes = f"; {distributed.world_size()} processes, {len(sampler)} images each per epoch"
    logger.info("training on %s%s, %d loader process%s per rank%s", device,
                f" ({torch.cuda.get_device_name(device)}, {mixed_precision(device)})" if device.type == "cuda" else "",
                workers, "" if workers == 1 else "es", processes)  # fmt: skip
    started = time.monotonic()
    stopped_early = False
    for epoch in range(start_epoch, trainer.epochs + 1):
        if stale >= trainer.early_stopping_patience:
            stopped_early = True
            break
        last_epoch = history[-1]["seconds"] if history else 0.0
        out_of_time = trainer.max_minutes and time.monotonic() - started + last_epoch > trainer.max_minutes * 60
        if distributed.agree(out_of_time):
            logger.info("stopping: another epoch would overrun the %.1f-minute training budget", trainer.max_minutes)
            stopped_early = True
            break
        if sampler is not None:
            sampler.set_epoch(epoch)
        epoch_start = time.monotonic()
        loss_sum, count = train_one_epoch(model, train_loader, criterion, optimizer, scheduler, device, channels_last,
                                          scaler, averaged, epoch)  # fmt: skip
        train_seconds = time.monotonic() - epoch_start
        shares = distributed.gather((loss_sum, count))
        images = sum(share[1] for share in shares)
        train_loss = sum(share[0] for share in shares) / max(images, 1)
        scores = evaluate(shipped, validation_dataset, config.evaluation.batch_size, criterion, device, channels_last)
        record = {"epoch": epoch, "train_loss": train_loss, **scores, "learning_rate": optimizer.param_groups[-1]["lr"],
                  "seconds": time.monotonic() - epoch_start, "images_per_second": images / max(train_seconds, 1e-9),
                  "processes": distributed.world_size()}  # fmt: skip
        history.append(record)
        improved = scores["validation_roc_auc"] > best_auc
        if improved:
            best_auc, best_epoch, stale = scores["validation_roc_auc"], epoch, 0
            if main:
                save_weights(shipped, weights_path)
        else:
            stale += 1
        logger.info(
            "epoch %d/%d: train loss %.4f, validation loss %.4f, validation ROC-AUC %.4f%s (%.0f s, %.0f images/s)",
            epoch, trainer.epochs, train_loss, scores["validation_loss"], scores["validation_roc_auc"],
            " (best)" if improved else "", record["seconds"], record["images_per_second"],
        )  # fmt: skip
        if main:
            torch.save({"model": network.state_dict(), "optimizer": optimizer.state_dict(),
                        "averaged": averaged.state_dict() if averaged is not None else None,
                        "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                        "torch_rng": torch.get_rng_state(), "history": history, "best_auc": best_auc,
                        "best_epoch": best_epoch, "stale": stale, "epoch": epoch,
                        "identity": resume_identity(config, inputs)},
                       checkpoint_path.with_suffix(".partial"))  # fmt: skip
            checkpoint_path.with_suffix(".partial").replace(checkpoint_path)
        if progress:
            progress({"stage": STAGE, "epoch": epoch, "epochs": trainer.epochs, **record})

    history_path = stage_dir / "history.json"
    distributed.barrier()  # rank 0's last files are written before anyone reads or leaves
    if main and not weights_path.is_file():
        raise RuntimeError("training produced no checkpoint: the validation ROC-AUC was never computed")
    if main:
        history_path.write_text(json.dumps(history, indent=2))
    artifact = ModelTrainerArtifact(
        transformation=inputs,
        architecture=trainer.architecture,
        weights_path=str(weights_path),
        checkpoint_path=str(checkpoint_path),
        history_path=str(history_path),
        best_epoch=best_epoch,
        best_validation_roc_auc=float(best_auc),
        epochs_run=len(history),
        stopped_early=stopped_early,
        device=str(device),
        seconds=round(sum(record["seconds"] for record in history), 2),
    )
    if main:
        artifact.save(stage_dir)
    return artifact
