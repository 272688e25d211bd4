"""A user's own images, as `mixer predict` reads them: files, folders (every image in them, at any
depth) and glob patterns, in the order given, each file once. A file that is missing or that PIL
cannot decode is reported with the reason and left out; it never stops the others."""
from __future__ import annotations

import glob
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from mixer_cli.data.folder import DECODE_ERRORS, load_image, problem


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMG_EXTENSIONS


def expand(inputs: list[str]) -> tuple[list[Path], list[dict]]:
    """(image files, [{"path", "reason"}] for inputs that name none): a folder gives its image files
    sorted, a glob its matches sorted; a named file is taken whatever its suffix (PIL decides)."""
    found, missing = [], []
    for given in inputs:
        files, reason = files_named(given)
        found += files
        if not files:
            missing.append({"path": given, "reason": reason})
    return list(dict.fromkeys(found)), missing


def files_named(given: str) -> tuple[list[Path], str]:
    """The files one input names, and why there are none."""
    path = Path(given).expanduser()
    if path.is_file():
        return [path], ""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and is_image_name(p)), "a folder with no image files"
    if glob.has_magic(given):
        return sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()), "matches no file"
    return [], "no such file or folder"


class ImageFiles(Dataset):
    """(pixels, index, "") per file, transformed for the model; an unreadable file gives (None, index,
    reason): the reason travels with the item, since a loader worker has no other way back."""

    def __init__(self, paths: list[Path], transform, channels: int):
        self.paths, self.transform = paths, transform
        self.mode = "RGB" if channels == 3 else "L"

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = str(self.paths[index])
        try:
            return self.transform(load_image(path, self.mode)), index, ""
        except DECODE_ERRORS as e:
            return None, index, problem(path, e)


def collate_readable(items: list) -> tuple[torch.Tensor | None, list[int], list[tuple[int, str]]]:
    """(the readable images stacked, their indices, [(index, reason)] of the unreadable ones)."""
    readable = [(x, i) for x, i, _ in items if x is not None]
    failed = [(i, reason) for x, i, reason in items if x is None]
    pixels = torch.stack([x for x, _ in readable]) if readable else None
    return pixels, [i for _, i in readable], failed
