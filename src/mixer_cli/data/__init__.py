"""Data sources: the bundled demo, image folders, and webdataset shards at scale (DESIGN.md, Data)."""
from __future__ import annotations

from omegaconf import DictConfig

from mixer_cli.data.demo import demo_arrays
from mixer_cli.data.tensor import TensorImages
from mixer_cli.data.transforms import demo_transform, eval_transform, train_transform
from mixer_cli.errors import UserError

SOURCES = ("demo", "folder", "shards")
__all__ = ["build_dataset", "demo_arrays", "SOURCES"]


def build_dataset(data: DictConfig, aug: DictConfig, split: str, seed: int = 0):
    """The dataset of `split` ('train' or 'test'), with training augmentation on 'train' only.

    Map-style for the demo and image folders; for shards an IterableDataset that batches itself
    (train: endless and resampled, its epoch length set by the DataModule; test: exact, unpadded).
    """
    train = split == "train"
    if data.source == "demo":
        x, y = demo_arrays(split)
        return TensorImages(x, y, demo_transform(data, aug, train=train))
    if data.source not in SOURCES:
        raise UserError(f"unknown data source {data.source!r}; choose one of: {', '.join(SOURCES)}")
    transform = train_transform(data, aug) if train else eval_transform(data, aug)
    if data.source == "folder":
        from mixer_cli.data.folder import image_folder

        return image_folder(data, "train_path" if train else "eval_path", transform)
    from mixer_cli.data.shards import eval_shards, train_shards

    return train_shards(data, transform, seed) if train else eval_shards(data, transform)
