"""`mixer data bench`: decode + augment throughput per CPU core for 224x224 JPEGs.

One process, one thread: the figure is images/s per core, so a host's input rate is roughly this
times its loader workers. Each pipeline is timed on the same encoded images, in turns; the table
gives the ratio to JPEG decoding alone, the floor every pipeline pays.
"""
from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from mixer_cli.config import write_atomic
from mixer_cli.data.transforms import eval_transform, train_transform

DATA = OmegaConf.create(
    {"img_size": 224, "channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"}
)
BASE_AUG = {"crop_area_min": 0.05, "randaug_layers": 2, "randaug_magnitude": 0, "eval_resize": 256, "pad_crop": 0}


def _aug(**keys):
    return OmegaConf.create({**BASE_AUG, **keys})


def pipelines() -> dict[str, object]:
    """Name -> PIL -> tensor transform, as the aug configs build them (None: decode only)."""
    aug = _aug
    return {
        "decode only": None,
        "inception crop + flip (JFT)": train_transform(DATA, aug(inception_crop=True, hflip=True)),
        "+ RandAugment n=2 m=15 (ImageNet)": train_transform(
            DATA, aug(inception_crop=True, hflip=True, randaug_magnitude=15)
        ),
        "eval resize-crop": eval_transform(DATA, aug(eval_crop="resize-crop")),
    }


def synthetic_jpegs(n: int, size: int = 224, quality: int = 90, seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs: smooth colour fields plus fine noise, so they compress like real photos
    (flat or pure-noise images would decode unrealistically fast or slow)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float32)
        pixels = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def decode(raw: bytes) -> Image.Image:
    return Image.open(io.BytesIO(raw)).convert("RGB")


def images_per_second(jpegs: list[bytes], transform, seconds: float) -> float:
    """Decode (+ transform) the images in turn for about `seconds` (at least one pass); images per second."""
    done, start = 0, time.perf_counter()
    while True:
        for raw in jpegs:
            img = decode(raw)
            if transform is not None:
                transform(img)
            done += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def run_bench(images: int = 64, seconds: float = 3.0, rounds: int = 5) -> list[dict]:
    """Rows of pipeline, images/s per core, and the ratio to decode only. The pipelines take turns
    for `rounds` rounds and each keeps its best round, so load from other processes on a shared
    machine disturbs every pipeline alike and the least-disturbed figure counts."""
    torch.set_num_threads(1)
    jpegs = synthetic_jpegs(images)
    named = pipelines()
    best = dict.fromkeys(named, 0.0)
    for _ in range(rounds):
        for name, transform in named.items():
            best[name] = max(best[name], images_per_second(jpegs, transform, seconds / rounds))
    reference = best["decode only"]
    return [
        {"pipeline": name, "img_per_s_per_core": round(rate, 1), "vs_decode_only": round(rate / reference, 3)}
        for name, rate in best.items()
    ]


def write_bench(rows: list[dict], csv_path: Path) -> list[Path]:
    """The rows as CSV, and a bar chart of images/s per core as PNG beside it."""
    from mixer_cli.report import csv_text, pyplot, save_figure

    csv_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(csv_path, csv_text(rows, ["pipeline", "img_per_s_per_core", "vs_decode_only"]))
    fig, ax = pyplot().subplots(figsize=(7, 2.8))
    ax.barh([r["pipeline"] for r in rows][::-1], [r["img_per_s_per_core"] for r in rows][::-1])
    ax.set_xlabel("images/s per CPU core (224x224 JPEG)")
    fig.tight_layout()
    png = csv_path.with_suffix(".png")
    save_figure(fig, png)
    return [csv_path, png]
