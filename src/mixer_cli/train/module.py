"""The LightningModules: an `Evaluator` (a network and its metrics), and the `Classifier` that also
trains it with the loss, mixup and optimiser factories it receives.

They never read the config tree; `train/fit.py` builds every piece and hands them over, as in
lightning-hydra-template (the ReaL metric too, with its labels: evaluation batches then carry each
image's number or key after image and label). The network is any image classifier (a Mixer, or the
ResNet of the shuffle experiment).

Splits are Lightning's loops, not a switch on the module: the validation loop reads the data's
evaluation split during training (`val/...`); the test loop reads the splits of `test_splits`, one
dataloader each, in the DataModule's order (`test/...` for the evaluation split, `dev/...` for the
one held out of training).
"""
from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from timm.optim import param_groups_weight_decay
from torch import nn
from torchmetrics import MeanMetric, Metric, SumMetric

from mixer_cli.models.contract import checkpoint_record
from mixer_cli.train.losses import target_rows
from mixer_cli.train.mixup import BatchMixup


def top_k_hits(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """1.0 where one of the k highest logits is a true class: the label (B,), or any class of a
    multi-hot row (B, K) (precision@1 for multi-label data); else 0.0."""
    top = logits.topk(k, dim=1).indices
    if targets.ndim == 1:
        return (top == targets[:, None]).any(dim=1).float()
    return targets.gather(1, top).gt(0).any(dim=1).float()


# The data's evaluation split, read during training (validation loop) and at the end (test loop):
# the splits ReaL labels belong to. The dev split is held out of the training images.
EVAL_SPLITS = ("val", "test")


class SplitMetrics(nn.Module):
    """top-1, top-5, loss and sample count over one split, averaged over samples (not batches)."""

    def __init__(self):
        super().__init__()
        self.top1, self.top5, self.loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.num_samples = SumMetric()  # equals the split's size: nothing dropped or counted twice

    def update(self, logits: torch.Tensor, y: torch.Tensor, loss: torch.Tensor, top5_k: int) -> None:
        self.top1.update(top_k_hits(logits, y, 1))
        self.top5.update(top_k_hits(logits, y, top5_k))
        self.loss.update(loss, weight=len(y))
        self.num_samples.update(len(y))

    def compute_and_reset(self) -> dict[str, torch.Tensor]:
        values = {"loss": self.loss, "top1": self.top1, "top5": self.top5, "num_samples": self.num_samples}
        computed = {name: metric.compute() for name, metric in values.items()}
        for metric in values.values():
            metric.reset()
        return computed


class Evaluator(L.LightningModule):
    """A network and its evaluation: what `mixer eval` runs, and what the Classifier trains."""

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        loss: nn.Module | None = None,
        normalize: nn.Module | None = None,
        device_decode: tuple[Callable, Callable] | None = None,
        real_top1: Metric | None = None,
        test_splits: tuple[str, ...] = ("test",),
    ):
        super().__init__()
        self.model = model
        self.loss = loss if loss is not None else nn.CrossEntropyLoss()
        self.num_classes = num_classes
        self.normalize = normalize  # uint8 batches (data.decode=uint8|gpu) become floats on the device
        self.device_decode = device_decode  # (train, eval) transforms for encoded batches (data.decode=gpu)
        self.real_top1 = real_top1  # RealTop1 of the eval split's images (evaluate/real_labels.py), or None
        self.test_splits = tuple(test_splits)
        self.split_metrics = nn.ModuleDict({split: SplitMetrics() for split in ("val", *self.test_splits)})

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

    def validation_step(self, batch, batch_idx):
        self.evaluate_batch("val", batch)

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self.evaluate_batch(self.test_splits[dataloader_idx], batch)

    def evaluate_batch(self, split: str, batch) -> None:
        x, y, *names = batch
        logits = self(x)
        if self.scores_real(split) and names:
            self.real_top1.update(logits, names[0])
        self.split_metrics[split].update(logits, y, self.loss(logits, y), min(5, self.num_classes))

    def on_validation_epoch_end(self):
        self.log_split("val")

    def on_test_epoch_end(self):
        for split in self.test_splits:
            self.log_split(split)

    def log_split(self, split: str) -> None:
        # Computed here on every rank, not logged per step: evaluation is exact and unpadded, so a rank
        # may have had fewer batches, or none (fewer eval shards than ranks), and must still join the sync.
        for name, value in self.split_metrics[split].compute_and_reset().items():
            self.log(f"{split}/{name}", value, prog_bar=name == "top1", add_dataloader_idx=False)
        if self.scores_real(split):
            self.log(f"{split}/real_top1", self.real_top1.compute(), add_dataloader_idx=False)  # NaN: no lists
            self.log(f"{split}/real_num_samples", float(self.real_top1.num_counted()), add_dataloader_idx=False)
            self.real_top1.reset()

    def scores_real(self, split: str) -> bool:
        return self.real_top1 is not None and split in EVAL_SPLITS


class Classifier(Evaluator):
    """The Evaluator, trained: mixup, the loss, and the optimiser and schedule from their factories."""

    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler],
        num_classes: int,
        mixup: BatchMixup | None = None,
        **evaluation,
    ):
        super().__init__(model, num_classes, loss=loss, **evaluation)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.mixup = mixup

    def training_step(self, batch, batch_idx):
        x, y = batch
        targets = target_rows(y, self.num_classes) if self.mixup is not None else y
        if self.mixup is not None:
            x, targets = self.mixup(x, targets)
        loss = self.loss(self(x), targets)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        # The config's weight decay on kernels only, not biases or LayerNorm scales: timm's groups, as
        # big_vision's `wd_mults` default does for the paper's models. The factory is Hydra's partial.
        weight_decay = self.optimizer_factory.keywords.get("weight_decay", 0.0)
        optimizer = self.optimizer_factory(param_groups_weight_decay(self.model, weight_decay))
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # What it takes to rebuild and feed the network without guessing (the Mixer's spec and preprocessing).
        checkpoint.update(checkpoint_record(self.model))
