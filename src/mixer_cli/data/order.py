"""The training order as a function of the seed alone: the same global batches, augmented the same way,
whatever the number of devices, nodes, accumulation steps and loader workers.

An epoch's order is a permutation drawn from (seed, epoch); global batch g is its samples
[g*G, (g+1)*G), the last partial one dropped. Each global batch is cut into world x accumulate
micro-batches of `device_batch` samples, and micro-batch j = rank * accumulate + slot goes to that
rank's accumulation slot: 1 device accumulating 2 micro-batches and 2 devices taking one each
train on the same two halves, in one gradient. Each sample's random augmentation (crop, flip,
RandAugment) draws from generators seeded by (seed, epoch, sample), not by whichever process or loader
worker reads it.

The position is a count (micro-batches given in the epoch), so a stopped run continues exactly, on
any number of loader workers.
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch.utils.data import Dataset


def derived_seed(*parts) -> int:
    """A 63-bit seed fixed by `parts` (the run's seed, a purpose, an epoch, a sample...), unrelated for
    different parts: seed + epoch would give epoch 1 of seed 0 the order of epoch 0 of seed 1."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The training order of `epoch`: a permutation of range(num_samples) that only (seed, epoch) fix."""
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(derived_seed(seed, "order", epoch)))


def sample_order(dataset: Dataset, seed: int) -> Callable[[int], torch.Tensor]:
    """epoch -> the training order of a map-style set: its own where it has one (IndexedShards.order,
    shard-aware), else `epoch_order`."""
    if hasattr(dataset, "order"):
        return partial(dataset.order, seed)
    return partial(epoch_order, len(dataset), seed)


@contextmanager
def seeded_draws(seed: int):
    """torch's CPU generator and Python's `random`, which the CPU transforms draw from, seeded with `seed`
    inside the block and as they were after it: in a process without loader workers the training step
    draws from them too."""
    torch_state, python_state = torch.default_generator.get_state(), random.getstate()
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        torch.default_generator.set_state(torch_state)
        random.setstate(python_state)


class SeededSamples(Dataset):
    """A map-style training set read by (epoch, index) keys (GlobalBatchSampler's): sample i of epoch e is
    transformed with its draws seeded by (seed, e, i), so it comes out the same in any process."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with seeded_draws(derived_seed(self.seed, "sample", epoch, index)):
            return self.dataset[index]


class GlobalBatchSampler:
    """This rank's micro-batches of (epoch, index) keys, `accumulate` per global batch of
    world x accumulate x device_batch samples, cut from `order(epoch)` (epoch_order, or a source's
    own, such as the shard-aware order of data/indexed_shards.py). Stateful for torchdata's
    StatefulDataLoader; Lightning calls `set_epoch` before every epoch."""

    def __init__(self, order: Callable[[int], torch.Tensor], num_samples: int, device_batch: int, accumulate: int = 1,
                 world: int = 1, rank: int = 0):
        self.order, self.num_samples = order, num_samples  # order(epoch): a permutation of range(num_samples)
        self.device_batch, self.accumulate, self.world, self.rank = device_batch, accumulate, world, rank
        self.global_batch = device_batch * accumulate * world
        self.epoch, self.given = 0, 0
        self._loaded: tuple[int, int] | None = None

    def __len__(self) -> int:
        """Micro-batches per epoch on this rank: `accumulate` per whole global batch."""
        return self.num_samples // self.global_batch * self.accumulate

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def sampler(self) -> GlobalBatchSampler:
        """Lightning sets the epoch of a batch sampler's `sampler` (torch's BatchSampler has one), not its own."""
        return self

    def micro_batch(self, order: torch.Tensor, given: int) -> list[int]:
        """The samples of this rank's micro-batch number `given` of the epoch, in `order`."""
        batch, slot = divmod(given, self.accumulate)
        start = batch * self.global_batch + (self.rank * self.accumulate + slot) * self.device_batch
        return order[start:start + self.device_batch].tolist()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self._loaded is not None:
            (self.epoch, self.given), self._loaded = self._loaded, None
            if self.given >= len(self):  # saved at the epoch's last micro-batch: the next epoch's start
                self.epoch, self.given = self.epoch + 1, 0
        else:
            self.given = 0
        order = self.order(self.epoch)
        while self.given < len(self):
            indices = self.micro_batch(order, self.given)
            self.given += 1
            yield [(self.epoch, i) for i in indices]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "given": self.given}

    def load_state_dict(self, state: dict) -> None:
        self._loaded = (state["epoch"], state["given"])
