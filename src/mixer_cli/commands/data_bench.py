"""`mixer data bench`: images/s per CPU core of each recipe's input pipeline, on ImageNet-like JPEGs.

One process, one thread, timed in this process's CPU seconds: the figure is images/s per core, so
a host's input rate is roughly this times its loader workers, and other load on a shared machine
does not count against it. The pipelines take turns on the same encoded images for several
rounds and each keeps its best round. Every recipe's pipeline runs twice: the uint8 path, the
default (device_transforms.py: the loader stops at uint8, the device normalises the batch), and the
float path it replaced (data.decode=pil: PIL decode, transforms.py, float normalisation per image),
beside JPEG decoding alone, the ceiling of any pipeline that decodes.

Cores needed per device = a model's training img/s per device (from the latest `mixer benchmark
--train` results, or given) / a pipeline's img/s per core.
"""
from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageDraw
from rich.table import Table
from torch.nn import functional as F

from mixer_cli.core.console import console
from mixer_cli.core.errors import UserError
from mixer_cli.core.files import csv_text, package_root, write_atomic
from mixer_cli.core.plots import pyplot, save_figure
from mixer_cli.data.device_transforms import decode, eval_uint8_transform, train_uint8_transform
from mixer_cli.data.transforms import AREA, DEFAULT_DECODE, eval_data_config, eval_transform, train_transform

IMAGE_SIZE = (500, 375)  # width, height: a typical ImageNet photo
QUALITY = 90
# Each recipe family's data and aug groups: JFT recipes crop and flip, ImageNet and 21k add RandAugment.
RECIPES = {"JFT": ("jft300m", "inception_flip"), "ImageNet": ("imagenet", "randaug_mixup")}
UINT8, FLOAT = f"uint8{' (default)' if DEFAULT_DECODE == 'uint8' else ''}", "float (data.decode=pil)"
COLUMNS = ["pipeline", "img_per_s_per_core", "vs_decode_only", "vs_float_path", "cores_per_device"]


# ---------------------------------------------------------------- images
def _smooth_noise(g: torch.Generator, cells: int, width: int, height: int, channels: int = 1) -> torch.Tensor:
    """Gaussian noise on a grid `cells` wide, bilinearly upsampled: detail at one scale, (C, H, W)."""
    grid = torch.randn(1, channels, max(2, round(cells * height / width)) + 1, cells + 1, generator=g)
    return F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)[0]


def synthetic_photo(seed: int, size: tuple[int, int] = IMAGE_SIZE) -> Image.Image:
    """An RGB image with a photo's statistics, so it compresses and decodes like one (flat colour
    or white noise would decode unrealistically fast or slow): luminance at every scale with
    amplitude falling as 1/f, fine grain where a smooth mask says the scene is textured (foliage,
    fabric) and none elsewhere (sky, walls), low-frequency colour, and objects with sharp edges."""
    width, height = size
    g = torch.Generator().manual_seed(seed)
    octaves = (2, 4, 8, 16, 32, 64)
    luma = sum(_smooth_noise(g, c, width, height) * (45 * 0.7**k) for k, c in enumerate(octaves))
    textured = torch.sigmoid(4 * _smooth_noise(g, 3, width, height) + 2)
    grain = sum(_smooth_noise(g, round(width / px), width, height) * a for px, a in ((4, 63), (2, 45), (1, 36)))
    chroma = sum(_smooth_noise(g, c, width, height, 3) * (20 * 0.6**k) for k, c in enumerate(octaves[:4]))
    img = luma + textured * grain + chroma + torch.rand(3, 1, 1, generator=g) * 80 + 80
    objects = Image.new("L", size, 0)
    draw = ImageDraw.Draw(objects)
    for i in range(1, 15):
        x, y = (torch.rand(2, generator=g) * torch.tensor([width, height]) - 40).tolist()
        w, h = (torch.rand(2, generator=g) * 220 + 20).tolist()
        if i % 2:
            draw.ellipse((x, y, x + w, y + h), fill=i)
        else:
            draw.polygon([(x + a * w, y + b * h) for a, b in torch.rand(5, 2, generator=g).tolist()], fill=i)
    tint = torch.randn(15, 3, generator=g) * 40
    tint[0] = 0  # the background keeps its colour
    img = img + tint[torch.from_numpy(np.array(objects)).long()].permute(2, 0, 1)
    return Image.fromarray(img.clamp(0, 255).byte().permute(1, 2, 0).numpy())


