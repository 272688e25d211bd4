"""The LightningModule: a Mixer, its loss, metrics, optimiser and schedule."""
from __future__ import annotations

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch.nn import functional as F
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.classification import MulticlassAccuracy

from mixer_cli.models.mixer import Mixer, spec_for
from mixer_cli.train.optim import build_optimizer, build_scheduler


def model_from_config(cfg: DictConfig) -> Mixer:
    m = cfg.model
    spec = spec_for(
        m.variant,
        num_classes=cfg.data.num_classes,
        img_size=cfg.data.img_size,
        in_chans=cfg.data.channels,
        patch_size=m.patch_size,
        hidden_dim=m.hidden_dim,
        num_blocks=m.num_blocks,
        tokens_mlp_dim=m.tokens_mlp_dim,
        channels_mlp_dim=m.channels_mlp_dim,
        gelu=m.gelu,
        dropout=m.dropout,
        drop_path=m.drop_path,
        head_bias=m.head_bias,
    )
    model = Mixer(spec)
    model.set_grad_checkpointing(m.grad_checkpointing)
    return model


def preprocessing(cfg: DictConfig) -> dict:
    """What a checkpoint's user must do to an image before the model sees it."""
    d = cfg.data
    return {
        "img_size": d.img_size,
        "channels": d.channels,
        "mean": list(d.mean),
        "std": list(d.std),
        "interpolation": d.interpolation,
        "eval_crop": cfg.aug.get("eval_crop", "none"),
        "eval_resize": cfg.aug.get("eval_resize"),
    }


def mixup_from_config(aug: DictConfig, num_classes: int) -> Mixup | None:
    """timm's batch mixup with Beta(p, p) weights, p = aug.mixup (Appendix B); None when p = 0."""
    if not aug.get("mixup"):
        return None
    return Mixup(
        mixup_alpha=aug.mixup, cutmix_alpha=0.0, prob=1.0, mode="batch", label_smoothing=0.0, num_classes=num_classes
    )


class MixerClassifier(L.LightningModule):
    def __init__(self, config: dict, total_steps: int, model: Mixer | None = None):
        super().__init__()
        self.save_hyperparameters({"config": config, "total_steps": total_steps}, logger=False)
        self.cfg = OmegaConf.create(config)
        self.total_steps = total_steps
        self.model = model if model is not None else model_from_config(self.cfg)
        n = self.cfg.data.num_classes  # the model may be a ResNet (shuffle experiment): no Mixer spec
        self.val_acc1 = MulticlassAccuracy(n, top_k=1, average="micro")
        self.val_acc5 = MulticlassAccuracy(n, top_k=min(5, n), average="micro")
        self.val_loss = MeanMetric()
        self.val_samples = SumMetric()  # equals the split's size: nothing dropped or counted twice
        self.mixup = mixup_from_config(self.cfg.aug, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.mixup is not None:
            x, soft = self.mixup(x, y)
            loss = SoftTargetCrossEntropy()(self(x), soft)
        else:
            loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.val_acc1.update(logits, y)
        self.val_acc5.update(logits, y)
        self.val_loss.update(F.cross_entropy(logits, y), weight=len(y))
        self.val_samples.update(len(y))

    def on_validation_epoch_end(self):
        # Computed here on every rank, not logged per step: evaluation is exact and unpadded, so a rank
        # may have had fewer batches, or none (fewer eval shards than ranks), and must still join the sync.
        metrics = {"val/loss": self.val_loss, "val/acc1": self.val_acc1, "val/acc5": self.val_acc5,
                   "val/samples": self.val_samples}
        for name, metric in metrics.items():
            self.log(name, metric.compute(), prog_bar=name == "val/acc1")
            metric.reset()

    def configure_optimizers(self):
        optimizer = build_optimizer(self.cfg.optim, self.model)
        scheduler = build_scheduler(self.cfg.sched, optimizer, self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Everything needed to rebuild and feed the model without guessing (DESIGN: checkpoints).
        if isinstance(self.model, Mixer):  # a ResNet (shuffle experiment) keeps its weights only
            checkpoint["mixer"] = {"spec": self.model.spec.to_dict(), "preprocess": preprocessing(self.cfg)}
