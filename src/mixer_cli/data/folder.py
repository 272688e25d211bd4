"""An image folder as a source: one sub-folder per class, as torchvision's ImageFolder reads it."""
from __future__ import annotations

from functools import partial
from pathlib import Path

from omegaconf import DictConfig
from PIL import Image
from torchvision.datasets import ImageFolder

from mixer_cli.errors import UserError


def load_image(path: str, mode: str) -> Image.Image:
    with open(path, "rb") as f:
        return Image.open(f).convert(mode)


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def image_folder(data: DictConfig, key: str, transform, decoded: bool = True) -> ImageFolder:
    """The folder at data.<key>, with as many class sub-folders as data.num_classes says; its images
    decoded to PIL, or (decoded=False) their encoded bytes for the uint8 and GPU-decode paths."""
    root = Path(data[key])
    if not root.is_dir():
        raise UserError(f"no image folder at data.{key}={root}; set data.{key}=... (or the MIXER_DATA root)")
    try:
        loader = partial(load_image, mode="RGB" if data.channels == 3 else "L") if decoded else read_bytes
        dataset = ImageFolder(str(root), transform=transform, loader=loader)
    except FileNotFoundError as e:  # no class sub-folders, or no images in them
        raise UserError(f"data.{key}={root}: {str(e).splitlines()[0]}") from None
    if len(dataset.classes) != data.num_classes:
        found = len(dataset.classes)
        raise UserError(
            f"data.{key}={root} has {found} classes, data.num_classes={data.num_classes}; set data.num_classes={found}"
        )
    return dataset
