"""Data sources: the bundled demo, image folders, and webdataset shards at scale (DESIGN.md, Data)."""
from __future__ import annotations

from omegaconf import DictConfig

from mixer_cli.data.demo import demo_arrays
from mixer_cli.data.tensor import TensorImages
from mixer_cli.data.transforms import demo_transform, eval_transform, train_transform
from mixer_cli.errors import UserError

SOURCES = ("demo", "digits", "folder", "shards")
__all__ = ["build_dataset", "demo_arrays", "SOURCES"]


def build_dataset(data: DictConfig, aug: DictConfig, split: str, seed: int = 0, augment: bool | None = None):
    """The dataset of `split` ('train' or 'test').

    By default 'train' is augmented (and, for shards, an endless resampled stream whose epoch length
    the DataModule sets) and 'test' is read once, exactly and unpadded, with evaluation preprocessing.
    augment=False reads the train split like the test split (the frozen-feature few-shot probes).
    """
    train = split == "train"
    augment = train if augment is None else augment and train
    if data.source == "demo":
        x, y = demo_arrays(split)
        return TensorImages(x, y, demo_transform(data, aug, train=augment))
    if data.source == "digits":
        from mixer_cli.data.digits import digits_arrays, digits_transform

        return TensorImages(*digits_arrays(split), digits_transform(data))
    if data.source not in SOURCES:
        raise UserError(f"unknown data source {data.source!r}; choose one of: {', '.join(SOURCES)}")
    transform = train_transform(data, aug) if augment else eval_transform(data, aug)
    key = "train_path" if train else "eval_path"
    if data.source == "folder":
        from mixer_cli.data.folder import image_folder

        return image_folder(data, key, transform)
    from mixer_cli.data.shards import eval_shards, train_shards

    return train_shards(data, transform, seed) if augment else eval_shards(data, transform, key)