def synthetic_jpegs(n: int, size: tuple[int, int] = IMAGE_SIZE, quality: int = QUALITY, seed: int = 0) -> list[bytes]:
    """`n` synthetic photos as JPEGs (500x375 at quality 90: about 100 KiB each, like ImageNet's)."""
    out = []
    for i in range(n):
        buf = io.BytesIO()
        synthetic_photo(seed + i, size).save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


# ---------------------------------------------------------------- pipelines
def recipe_configs(recipe: str) -> tuple[DictConfig, DictConfig]:
    """The data and aug groups a recipe family trains with (only their plain keys are read)."""
    data, aug = RECIPES[recipe]
    conf = package_root() / "conf"
    return OmegaConf.load(conf / "data" / f"{data}.yaml"), OmegaConf.load(conf / "aug" / f"{aug}.yaml")


def pil_decode(raw: bytes) -> Image.Image:
    """Today's decoding (webdataset's "pil" handler and the image folders)."""
    return Image.open(io.BytesIO(raw)).convert("RGB")


@dataclass(frozen=True)
class Pipeline:
    name: str
    run: Callable[[bytes], object]  # encoded image -> what a loader worker hands over
    float_path: str | None = None  # the name of the pipeline this one replaces


def pipelines() -> list[Pipeline]:
    """Decoding alone, then each recipe's training pipeline and the evaluation, float then uint8."""
    jft, imagenet = recipe_configs("JFT"), recipe_configs("ImageNet")
    size = jft[0].img_size
    method = eval_data_config(*imagenet)["interpolation"]
    eval_name = (f"eval: resize {int(size / imagenet[1].eval_crop_pct)} ({'area' if method == AREA else method}) + "
                 f"centre crop {size}")
    named = {
        "JFT: Inception crop + flip": jft,
        f"ImageNet: + RandAugment({imagenet[1].randaug_layers}, {imagenet[1].randaug_magnitude})": imagenet,
    }
    out = [Pipeline("decode only (PIL)", pil_decode), Pipeline("decode only (torchvision)", decode)]
    for name, (data, aug) in named.items():
        floats = train_transform(data, aug)
        out.append(Pipeline(f"{name}, {FLOAT}", lambda raw, t=floats: t(pil_decode(raw))))
        out.append(Pipeline(f"{name}, {UINT8}", train_uint8_transform(data, aug), f"{name}, {FLOAT}"))
    floats = eval_transform(*imagenet)
    out.append(Pipeline(f"{eval_name}, {FLOAT}", lambda raw: floats(pil_decode(raw))))
    out.append(Pipeline(f"{eval_name}, {UINT8}", eval_uint8_transform(*imagenet), f"{eval_name}, {FLOAT}"))
    return out


def images_per_second(jpegs: list[bytes], run: Callable[[bytes], object], seconds: float) -> float:
    """Images per CPU second of this process, over at least `seconds` of CPU time (whole passes)."""
    done, start = 0, time.process_time()
    while True:
        for raw in jpegs:
            run(raw)
        done += len(jpegs)
        elapsed = time.process_time() - start
        if elapsed >= seconds:
            return done / elapsed


def run_bench(jpegs: list[bytes], seconds: float, rounds: int = 5) -> list[dict]:
    """Rows of pipeline, images/s per core, the ratio to PIL decoding alone and, for a uint8
    pipeline, to the float pipeline it replaces. `seconds` per pipeline, split over `rounds`."""
    torch.set_num_threads(1)
    named = pipelines()
    best = {p.name: 0.0 for p in named}
    for _ in range(rounds):
        for p in named:
            best[p.name] = max(best[p.name], images_per_second(jpegs, p.run, seconds / rounds))
    reference = best[named[0].name]
    return [
        {"pipeline": p.name, "img_per_s_per_core": round(best[p.name], 1),
         "vs_decode_only": round(best[p.name] / reference, 3),
         "vs_float_path": round(best[p.name] / best[p.float_path], 3) if p.float_path else None}
        for p in named
    ]


