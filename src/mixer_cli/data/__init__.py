"""Data sources: the bundled demo (and, at scale, webdataset shards and image folders)."""
from __future__ import annotations

import torch
from omegaconf import DictConfig
from torchvision.transforms import v2

from mixer_cli.data.demo import demo_arrays
from mixer_cli.data.tensor import TensorImages
from mixer_cli.errors import UserError


def build_dataset(data: DictConfig, aug: DictConfig, split: str):
    """The dataset of `split` ('train' or 'test'), with training augmentation on 'train' only."""
    if data.source == "demo":
        x, y = demo_arrays(split)
        return TensorImages(x, y, demo_transform(data, aug, train=split == "train"))
    raise UserError(f"unknown data source {data.source!r}; choose one of: demo")


def demo_transform(data: DictConfig, aug: DictConfig, train: bool) -> v2.Compose:
    shift = [v2.RandomCrop(data.img_size, padding=aug.pad_crop)] if train and aug.get("pad_crop") else []
    return v2.Compose([*shift, v2.ToDtype(torch.float32, scale=True), v2.Normalize(data.mean, data.std)])
