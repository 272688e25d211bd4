"""Map-style dataset over in-memory uint8 images (the demo set, small test sets)."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset


class TensorImages(Dataset):
    """(N, H, W) or (N, C, H, W) uint8 images -> normalised float tensors, with a transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform=None):
        x = torch.from_numpy(np.ascontiguousarray(images))
        self.images = x[:, None] if x.ndim == 3 else x
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i]
        return (self.transform(x) if self.transform else x), self.labels[i]
