"""The Lightning Trainer with the toolkit's callbacks, logs and crash-safe checkpoints."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig

from mixer_cli.train.batching import BatchPlan, plan_batches


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
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropTips())
    # Device lines ("GPU available: ...") would precede a one-line error; the summary names the devices.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)


def keep_metrics_on_resume(logger: CSVLogger) -> None:
    """Lightning's CSV logger deletes an existing metrics.csv when it starts; a resumed run must
    append to it instead, so the curves cover the whole run."""
    path = Path(logger.log_dir) / "metrics.csv"
    if not path.is_file():
        return
    rows = path.read_text()
    writer = logger.experiment  # creating the writer removes the file
    path.write_text(rows)
    writer.metrics_keys = rows.splitlines()[0].split(",")


def build_strategy(name: str):
    """Lightning's strategy by name; FSDP wraps (and so shards) each Mixer block on its own."""
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        from mixer_cli.models.mixer import MixerBlock

        return FSDPStrategy(auto_wrap_policy={MixerBlock})
    return name


def build_trainer(
    cfg: DictConfig, run_dir: Path, progress: bool = True, resume: bool = False
) -> tuple[L.Trainer, BatchPlan]:
    """A Trainer logging and checkpointing into run_dir, and how the global batch is split."""
    quiet_lightning()
    t = cfg.trainer
    logger = CSVLogger(run_dir, name="", version="")
    if resume:
        keep_metrics_on_resume(logger)
    callbacks = [
        ModelCheckpoint(dirpath=run_dir, filename="best", monitor="val/acc1", mode="max"),
        # Not save_last=True: Lightning 2.6 refreshes that copy only when val/acc1 improves, so last.ckpt
        # (what --resume continues from) could be epochs old. An unmonitored checkpoint is always the latest.
        ModelCheckpoint(dirpath=run_dir, filename="last", enable_version_counter=False),
        LearningRateMonitor(logging_interval="step"),
    ]
    if progress:
        callbacks.append(RichProgressBar(leave=True))
    if cfg.get("fewshot") and cfg.fewshot.get("every_n_steps"):  # Figure 4's curves: few-shot accuracy over steps
        from mixer_cli.evaluate.transfer import fewshot_callback

        callbacks.append(fewshot_callback(cfg))
    trainer = L.Trainer(
        default_root_dir=run_dir,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_strategy(t.strategy),
        precision=t.precision,
        max_epochs=-1 if t.steps else t.epochs,
        max_steps=t.steps or -1,
        gradient_clip_val=t.grad_clip,
        gradient_clip_algorithm="norm",
        check_val_every_n_epoch=t.val_every_epochs,
        log_every_n_steps=t.log_every_steps,
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=progress,
        enable_model_summary=False,
    )
    plan = plan_batches(cfg.data.global_batch, trainer.world_size, t.device_batch)
    trainer.accumulate_grad_batches = plan.accumulate
    return trainer, plan
