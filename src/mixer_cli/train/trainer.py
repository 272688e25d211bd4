"""The Lightning Trainer with the toolkit's callbacks, logs and crash-safe checkpoints."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig

from mixer_cli.train.batching import BatchPlan, plan_batches


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file, then rename: a crash or kill mid-write never leaves a torn
    checkpoint, and the previous last.ckpt stays readable until the new one is complete."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)


def quiet_lightning() -> None:
    # The demo's in-memory data needs no loader workers; Lightning's advice says otherwise.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*is smaller than the logging interval.*")


def build_trainer(cfg: DictConfig, run_dir: Path, progress: bool = True) -> tuple[L.Trainer, BatchPlan]:
    """A Trainer logging and checkpointing into run_dir, and how the global batch is split."""
    quiet_lightning()
    t = cfg.trainer
    callbacks = [
        ModelCheckpoint(dirpath=run_dir, filename="best", monitor="val/acc1", mode="max", save_last=True),
        LearningRateMonitor(logging_interval="step"),
    ]
    if progress:
        callbacks.append(RichProgressBar(leave=True))
    trainer = L.Trainer(
        default_root_dir=run_dir,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        max_epochs=-1 if t.steps else t.epochs,
        max_steps=t.steps or -1,
        gradient_clip_val=t.grad_clip,
        gradient_clip_algorithm="norm",
        check_val_every_n_epoch=t.val_every_epochs,
        log_every_n_steps=t.log_every_steps,
        logger=CSVLogger(run_dir, name="", version=""),
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=progress,
        enable_model_summary=False,
    )
    plan = plan_batches(cfg.data.global_batch, trainer.world_size, t.device_batch)
    trainer.accumulate_grad_batches = plan.accumulate
    return trainer, plan
