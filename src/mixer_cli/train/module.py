"""The LightningModule: a classifier that receives its network, loss, mixup and optimiser factories.

It never reads the config tree; `train/fit.py` builds every piece and hands them over, as in
lightning-hydra-template (the ReaL metric too, with its labels: evaluation batches then carry each
image's number or key after image and label). The network is any image classifier (a Mixer, or the
ResNet of the shuffle experiment).
"""
from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric, Metric, SumMetric

from mixer_cli.train.losses import target_rows
from mixer_cli.train.mixup import BatchMixup
from mixer_cli.train.optim import param_groups


def top_k_hits(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """1.0 where one of the k highest logits is a true class: the label (B,), or any class of a
    multi-hot row (B, K) (precision@1 for multi-label data); else 0.0."""
    top = logits.topk(k, dim=1).indices
    if targets.ndim == 1:
        return (top == targets[:, None]).any(dim=1).float()
    return targets.gather(1, top).gt(0).any(dim=1).float()


class Classifier(L.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler],
        num_classes: int,
        mixup: BatchMixup | None = None,
        checkpoint_extras: Callable[[], dict] | None = None,
        normalize: nn.Module | None = None,
        device_decode: tuple[Callable, Callable] | None = None,
        real_top1: Metric | None = None,
    ):
        super().__init__()
        self.model = model
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.num_classes = num_classes
        self.mixup = mixup
        self.checkpoint_extras = checkpoint_extras
        self.normalize = normalize  # uint8 batches (data.decode=uint8|gpu) become floats on the device
        self.device_decode = device_decode  # (train, eval) transforms for encoded batches (data.decode=gpu)
        self.val_top1 = MeanMetric()
        self.val_top5 = MeanMetric()
        self.val_loss = MeanMetric()
        self.val_num_samples = SumMetric()  # equals the split's size: nothing dropped or counted twice
        self.val_real_top1 = real_top1  # RealTop1 of the eval split's images (evaluate/real_labels.py), or None
        self.validated_at_step = -1
        self.eval_split = "val"  # the prefix of the evaluation metrics: "dev" while the dev split is read

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        x, y, *names = batch
        if isinstance(x, (list, tuple)):  # encoded images: decode (nvJPEG on a GPU), crop and flip on the device
            from mixer_cli.data.device_transforms import decode_on_device, encoded

            transform = self.device_decode[0 if self.trainer.training else 1]
            x = decode_on_device([encoded(b) if isinstance(b, bytes) else b for b in x], transform, self.device)
        return x, y, *names

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y, *names = batch
        if x.dtype == torch.uint8:  # one batched conversion and normalisation instead of one per image on the CPU
            x = self.normalize(x)
        return x, y, *names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        targets = target_rows(y, self.num_classes) if self.mixup is not None else y
        if self.mixup is not None:
            x, targets = self.mixup(x, targets)
        loss = self.loss(self(x), targets)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y, *names = batch
        logits = self(x)
        if self.real_top1_wanted() and names:  # the dev split (train images) has no ReaL labels
            self.val_real_top1.update(logits, names[0])
        self.val_top1.update(top_k_hits(logits, y, 1))
        self.val_top5.update(top_k_hits(logits, y, min(5, self.num_classes)))
        self.val_loss.update(self.loss(logits, y), weight=len(y))
        self.val_num_samples.update(len(y))

    def on_validation_epoch_end(self):
        # Computed here on every rank, not logged per step: evaluation is exact and unpadded, so a rank
        # may have had fewer batches, or none (fewer eval shards than ranks), and must still join the sync.
        metrics = {"loss": self.val_loss, "top1": self.val_top1, "top5": self.val_top5,
                   "num_samples": self.val_num_samples}
        for name, metric in metrics.items():
            self.log(f"{self.eval_split}/{name}", metric.compute(), prog_bar=name == "top1")
            metric.reset()
        if self.real_top1_wanted():
            real = self.val_real_top1
            self.log("val/real_top1", real.compute())  # NaN if every image's list was empty
            self.log("val/real_num_samples", float(real.num_counted()))
            real.reset()
        if self.eval_split == "val":
            self.validated_at_step = self.global_step

    def real_top1_wanted(self) -> bool:
        return self.val_real_top1 is not None and self.eval_split == "val"

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(param_groups(self.model))
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # What it takes to rebuild and feed the network without guessing (the Mixer's spec and preprocessing).
        if self.checkpoint_extras is not None:
            checkpoint.update(self.checkpoint_extras())
