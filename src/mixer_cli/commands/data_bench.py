"""`mixer data bench`: images/s per CPU core of each recipe's input pipeline, on ImageNet-like JPEGs.

One process, one thread, timed in this process's CPU seconds: the figure is images/s per core, so
a host's input rate is roughly this times its loader workers, and other load on a shared machine
does not count against it. The pipelines take turns on the same encoded images for several
rounds and each keeps its best round. Every recipe's pipeline runs twice: the uint8 path, the
default (device_transforms.py: the loader stops at uint8, the device normalises the batch), and the
float path it replaced (data.decode=pil: PIL decode, transforms.py, float normalisation per image),
beside JPEG decoding alone, the ceiling of any pipeline that decodes.

With `--device cuda` the GPU input pipeline (data.decode=gpu) joins the table: the host only reads
bytes, draws each image's crop, flip and RandAugment ops, and launches the work, so its img/s per
core is this process's CPU time per image of `decode_on_device` on batches; the device does the
decoding (nvJPEG) and the augmentation, and its rate (img/s in wall time) against the training rate
is the share of the device's time that the input pipeline takes. The JFT crop's and the evaluation's
rows come again resized image by image, as they were before their resizes were batched: the ratio
of the two is the batching's gain on that device.

Cores needed per device = a model's training img/s per device (from the latest `mixer benchmark
--train` results, or given) / a pipeline's img/s per core.
"""
from __future__ import annotations

import copy
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

from mixer_cli.config.schema import DEVICE
from mixer_cli.core.console import console
from mixer_cli.core.devices import pick_device, torch_threads
from mixer_cli.core.errors import UserError
from mixer_cli.core.files import csv_text, package_root, write_atomic
from mixer_cli.core.plots import pyplot, save_figure
from mixer_cli.data.device_transforms import (
    EvalResizeUint8,
    InceptionCropUint8,
    collate_encoded,
    decode,
    decode_on_device,
    eval_uint8_transform,
    gpu_decode_transform,
    train_uint8_transform,
)
from mixer_cli.data.transforms import AREA, DEFAULT_DECODE, eval_data_config, eval_transform, train_transform

IMAGE_SIZE = (500, 375)  # width, height: a typical ImageNet photo
QUALITY = 90
# Each recipe family's data and aug groups: JFT recipes crop and flip, ImageNet and 21k add RandAugment.
RECIPES = {"JFT": ("jft300m", "inception_flip"), "ImageNet": ("imagenet", "randaug_mixup")}
UINT8, FLOAT = f"uint8{' (default)' if DEFAULT_DECODE == 'uint8' else ''}", "float (data.decode=pil)"
GPU = "data.decode=gpu"
IMAGE_BY_IMAGE = "image by image"
DEVICE_BATCH = 128  # images per decode_on_device call, as a training batch's share of one device
COLUMNS = ["pipeline", "img_per_s_per_core", "vs_decode_only", "vs_float_path", "device_img_per_s",
           "cores_per_device", "device_share"]


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


def named_recipes() -> tuple[dict[str, tuple[DictConfig, DictConfig]], str, tuple[DictConfig, DictConfig]]:
    """The training pipelines' names and (data, aug) configs, the evaluation's name and its configs
    (ImageNet's)."""
    jft, imagenet = recipe_configs("JFT"), recipe_configs("ImageNet")
    size = jft[0].img_size
    method = eval_data_config(*imagenet)["interpolation"]
    eval_name = (f"eval: resize {int(size / imagenet[1].eval_crop_pct)} ({'area' if method == AREA else method}) + "
                 f"centre crop {size}")
    return {
        "JFT: Inception crop + flip": jft,
        f"ImageNet: + RandAugment({imagenet[1].randaug_layers}, {imagenet[1].randaug_magnitude})": imagenet,
    }, eval_name, imagenet


def pipelines() -> list[Pipeline]:
    """Decoding alone, then each recipe's training pipeline and the evaluation, float then uint8."""
    named, eval_name, evaluation = named_recipes()
    out = [Pipeline("decode only (PIL)", pil_decode), Pipeline("decode only (torchvision)", decode)]
    for name, (data, aug) in named.items():
        floats = train_transform(data, aug)
        out.append(Pipeline(f"{name}, {FLOAT}", lambda raw, t=floats: t(pil_decode(raw))))
        out.append(Pipeline(f"{name}, {UINT8}", train_uint8_transform(data, aug), f"{name}, {FLOAT}"))
    floats = eval_transform(*evaluation)
    out.append(Pipeline(f"{eval_name}, {FLOAT}", lambda raw: floats(pil_decode(raw))))
    out.append(Pipeline(f"{eval_name}, {UINT8}", eval_uint8_transform(*evaluation), f"{eval_name}, {FLOAT}"))
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


