"""ReaL top-1 (Beyer et al., 2020, "Are we done with ImageNet?"): ImageNet validation accuracy
against the reassessed labels.

`real.json` (google-research/reassessed-imagenet) is a JSON list of 50,000 lists: entry i holds
the classes judged correct for validation image number i + 1, the file `ILSVRC2012_val_{i+1:08d}.*`.
A prediction is right when its class is in the image's list; images whose list is empty are left
out. The image number comes from the file name (image folders) or the sample key (shards).
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchmetrics import MeanMetric, SumMetric

from mixer_cli.core.errors import UserError

VAL_NAME = re.compile(r"ILSVRC2012_val_(\d+)")


def read_real_labels(path: str | Path) -> list[list[int]]:
    """The list of label lists in real.json; a file that is not one is a one-line error."""
    path = Path(path)
    try:
        labels = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"ReaL labels file {path} does not exist; set data.real_labels=PATH/real.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not a ReaL labels file (real.json): {str(e).splitlines()[0]}") from None
    if not isinstance(labels, list) or not labels:
        raise UserError(f"{path} is not a ReaL labels file (real.json): expected a non-empty JSON list of lists")
    for i, entry in enumerate(labels):
        if not isinstance(entry, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in entry):
            raise UserError(f"{path} is not a ReaL labels file (real.json): entry {i} is {entry!r}, not a list of "
                            "class numbers")
    return labels


def image_number(name: str) -> int:
    """1 for `ILSVRC2012_val_00000001.JPEG`, a path to it, or a shard key that keeps its stem."""
    match = VAL_NAME.search(str(name))
    if match is None:
        raise UserError(f"{name!r} names no ImageNet validation image (ILSVRC2012_val_NNNNNNNN): ReaL labels "
                        "need the original file names, in folders or as shard keys")
    return int(match.group(1))


def image_numbers(names: Sequence[str]) -> torch.Tensor:
    return torch.tensor([image_number(n) for n in names], dtype=torch.long)


class FolderWithImageNumbers(Dataset):
    """An image folder (torchvision's ImageFolder) whose samples are (image, label, image number)."""

    def __init__(self, folder):
        self.folder = folder
        self.numbers = [image_number(path) for path, _ in folder.samples]  # every name checked before evaluating

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int):
        x, y = self.folder[i]
        return x, y, self.numbers[i]


def with_image_numbers(dataset):
    """The evaluation dataset with each sample's image number (or key) after image and label."""
    if hasattr(dataset, "samples"):  # torchvision's ImageFolder: (path, label) pairs
        return FolderWithImageNumbers(dataset)
    if hasattr(dataset, "with_keys"):  # webdataset shards: then (image, label, __key__)
        dataset.with_keys = True
        return dataset
    raise UserError("ReaL labels need ImageNet's validation file names: evaluate an image folder (data=folder) or "
                    "shards written by `mixer data write`")


def label_table(labels: Sequence[Sequence[int]]) -> torch.Tensor:
    """(images, most labels of one image) int64, rows padded with -1, which matches no class."""
    table = torch.full((len(labels), max(map(len, labels), default=0) or 1), -1, dtype=torch.long)
    for i, entry in enumerate(labels):
        table[i, : len(entry)] = torch.tensor(entry, dtype=torch.long)
    return table


class RealTop1(MeanMetric):
    """ReaL top-1 over the images seen: the mean, over the images with a non-empty label list, of
    whether the top-1 class is in that list; `counted` sums those images. Both exact under DDP
    (torchmetrics sums their states over ranks), and both torchmetrics objects, which Lightning logs.

    update(logits (B, 1000), image_numbers): (B,) numbers, 1-based as in the file names, or the images'
    names (shard keys, file names) to read them from; compute() -> NaN when no image seen had a list.
    """

    def __init__(self, labels: Sequence[Sequence[int]], **kwargs):
        super().__init__(**kwargs)
        self.register_buffer("table", label_table(labels), persistent=False)
        self.counted = SumMetric()

    def check(self, image_numbers: torch.Tensor) -> None:
        """Every image number must have its entry in the labels file."""
        beyond = image_numbers[(image_numbers < 1) | (image_numbers > len(self.table))]
        if len(beyond):
            raise UserError(f"validation image number {int(beyond[0])} is beyond the ReaL labels file, which has "
                            f"{len(self.table)} entries; the full real.json has 50,000")

    def update(self, logits: torch.Tensor, numbers_or_names: torch.Tensor | Sequence[str]) -> None:
        if not isinstance(numbers_or_names, torch.Tensor):
            numbers_or_names = image_numbers(numbers_or_names)
        numbers = numbers_or_names.to(self.table.device).long()
        self.check(numbers)
        real = self.table[numbers - 1]
        listed = (real >= 0).any(dim=1)
        hit = (real == logits.argmax(dim=1).to(real.device)[:, None]).any(dim=1)
        super().update(hit[listed].float())
        self.counted.update(listed.sum())

    def reset(self) -> None:
        super().reset()
        self.counted.reset()

    def num_counted(self) -> int:
        """The images with a non-empty list seen, over all processes (compute() gives the fraction only)."""
        return int(self.counted.compute())


def check_image_numbers(dataset, metric: RealTop1) -> None:
    """Every image of `with_image_numbers(dataset)` must have a number within the labels file: checked
    from the names alone (a folder's files, the shards' tar headers) before any image is read."""
    if isinstance(dataset, FolderWithImageNumbers):
        numbers = torch.tensor(dataset.numbers, dtype=torch.long)
    else:
        keys = dataset.keys()
        if keys is None:  # remote shards: each batch is checked as it comes
            return
        numbers = image_numbers(keys)
    metric.check(numbers)


def real_labels_for(data, dataset) -> tuple[Dataset, RealTop1 | None]:
    """(the evaluation set, yielding image numbers or keys after image and label; its ReaL metric) when
    the data config names a labels file (`data.real_labels`), else (the set as given, None). The
    images' numbers are checked against the file here, before a run starts."""
    if not data.get("real_labels"):
        return dataset, None
    metric = RealTop1(read_real_labels(data.real_labels))
    dataset = with_image_numbers(dataset)
    check_image_numbers(dataset, metric)
    return dataset, metric
