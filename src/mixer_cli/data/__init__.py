"""Data sources: the bundled demo, image folders, webdataset shards at scale, and Hugging Face datasets."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from mixer_cli.core.errors import UserError
from mixer_cli.data.demo import demo_arrays
from mixer_cli.data.subsets import Selection, select
from mixer_cli.data.tensor import TensorImages
from mixer_cli.data.transforms import DEFAULT_DECODE, demo_transform, eval_transform, train_transform

SOURCES = ("demo", "digits", "folder", "shards", "hf")
__all__ = ["build_dataset", "class_names", "demo_arrays", "SOURCES"]


def selection(data: DictConfig, part: str) -> Selection:
    """Which samples of the train split a training run ("train") or its dev split ("dev") reads."""
    return Selection(part, data.get("dev_fraction", 0.0), data.get("train_fraction", 1.0), data.get("subset_seed", 0))


def build_dataset(data: DictConfig, aug: DictConfig, split: str, seed: int = 0, augment: bool | None = None):
    """The dataset of `split`: 'train', 'dev' (held out of the train split, data.dev_fraction) or 'test'.

    By default 'train' is augmented (and, for shards, an endless resampled stream whose epoch length
    the DataModule sets) and reads the samples data.dev_fraction and data.train_fraction leave for
    training; 'dev' and 'test' are read once, exactly and unpadded, with evaluation preprocessing.
    augment=False reads the whole train split like the test split (the frozen-feature few-shot probes).
    """
    train = split == "train"
    augment = train if augment is None else augment and train
    part = "train" if augment else "dev" if split == "dev" else None
    chosen = selection(data, part) if part else None
    if split == "dev" and not data.get("dev_fraction"):
        raise UserError("there is no dev split: set data.dev_fraction (e.g. 0.02) to hold one out of the train split")
    if data.source == "demo":
        x, y = demo_arrays("test" if split == "test" else "train")
        return subset(TensorImages(x, y, demo_transform(data, aug, train=augment)), chosen)
    if data.source == "digits":
        from mixer_cli.data.digits import digits_arrays, digits_transform

        return subset(TensorImages(*digits_arrays("test" if split == "test" else "train"), digits_transform(data)),
                      chosen)
    decode = data.get("decode", DEFAULT_DECODE)
    transform = image_transform(data, aug, augment, decode)
    key = "eval_path" if split == "test" else "train_path"
    if data.source == "folder":
        from mixer_cli.data.folder import image_folder

        folder = image_folder(data, key, transform, decoded=decode == "pil", training=chosen if augment else None)
        return subset(folder, chosen)
    if data.source == "hf":
        from mixer_cli.data.hf import hf_dataset

        return hf_dataset(data, transform, key, chosen, training=augment, seed=seed)
    from mixer_cli.data.shards import eval_shards, train_shards

    return train_shards(data, transform, seed, chosen) if augment else eval_shards(data, transform, key, chosen)


def class_names(data: DictConfig) -> tuple[str, ...] | None:
    """The names of the data's classes, in label order: the digits of the demo sets, an image folder's
    sub-folder names, the classes a shard folder's index.json lists, a Hugging Face data set's
    ClassLabel names. None where the data names none
    (shards written by another tool) or names another number of classes than data.num_classes (a split
    written from a folder that lacks some): names that may be shifted are worse than indices."""
    names = listed_class_names(data)
    return names if names and len(names) == data.num_classes else None


def listed_class_names(data: DictConfig) -> tuple[str, ...] | None:
    if data.source in ("demo", "digits"):
        return tuple(str(digit) for digit in range(10))
    if data.source == "hf":
        from mixer_cli.data.hf_source import hf_class_names

        return hf_class_names(data)
    found = [Path(str(data[key])) for key in ("train_path", "eval_path") if data.get(key)]
    root = next((path for path in found if path.is_dir()), Path(""))
    if data.source == "folder" and root.is_dir():
        from torchvision.datasets.folder import find_classes

        try:
            return tuple(find_classes(str(root))[0])
        except FileNotFoundError:  # no class sub-folders: reading the folder says so
            return None
    if data.source == "shards" and (root / "index.json").is_file():
        from mixer_cli.data.writer import read_index

        return tuple(read_index(root).get("classes") or ())
    return None


def image_transform(data: DictConfig, aug: DictConfig, augment: bool, decode: str):
    """What the loader workers do to one image, by data.decode: `pil` decodes with PIL and hands over
    normalised floats; `uint8` decodes, crops and flips, and hands over uint8 (C, H, W) for the
    device to normalise; `gpu` hands over the encoded bytes for the device to decode."""
    if decode == "pil":
        return train_transform(data, aug) if augment else eval_transform(data, aug)
    if decode == "uint8":
        from mixer_cli.data.device_transforms import eval_uint8_transform, train_uint8_transform

        return train_uint8_transform(data, aug) if augment else eval_uint8_transform(data, aug)
    from mixer_cli.data.device_transforms import gpu_decode_transform

    gpu_decode_transform(data, aug, augment)  # decode=gpu: what the device will do, checked now
    return None


def subset(dataset, chosen: Selection | None):
    return select(dataset, chosen) if chosen is not None else dataset