# ---------------------------------------------------------------- cores per device
def training_rate(run_root: Path, model: str | None = None) -> dict | None:
    """The training img/s per device of `model` (default: the first of our Mixers, else the first
    model) in the newest `mixer benchmark` results that timed training; None without any."""
    found = sorted((run_root / "benchmark").glob("*/results.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in found:
        report = json.loads(path.read_text())
        rows = [r for r in report.get("results", []) if r.get("mode") == "train" and "img_s_per_device" in r]
        if model is not None:
            rows = [r for r in rows if r["model"] == model]
        rows.sort(key=lambda r: not r["model"].startswith("mixer-"))
        if rows:
            r = rows[0]
            about = f"{r['label']} at {r['res']}px, {report['precision']}, on {report['device']['name']} ({path})"
            return {"img_s_per_device": r["img_s_per_device"], "about": about}
    return None


def add_cores_needed(rows: list[dict], img_s_per_device: float) -> list[dict]:
    """Each row with `cores_per_device`: the CPU cores that feed one device at this training rate."""
    return [{**r, "cores_per_device": round(img_s_per_device / r["img_per_s_per_core"], 2)} for r in rows]


# ---------------------------------------------------------------- output
def write_bench(rows: list[dict], csv_path: Path) -> list[Path]:
    """The rows as CSV, and a bar chart of images/s per core as PNG beside it."""
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(csv_path, csv_text(rows, [c for c in COLUMNS if c in rows[0]]))
    fig, ax = pyplot().subplots(figsize=(8, 3.6))
    colours = ["tab:green" if r["pipeline"].endswith(UINT8) else "tab:blue" for r in rows][::-1]
    ax.barh([r["pipeline"] for r in rows][::-1], [r["img_per_s_per_core"] for r in rows][::-1], color=colours)
    ax.set_xlabel(f"images/s per CPU core ({IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} JPEG, quality {QUALITY})")
    fig.tight_layout()
    png = csv_path.with_suffix(".png")
    save_figure(fig, png)
    return [csv_path, png]


def print_bench(rows: list[dict], jpegs: list[bytes], rate: dict | None) -> None:
    kib = sum(map(len, jpegs)) / len(jpegs) / 1024
    width, height = IMAGE_SIZE
    title = f"input pipelines, one CPU core, {len(jpegs)} synthetic {width}x{height} JPEGs ({kib:.0f} KiB)"
    table = Table(title=title)
    headers = ["pipeline", "img/s per core", "vs decode only", "vs float path"]
    headers += ["cores per device"] if rate else []
    for col in headers:
        table.add_column(col, justify="left" if col == "pipeline" else "right")
    for r in rows:
        cells = [r["pipeline"], f"{r['img_per_s_per_core']:.0f}", f"{r['vs_decode_only']:.2f}x",
                 f"{r['vs_float_path']:.2f}x" if r["vs_float_path"] else ""]
        table.add_row(*cells, *([f"{r['cores_per_device']:.1f}"] if rate else []))
    console.print(table)
    if rate is None:
        console.print("cores per device: run `mixer benchmark --train` first, or pass --throughput N "
                      "(training img/s per device)", highlight=False)
        return
    console.print(f"cores per device: {rate['img_s_per_device']:.0f} training img/s per device ({rate['about']}) / "
                  "img/s per core; the uint8 rows leave float conversion and normalisation to the device",
                  highlight=False)


def data_bench(images: int, seconds: float, out: Path | None = None, throughput: float | None = None,
               model: str | None = None, run_root: Path = Path("runs")) -> list[dict]:
    """The `mixer data bench` command: measure, print, and write the CSV and PNG when `out` is given."""
    if images < 1 or seconds <= 0:
        raise UserError("--images must be at least 1 and --seconds above 0")
    if throughput is not None and throughput <= 0:
        raise UserError(f"--throughput must be above 0 (training img/s per device), got {throughput}")
    given = {"img_s_per_device": throughput, "about": "--throughput"}
    rate = training_rate(run_root, model) if throughput is None else given
    if rate is None and model is not None:
        raise UserError(f"no `mixer benchmark --train` results for --model {model} under {run_root}/benchmark; "
                        f"run `mixer benchmark --train models=[{model}]` or pass --throughput N")
    jpegs = synthetic_jpegs(images)
    rows = run_bench(jpegs, seconds)
    rows = add_cores_needed(rows, rate["img_s_per_device"]) if rate else rows
    print_bench(rows, jpegs, rate)
    if out is not None:
        for path in write_bench(rows, out):
            console.print(f"wrote {path}")
    return rows
