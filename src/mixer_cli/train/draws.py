"""What the training step draws (dropout, stochastic depth), seeded by (seed, step, micro-batch), so a
micro-batch is trained the same way whichever rank and accumulation slot takes it (data/order.py
places micro-batch j = rank * accumulate + slot of every global batch)."""
from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from mixer_cli.data.order import derived_seed


class SeededMicroBatches(Callback):
    def __init__(self, seed: int):
        self.seed = seed

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        accumulate = trainer.accumulate_grad_batches
        micro_batch = trainer.global_rank * accumulate + batch_idx % accumulate
        torch.manual_seed(derived_seed(self.seed, "step", trainer.global_step, micro_batch))
