"""The Lightning Trainer with the run's callbacks and loggers (config groups `callbacks`, `logger`)."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ProgressBar, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger
from omegaconf import DictConfig

from mixer_cli.core.console import console
from mixer_cli.train.batching import BatchPlan
from mixer_cli.train.progress import LineProgress


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


def quiet_lightning() -> None:
    """Silence advice that does not apply to our runs, so the warnings that remain matter."""
    # The demo's in-memory data needs no loader workers.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*is smaller than the logging interval.*")
    # Our run directory already holds config.yaml when the logger and checkpointer start.
    warnings.filterwarnings("ignore", ".*exists and is not empty.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*is deprecated.*")
    # The Classifier's batch hooks (device-side decoding) are meant to apply whatever DataModule feeds it.
    warnings.filterwarnings("ignore", ".*overridden `on_(before|after)_batch_transfer`.*")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropTips())
    # Device lines ("GPU available: ...") would precede a one-line error; the summary names the devices.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)


def keep_metrics_on_resume(logger: CSVLogger) -> None:
    """Lightning's CSV logger (2.6) deletes an existing metrics.csv when it starts; a resumed run must
    append to it instead, so the curves cover the whole run (tests/test_cli.py resumes one)."""
    path = Path(logger.log_dir) / "metrics.csv"
    if not path.is_file():
        return
    rows = path.read_text()
    writer = logger.experiment  # creating the writer removes the file
    path.write_text(rows)
    writer.metrics_keys = rows.splitlines()[0].split(",")


def build_callbacks(cfg: DictConfig, run_dir: Path) -> list[Callback]:
    """The `callbacks` group's objects; those that write files (checkpoints) write into run_dir."""
    return [instantiate(c, **({"dirpath": run_dir} if "dirpath" in c else {})) for c in cfg.values() if c]


def build_loggers(cfg: DictConfig, run_dir: Path, resume: bool) -> list[Logger]:
    loggers = [instantiate(c, save_dir=run_dir) for c in cfg.values() if c]
    for logger in loggers:
        if resume and isinstance(logger, CSVLogger):
            keep_metrics_on_resume(logger)
    return loggers


def progress_bar(t: DictConfig, plan: BatchPlan) -> ProgressBar:
    """A live bar on a terminal; elsewhere (a cluster job's log) a plain line every
    trainer.progress_every_steps steps or trainer.progress_every_seconds seconds."""
    if console.is_terminal:
        return RichProgressBar(leave=True)
    return LineProgress(t.progress_every_steps, t.progress_every_seconds, plan.global_batch)


def build_strategy(t: DictConfig):
    """trainer.strategy: a Lightning name as it is, or the object its _target_ config builds (trainer=fsdp)."""
    return instantiate(t.strategy) if isinstance(t.strategy, DictConfig) else t.strategy


def build_trainer(
    t: DictConfig, run_dir: Path, plan: BatchPlan, callbacks: list[Callback], loggers: list[Logger], progress: bool,
    micro_batches_per_epoch: int | None = None,
) -> L.Trainer:
    """A Trainer from the `trainer` group, with the batch plan's gradient accumulation. An epoch is
    `micro_batches_per_epoch` micro-batches, a whole number of optimiser steps: Lightning would
    otherwise step once more on the epoch's leftover micro-batches, past the schedule's end."""
    quiet_lightning()
    strategy = build_strategy(t)
    if progress:
        callbacks = [*callbacks, progress_bar(t, plan)]
    return L.Trainer(
        default_root_dir=run_dir,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        precision=t.precision,
        max_epochs=-1 if t.steps else t.epochs,
        max_steps=t.steps or -1,
        accumulate_grad_batches=plan.accumulate,
        limit_train_batches=micro_batches_per_epoch,
        use_distributed_sampler=False,  # the DataModule's samplers split the data over the ranks
        gradient_clip_val=t.grad_clip,
        gradient_clip_algorithm="norm",
        check_val_every_n_epoch=t.val_every_epochs,
        log_every_n_steps=t.log_every_steps,
        logger=loggers,
        callbacks=callbacks,
        enable_progress_bar=progress,
        enable_model_summary=False,
    )
