"""The LightningDataModule over the configured data source.

Map-style sources (demo, image folder): Lightning's DistributedSampler splits training over ranks;
evaluation uses an unpadded sampler so no sample is counted twice. Shards: the dataset batches
itself and the epoch length is set here, samples per epoch / global batch optimiser steps.
"""
from __future__ import annotations

import warnings

import lightning as L
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from omegaconf import DictConfig
from torch.utils.data import DataLoader, IterableDataset

from mixer_cli.data import build_dataset
from mixer_cli.data.shards import TrainShards


class MixerDataModule(L.LightningDataModule):
    def __init__(self, cfg: DictConfig, device_batch: int):
        super().__init__()
        self.cfg = cfg
        self.device_batch = device_batch
        self.train_set = build_dataset(cfg.data, cfg.aug, "train", seed=cfg.seed)
        self.eval_set = build_dataset(cfg.data, cfg.aug, "test")

    @property
    def train_size(self) -> int:
        """Samples per training epoch."""
        return self.train_set.num_samples if isinstance(self.train_set, TrainShards) else len(self.train_set)

    @property
    def eval_size(self) -> int | None:
        return len(self.eval_set) if not isinstance(self.eval_set, IterableDataset) else self.eval_set.num_samples

    def check_world(self, world_size: int) -> None:
        """Fail before training starts when the shards cannot give every rank and worker its own."""
        if isinstance(self.train_set, TrainShards):
            self.train_set.check_split(world_size, self.cfg.data.num_workers)

    def _world(self) -> tuple[int, int]:
        return (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)

    def _pin(self) -> bool:
        return self.trainer is not None and self.trainer.accelerator.__class__.__name__ == "CUDAAccelerator"

    def _loader(self, dataset, **kw) -> DataLoader:
        workers = self.cfg.data.num_workers
        return DataLoader(dataset, num_workers=workers, persistent_workers=workers > 0, pin_memory=self._pin(), **kw)

    def train_dataloader(self) -> DataLoader:
        if isinstance(self.train_set, TrainShards):
            world, rank = self._world()
            self.train_set.placed = (rank, world)
            accumulate = self.cfg.data.global_batch // (world * self.device_batch)
            steps = max(self.train_size // self.cfg.data.global_batch, 1)
            self.train_set.set_epoch_length(self.device_batch, steps * accumulate)
            # The length is exact however many workers share it (TrainShards.__iter__); torch's advice does not apply.
            warnings.filterwarnings("ignore", ".*IterableDataset.*has.*__len__.*")
            return self._loader(self.train_set, batch_size=None)
        return self._loader(self.train_set, batch_size=self.device_batch, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        if isinstance(self.eval_set, IterableDataset):
            world, rank = self._world()
            self.eval_set.placed = (rank, world)
            self.eval_set.batch_size = self.device_batch
            return self._loader(self.eval_set, batch_size=None)
        world, rank = self._world()
        sampler = UnrepeatedDistributedSampler(self.eval_set, world, rank, shuffle=False) if world > 1 else None
        return self._loader(self.eval_set, batch_size=self.device_batch, sampler=sampler)
