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

import inspect
from collections.abc import Callable
from functools import partial

import lightning as L
import torch
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.nn import functional as F
from torchmetrics import MeanMetric, Metric, SumMetric
from torchmetrics.classification import (
    MulticlassConfusionMatrix,
    MultilabelAccuracy,
    MultilabelF1Score,
    MultilabelPrecision,
    MultilabelRecall,
    MultilabelStatScores,
)

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

    def by_name(self) -> dict[str, Metric]:
        return {"loss": self.loss, "top1": self.top1, "top5": self.top5, "num_samples": self.num_samples}


# A confusion matrix is K x K counts on every rank and in every sync: 8 MB at 1,000 classes, 3.8 GB at
# ImageNet-21k's 21,843. Above this many classes it is not kept; the per-class vectors always are.
CONFUSION_MATRIX_MAX_CLASSES = 1000

# torchmetrics' per-class scores (average=None); 0/0 (a class never predicted, or with no images) is 0.
CLASS_SCORES = {"accuracy": MultilabelAccuracy, "precision": MultilabelPrecision, "recall": MultilabelRecall,
                "f1": MultilabelF1Score}


class ClassMetrics(nn.Module):
    """Per-class accuracy, precision, recall, F1 and counts over one split, and the confusion matrix of up to
    CONFUSION_MATRIX_MAX_CLASSES classes (rows: true class, columns: predicted).

    Labels (B,) predict one class per image, the arg-max; multi-hot rows (B, K) one yes/no per class,
    sigmoid(logit) > 0.5 (no confusion matrix: an image has no single true class). Both are counted as 0/1
    rows (B, K) by the Multilabel metrics: for one-hot rows their per-class counts are the Multiclass
    metrics', which would build a K x K histogram on every batch (3.8 GB at 21,843 classes)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.scores = nn.ModuleDict({name: score(num_classes, average=None) for name, score in CLASS_SCORES.items()})
        self.counts = MultilabelStatScores(num_classes, average=None)  # per class: tp, fp, tn, fn, support
        capped = num_classes > CONFUSION_MATRIX_MAX_CLASSES
        self.confusion = None if capped else MulticlassConfusionMatrix(num_classes)
        self.multi_hot = SumMetric()  # images with multi-hot rows: synced, so every rank knows the data's kind

    def update(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        if y.ndim == 1:
            predicted, truth = logits.argmax(dim=1), y.long()
            if self.confusion is not None:
                self.confusion.update(predicted, truth)
            predicted, truth = F.one_hot(predicted, self.num_classes), F.one_hot(truth, self.num_classes)
        else:
            predicted, truth = logits.float().sigmoid().gt(0.5).long(), y.gt(0).long()
        self.multi_hot.update(len(y) if y.ndim == 2 else 0)
        for metric in (*self.scores.values(), self.counts):
            metric.update(predicted, truth)

    def compute_and_reset(self) -> dict:
        """{"multi_label", "support", "predicted", "accuracy", "precision", "recall", "f1"}: per-class
        vectors on the CPU (accuracy: the recall for labels, (tp + tn) / images for multi-hot rows), and
        "confusion_matrix" (K, K), or None for multi-hot rows or above CONFUSION_MATRIX_MAX_CLASSES."""
        multi_label = bool(self.multi_hot.compute() > 0)
        tp, fp, _, _, support = self.counts.compute().unbind(dim=1)
        computed = {"multi_label": multi_label, "support": support, "predicted": tp + fp}
        computed |= {name: metric.compute() for name, metric in self.scores.items()}
        if not multi_label:  # one label per image: the share of a class's images given that class
            computed["accuracy"] = computed["recall"]
        keeps_matrix = self.confusion is not None and not multi_label
        computed["confusion_matrix"] = self.confusion.compute() if keeps_matrix else None
        for metric in (*self.scores.values(), self.counts, self.confusion, self.multi_hot):
            if metric is not None:
                metric.reset()
        return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in computed.items()}


class Evaluator(L.LightningModule):
    """A network and its evaluation: what `mixer eval` runs, and what the Classifier trains."""

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        loss: nn.Module | None = None,
        normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
        device_decode: tuple[Callable, Callable] | None = None,
        real_top1: Metric | None = None,
        test_splits: tuple[str, ...] = ("test",),
        per_class: bool = False,
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
        # Per-class metrics of the test loop's evaluation split (`mixer eval`; training's evaluations skip
        # them), read from `class_results` after the pass: torchmetrics' vectors do not go through self.log.
        self.class_metrics = ClassMetrics(num_classes) if per_class else None
        self.class_results: dict | None = None

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        x, y, *names = batch
        if isinstance(x, (list, tuple)):  # encoded: decode (nvJPEG on a GPU), crop, flip, RandAugment on the device
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
        if self.scores_per_class(split):
            self.class_metrics.update(logits, y)

    def on_validation_epoch_end(self):
        self.log_split("val")

    def on_test_epoch_end(self):
        for split in self.test_splits:
            self.log_split(split)

    def log_split(self, split: str) -> None:
        # torchmetrics objects, which Lightning computes at the epoch's end on every rank, summing their
        # states over the ranks, then resets: exact and unpadded evaluation lets a rank have fewer batches,
        # or none (fewer eval shards than ranks), and each must still join that sum.
        for name, metric in self.split_metrics[split].by_name().items():
            self.log(f"{split}/{name}", metric, prog_bar=name == "top1", add_dataloader_idx=False)
        if self.scores_real(split):
            self.log(f"{split}/real_top1", self.real_top1, add_dataloader_idx=False)  # NaN: no lists
            self.log(f"{split}/real_num_samples", self.real_top1.counted, add_dataloader_idx=False)
        if self.scores_per_class(split):
            self.class_results = self.class_metrics.compute_and_reset()

    def scores_per_class(self, split: str) -> bool:
        return self.class_metrics is not None and split == "test"

    def scores_real(self, split: str) -> bool:
        return self.real_top1 is not None and split in EVAL_SPLITS


def fused_on_cuda(factory: partial, device: torch.device) -> dict:
    """{"fused": True} for a torch optimiser with a fused kernel, on a CUDA device, unless the config
    sets it: one kernel updates every parameter, where the default launches several per tensor group;
    elsewhere torch's default, so CPU runs keep their numbers."""
    if device.type != "cuda" or "fused" in factory.keywords:
        return {}
    return {"fused": True} if "fused" in inspect.signature(factory.func).parameters else {}


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
            x, targets = self.mixup(x, targets, self.global_step)
        loss = self.loss(self(x), targets)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # the global batch's loss, as one process's
        return loss

    def configure_optimizers(self):
        # The config's weight decay on kernels only, not biases or LayerNorm scales: timm's groups, as
        # big_vision's `wd_mults` default does for the paper's models. The factory is Hydra's partial.
        weight_decay = self.optimizer_factory.keywords.get("weight_decay", 0.0)
        groups = param_groups_weight_decay(self.model, weight_decay)
        optimizer = self.optimizer_factory(groups, **fused_on_cuda(self.optimizer_factory, self.device))
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # What it takes to rebuild and feed the network without guessing (the Mixer's spec and preprocessing).
        checkpoint.update(checkpoint_record(self.model))
