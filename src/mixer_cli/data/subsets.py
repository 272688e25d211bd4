"""Fixed subsets of a training split, chosen by sample, the same for a given seed:

- `data.dev_fraction`: a held-out dev split to pick a fine-tuning sweep's lr on, as vit_jax trains
  on train[:98%] and picks on train[98%:] (train[:99%] for ImageNet); the test split only gives the
  final number.
- `data.train_fraction`: a random fraction of the remaining training samples, Sec. 3.3's data-set
  size study (3%, 10%, 30% of JFT-300M).

Each sample gets one number u in [0, 1) from its identity (its index, or its key in the shards)
and the seed. The dev split is u < dev_fraction; training keeps the rest whose position in it,
(u - dev_fraction) / (1 - dev_fraction), is below train_fraction. So dev and train never overlap,
a shard stream selects as it reads (no index of the split needed), and fractions nest: the 3%
subset lies within the 10% one, which lies within the 30% one.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from torch.utils.data import Dataset, Subset


def uniform(identity: str | int, seed: int) -> float:
    """A number in [0, 1), uniform over identities, fixed for (identity, seed)."""
    digest = hashlib.blake2b(f"{seed}:{identity}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass(frozen=True)
class Selection:
    part: str  # "train" or "dev"
    dev_fraction: float = 0.0
    train_fraction: float = 1.0
    seed: int = 0

    @property
    def everything(self) -> bool:
        return self.part == "train" and self.dev_fraction == 0 and self.train_fraction == 1

    @property
    def expected_fraction(self) -> float:
        """The share of the split this selection keeps, on average."""
        if self.part == "dev":
            return self.dev_fraction
        return (1 - self.dev_fraction) * self.train_fraction

    def keeps(self, identity: str | int) -> bool:
        u = uniform(identity, self.seed)
        if self.part == "dev":
            return u < self.dev_fraction
        return u >= self.dev_fraction and (u - self.dev_fraction) / (1 - self.dev_fraction) < self.train_fraction


class SelectedSubset(Subset):
    """torch's Subset whose `transform` is the underlying dataset's, so code that wraps a dataset's
    per-image transform (the shuffle experiment) works on a subset too."""

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, value):
        self.dataset.transform = value


def select(dataset: Dataset, selection: Selection) -> Dataset:
    """The samples of a map-style dataset that the selection keeps (by index)."""
    if selection.everything:
        return dataset
    return SelectedSubset(dataset, [i for i in range(len(dataset)) if selection.keeps(i)])
