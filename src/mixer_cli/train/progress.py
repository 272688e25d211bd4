"""Progress as plain lines, for output that is not a terminal (a SLURM job's log, a pipe, a file).

A live progress bar redraws one line; written to a file it shows each finished epoch and nothing in
between, which for the ImageNet-21k recipes is hours of silence. `LineProgress` prints one line every
`every_steps` optimiser steps or `every_seconds` seconds, whichever comes first, and one per
validation, from rank 0 only (Lightning disables a progress bar on the other ranks):

    epoch 1/90  step 1,200/37,440  loss 5.1234  lr 9.80e-04  2,481 img/s  ETA 4:02:11
    validation at step 1,248: top1 31.25%  top5 55.10%  loss 3.9876
"""
from __future__ import annotations

import datetime as dt
import math
import time

import lightning as L
from lightning.pytorch.callbacks.progress import ProgressBar


def duration(seconds: float) -> str:
    return str(dt.timedelta(seconds=round(seconds)))


class LineProgress(ProgressBar):
    def __init__(self, every_steps: int, every_seconds: float, global_batch: int):
        super().__init__()
        self.every_steps, self.every_seconds, self.global_batch = every_steps, every_seconds, global_batch
        self.enabled = True
        self.start: tuple[int, float] | None = None  # (step, time) of the first step of this process's training
        self.last: tuple[int, float] | None = None  # (step, time) of the last line
        self.validation_start = 0.0

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step, now = trainer.global_step, time.perf_counter()
        if self.start is None:  # times from the end of the first step: start-up is not the training rate
            self.start = self.last = (step, now)
            return
        last_step, last_time = self.last
        total = trainer.estimated_stepping_batches
        crossed = step // self.every_steps > last_step // self.every_steps  # lines at 50, 100, ... as timm's
        due = crossed or now - last_time >= self.every_seconds or step >= total
        if self.enabled and due and step > last_step:
            self.print(self.step_line(trainer, step, total, now))
            self.last = (step, now)

    def step_line(self, trainer: L.Trainer, step: int, total: int | float, now: float) -> str:
        last_step, last_time = self.last
        rate = (step - last_step) * self.global_batch / max(now - last_time, 1e-9)
        seconds_per_step = (now - self.start[1]) / max(step - self.start[0], 1)
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        steps = f"/{int(total):,}" if math.isfinite(total) else ""
        parts = [f"epoch {trainer.current_epoch + 1}{epochs}", f"step {step:,}{steps}"]
        loss = trainer.progress_bar_metrics.get("train/loss")
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.2e}")
        parts.append(f"{rate:,.0f} img/s")
        if math.isfinite(total):
            parts.append(f"ETA {duration((total - step) * seconds_per_step)}")
        return "  ".join(parts)

    def on_validation_start(self, trainer: L.Trainer, pl_module) -> None:
        self.validation_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if self.last is not None:  # the next line's img/s counts training time only
            last_step, last_time = self.last
            self.last = (last_step, last_time + time.perf_counter() - self.validation_start)
        metrics = trainer.callback_metrics
        if not self.enabled or trainer.sanity_checking or "val/top1" not in metrics:
            return
        self.print(f"validation at step {trainer.global_step:,}: top1 {100 * float(metrics['val/top1']):.2f}%  "
                   f"top5 {100 * float(metrics['val/top5']):.2f}%  loss {float(metrics['val/loss']):.4f}")

    def print(self, *args, **kwargs) -> None:
        print(*args, **kwargs, flush=True)
