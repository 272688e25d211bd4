"""The LightningDataModule over the configured data source."""
from __future__ import annotations

import lightning as L
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from mixer_cli.data import build_dataset


class MixerDataModule(L.LightningDataModule):
    def __init__(self, cfg: DictConfig, device_batch: int):
        super().__init__()
        self.cfg = cfg
        self.device_batch = device_batch
        self.train_set = build_dataset(cfg.data, cfg.aug, "train")
        self.eval_set = build_dataset(cfg.data, cfg.aug, "test")

    @property
    def train_size(self) -> int:
        return len(self.train_set)

    def _loader(self, dataset, train: bool) -> DataLoader:
        workers = self.cfg.data.num_workers
        return DataLoader(
            dataset,
            batch_size=self.device_batch,
            shuffle=train,
            drop_last=train,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self.trainer is not None and self.trainer.accelerator.__class__.__name__ == "CUDAAccelerator",
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_set, train=False)
