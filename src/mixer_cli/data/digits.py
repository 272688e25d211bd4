"""scikit-learn's 8x8 handwritten digits (UCI; 1,797 images, 10 classes, 16 grey levels): a small
real data set the MNIST demo never saw, for transfer from the demo pre-training (`mixer fewshot`).

Split 50/50 per class with a fixed seed. Each 8x8 digit is drawn as MNIST draws its digits: scaled
into the central 20x20 box of the 28x28 frame (at other resolutions, the same proportions).
"""
from __future__ import annotations

import numpy as np
from omegaconf import DictConfig
from torchvision.transforms import v2

from mixer_cli.data.transforms import to_float

SPLIT_SEED = 0
MNIST_BOX = 20 / 28  # the share of an MNIST frame the digit occupies


def digits_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 8, 8) uint8 in 0..255 and labels (N,) int64 of the 'train' or 'test' half."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(SPLIT_SEED)
    train = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        train[idx[: len(idx) // 2]] = True
    keep = train if split == "train" else ~train
    return images[keep], labels[keep]


def digits_transform(data: DictConfig) -> v2.Compose:
    """uint8 (1, 8, 8) -> (channels, img_size, img_size), the digit in MNIST's box; normalised floats where
    the loader hands over floats (data.decode=pil)."""
    box = round(data.img_size * MNIST_BOX)
    pad = data.img_size - box
    return v2.Compose([
        v2.Resize((box, box), interpolation=v2.InterpolationMode(data.interpolation), antialias=True),
        v2.Pad([pad // 2, pad // 2, pad - pad // 2, pad - pad // 2]),
        v2.Lambda(lambda x: x.expand(data.channels, -1, -1)),
        *to_float(data),
    ])