def device_pipelines() -> dict[str, object]:
    """data.decode=gpu's transforms: each recipe's training one and the evaluation's; the JFT crop's and
    the evaluation's again with their resizes image by image, the reference their batching is measured by."""
    named, eval_name, evaluation = named_recipes()
    out = {f"{name}, {GPU}": gpu_decode_transform(data, aug, train=True) for name, (data, aug) in named.items()}
    out[f"{eval_name}, {GPU}"] = gpu_decode_transform(*evaluation, train=False)
    for name in (next(iter(named)), eval_name):
        out[f"{name}, {GPU}, {IMAGE_BY_IMAGE}"] = image_by_image(out[f"{name}, {GPU}"])
    return out


def image_by_image(transform: InceptionCropUint8 | EvalResizeUint8) -> InceptionCropUint8 | EvalResizeUint8:
    """A copy of a data.decode=gpu transform that resizes its batch one image at a time."""
    ref = copy.copy(transform)
    if isinstance(transform, InceptionCropUint8):
        ref.crop_batch = lambda images, boxes, flips: torch.stack([ref.crop(*one) for one in zip(images, boxes, flips)])
    else:
        ref.on_batch = lambda images: torch.stack([ref.on_tensor(img) for img in images])
    return ref


def device_rates(jpegs: list[bytes], transform, device: torch.device, seconds: float) -> tuple[float, float]:
    """(images per CPU second of this process, images per wall second) of `decode_on_device` on
    batches of DEVICE_BATCH encoded images, over at least `seconds` of wall time after a warm-up."""
    images, _ = collate_encoded([(jpegs[i % len(jpegs)], 0) for i in range(DEVICE_BATCH)])

    def run() -> None:
        decode_on_device(images, transform, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run()
    done, cpu, wall = 0, time.process_time(), time.perf_counter()
    while time.perf_counter() - wall < seconds:
        run()
        done += DEVICE_BATCH
    return done / (time.process_time() - cpu), done / (time.perf_counter() - wall)


def run_bench(jpegs: list[bytes], seconds: float, rounds: int = 5, device: torch.device | None = None) -> list[dict]:
    """Rows of pipeline, images/s per core, the ratio to PIL decoding alone and, for a uint8
    pipeline, to the float pipeline it replaces. `seconds` per pipeline, split over `rounds`. With a
    device, data.decode=gpu's pipelines too, with their img/s on the device."""
    named = pipelines()
    on_device = device_pipelines() if device is not None else {}
    best = {p.name: 0.0 for p in named}
    best_device = {name: (0.0, 0.0) for name in on_device}
    with torch_threads(1):
        for _ in range(rounds):
            for p in named:
                best[p.name] = max(best[p.name], images_per_second(jpegs, p.run, seconds / rounds))
            for name, transform in on_device.items():
                rates = device_rates(jpegs, transform, device, seconds / rounds)
                best_device[name] = tuple(map(max, best_device[name], rates))
    reference = best[named[0].name]
    rows = [
        {"pipeline": p.name, "img_per_s_per_core": round(best[p.name], 1),
         "vs_decode_only": round(best[p.name] / reference, 3),
         "vs_float_path": round(best[p.name] / best[p.float_path], 3) if p.float_path else None,
         "device_img_per_s": None}
        for p in named
    ]
    return rows + [
        {"pipeline": f"{name} ({device.type})", "img_per_s_per_core": round(host, 1),
         "vs_decode_only": round(host / reference, 3), "vs_float_path": None, "device_img_per_s": round(rate, 1)}
        for name, (host, rate) in best_device.items()
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
    """Each row with `cores_per_device`: the CPU cores that feed one device at this training rate;
    and, for a pipeline on the device, `device_share`: the part of the device's time it takes."""
    return [{**r, "cores_per_device": round(img_s_per_device / r["img_per_s_per_core"], 2),
             "device_share": round(img_s_per_device / r["device_img_per_s"], 3) if r.get("device_img_per_s") else None}
            for r in rows]


# ---------------------------------------------------------------- output
def write_bench(rows: list[dict], csv_path: Path) -> list[Path]:
    """The rows as CSV, and a bar chart of images/s per core as PNG beside it."""
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(csv_path, csv_text(rows, [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]))
    fig, ax = pyplot().subplots(figsize=(8, 3.6))
    colours = ["tab:orange" if r.get("device_img_per_s") else "tab:green" if r["pipeline"].endswith(UINT8)
               else "tab:blue" for r in rows][::-1]
    ax.barh([r["pipeline"] for r in rows][::-1], [r["img_per_s_per_core"] for r in rows][::-1], color=colours)
    ax.set_xlabel(f"images/s per CPU core ({IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} JPEG, quality {QUALITY})")
    fig.tight_layout()
    png = csv_path.with_suffix(".png")
    save_figure(fig, png)
    return [csv_path, png]


def _optional(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def print_bench(rows: list[dict], jpegs: list[bytes], rate: dict | None) -> None:
    kib = sum(map(len, jpegs)) / len(jpegs) / 1024
    width, height = IMAGE_SIZE
    title = f"input pipelines, one CPU core, {len(jpegs)} synthetic {width}x{height} JPEGs ({kib:.0f} KiB)"
    table = Table(title=title)
    on_device = any(r.get("device_img_per_s") for r in rows)
    headers = ["pipeline", "img/s per core", "vs decode only", "vs float path"]
    headers += ["device img/s"] * on_device + ["cores per device"] * bool(rate) + ["device share"] * (
        on_device and bool(rate))
    for col in headers:
        table.add_column(col, justify="left" if col == "pipeline" else "right")
    for r in rows:
        cells = [r["pipeline"], f"{r['img_per_s_per_core']:.0f}", f"{r['vs_decode_only']:.2f}x",
                 f"{r['vs_float_path']:.2f}x" if r["vs_float_path"] else ""]
        cells += [_optional(r.get("device_img_per_s"), ".0f")] * on_device
        cells += [f"{r['cores_per_device']:.1f}"] * bool(rate)
        cells += [_optional(r.get("device_share"), ".0%")] * (on_device and bool(rate))
        table.add_row(*cells)
    console.print(table)
    if rate is None:
        console.print("cores per device: run `mixer benchmark --train` first, or pass --throughput N "
                      "(training img/s per device)", highlight=False)
        return
    console.print(f"cores per device: {rate['img_s_per_device']:.0f} training img/s per device ({rate['about']}) / "
                  "img/s per core; the uint8 rows leave float conversion and normalisation to the device"
                  + ("; device share: training img/s / device img/s, the part of the device's time the "
                     f"{GPU} pipeline takes" if on_device else ""), highlight=False)


def data_bench(images: int, seconds: float, out: Path | None = None, throughput: float | None = None,
               model: str | None = None, run_root: Path = Path("runs"), device: str | None = None) -> list[dict]:
    """The `mixer data bench` command: measure, print, and write the CSV and PNG when `out` is given.
    device: also time data.decode=gpu's pipelines there (cuda; cpu runs the same code on the CPU)."""
    if images < 1 or seconds <= 0:
        raise UserError("--images must be at least 1 and --seconds above 0")
    if throughput is not None and throughput <= 0:
        raise UserError(f"--throughput must be above 0 (training img/s per device), got {throughput}")
    given = {"img_s_per_device": throughput, "about": "--throughput"}
    rate = training_rate(run_root, model) if throughput is None else given
    if rate is None and model is not None:
        raise UserError(f"no `mixer benchmark --train` results for --model {model} under {run_root}/benchmark; "
                        f"run `mixer benchmark --train models=[{model}]` or pass --throughput N")
    if device is not None and not DEVICE.ok(device):
        raise UserError(f"--device must be {DEVICE.what}, got {device!r}")
    on = pick_device(device) if device is not None else None
    jpegs = synthetic_jpegs(images)
    rows = run_bench(jpegs, seconds, device=on)
    rows = add_cores_needed(rows, rate["img_s_per_device"]) if rate else rows
    print_bench(rows, jpegs, rate)
    if out is not None:
        for path in write_bench(rows, out):
            console.print(f"wrote {path}")
    return rows
