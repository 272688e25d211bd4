"""An image folder as a source: one sub-folder per class, as torchvision's ImageFolder reads it.

Reading every image before a run would cost a pass over the data (1.28M files for ImageNet), so a
folder is checked where that is cheap. Before anything is written, the first image of every class
is decoded (a JPEG at 1/8 scale, which still reads all of the file): that refuses a folder that
holds no images PIL reads (files of another kind, Git LFS pointers, a copy of empty or cut files).
An unreadable image met later is, in training, skipped as the shard stream skips a corrupt sample:
logged, with the next image the run trains on in its place; the choice depends on the index alone,
so a continued run makes it as the run left alone did. An evaluation counts every image, so there
an unreadable one ends the run with a line that names it.
"""
from __future__ import annotations

import logging
import os
from functools import partial
from pathlib import Path

from omegaconf import DictConfig
from PIL import Image, UnidentifiedImageError
from torchvision.datasets import ImageFolder

from mixer_cli.core.errors import UserError
from mixer_cli.data.subsets import Selection

log = logging.getLogger(__name__)

DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)  # PIL's, by format
MAX_IN_A_ROW = 1000  # unreadable images tried for one sample: beyond that the folder is broken, not an image


class UnreadableImage(UserError):
    """An image a run cannot do without. A loader worker's exception reaches the main process as
    type(message) with the worker's traceback as the message, whose last line is ours: keep that one."""

    def __init__(self, message: str):
        super().__init__(message.strip().splitlines()[-1].split(f"{type(self).__name__}: ", 1)[-1])


def load_image(path: str, mode: str) -> Image.Image:
    with open(path, "rb") as f:
        return Image.open(f).convert(mode)


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def problem(path: str, error: Exception) -> str:
    """What is wrong with an image file, in a few words."""
    if os.path.getsize(path) == 0:
        return "empty: 0 bytes"
    if isinstance(error, UnidentifiedImageError):  # its message repeats the path
        return "not an image file PIL reads"
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class Images(ImageFolder):
    """ImageFolder that, for a training run (`training`: the samples it reads), puts the next image
    it reads in the place of an unreadable one, and otherwise raises UnreadableImage naming it."""

    def __init__(self, root: Path, key: str, training: Selection | None, **kwargs):
        super().__init__(str(root), **kwargs)
        self.key, self.training, self.skipped = key, training, 0

    def __getitem__(self, index: int):
        for _ in range(MAX_IN_A_ROW):
            path = self.samples[index][0]
            try:
                return super().__getitem__(index)
            except DECODE_ERRORS as e:
                what = f"{path} ({problem(path, e)})"
            if self.training is None:
                raise UnreadableImage(f"cannot read image {what}; an evaluation reads every image of "
                                      f"data.{self.key}: replace or remove it")
            self.skipped += 1
            log.warning("data: skipped unreadable image %s; the next training image takes its place "
                        "(%d skipped in this loader worker)", what, self.skipped)
            index = self._next_trained(index)
        raise UnreadableImage(f"{MAX_IN_A_ROW} unreadable images in a row in data.{self.key}, the last {what}; "
                              "check the folder")

    def _next_trained(self, index: int) -> int:
        while not self.training.keeps(index := (index + 1) % len(self.samples)):
            pass
        return index


def probe_image(source) -> None:
    """Decode an image (a path or a file object) cheaply, raising one of DECODE_ERRORS where PIL cannot:
    a JPEG decodes at 1/8 scale, to the end of its data all the same."""
    with Image.open(source) as img:
        img.draft(None, (1, 1))
        img.load()


def check_each_class(dataset: ImageFolder, key: str, root: Path) -> None:
    """Decode the first image of every class: cheap, and enough to refuse a folder of non-images."""
    first = {}
    for path, target in dataset.samples:
        first.setdefault(target, path)
    for target, path in first.items():
        try:
            probe_image(path)
        except DECODE_ERRORS as e:
            raise UserError(f"data.{key}={root}: cannot read the first image of class {dataset.classes[target]}, "
                            f"{path} ({problem(path, e)})") from None


def image_folder(data: DictConfig, key: str, transform, decoded: bool = True,
                 training: Selection | None = None) -> ImageFolder:
    """The folder at data.<key>, with as many class sub-folders as data.num_classes says; its images
    decoded to PIL, or (decoded=False) their encoded bytes for the uint8 and GPU-decode paths.
    `training`: the samples a training run reads, among which an unreadable image is replaced;
    None: every read must succeed (evaluation)."""
    root = Path(data[key])
    if not root.is_dir():
        raise UserError(f"no image folder at data.{key}={root}; set data.{key}=... (or the MIXER_DATA root)")
    try:
        loader = partial(load_image, mode="RGB" if data.channels == 3 else "L") if decoded else read_bytes
        dataset = Images(root, key, training, transform=transform, loader=loader)
    except FileNotFoundError as e:  # no class sub-folders, or no images in them
        raise UserError(f"data.{key}={root}: {str(e).splitlines()[0]}") from None
    if len(dataset.classes) != data.num_classes:
        found = len(dataset.classes)
        raise UserError(
            f"data.{key}={root} has {found} classes, data.num_classes={data.num_classes}; set data.num_classes={found}"
        )
    check_each_class(dataset, key, root)
    return dataset
