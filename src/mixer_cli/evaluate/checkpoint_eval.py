"""`mixer eval --from CKPT`: top-1, top-5 and ReaL top-1 of a checkpoint on a data set's evaluation split.

Any file `load_mixer` reads is evaluated with the preprocessing it records (resolution, mean/std,
interpolation, crop); conf/eval.yaml leaves those values null so that the checkpoint's fill them,
and a value the user sets wins. Every image of the split is counted exactly once: no padding, no
dropped last batch. With `data.real_labels=real.json` the ImageNet validation images are scored
against the reassessed labels as well (evaluate/real_labels.py).
"""
from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from torchmetrics.classification import MulticlassAccuracy

from mixer_cli.config import make_run_dir, save_config, write_atomic
from mixer_cli.errors import UserError
from mixer_cli.evaluate.real_labels import (
    FolderWithImageNumbers,
    RealTop1,
    image_numbers,
    read_real_labels,
    with_image_numbers,
)
from mixer_cli.report import console, print_summary


def with_checkpoint_preprocessing(cfg: DictConfig, data_config: dict) -> DictConfig:
    """A copy of cfg whose null preprocessing values are the checkpoint's, given as timm's data
    config of the model (`timm.data.resolve_data_config({}, model=model)`)."""
    channels, height, _ = data_config["input_size"]
    from_checkpoint = {
        "data.channels": channels,
        "data.img_size": height,
        "data.mean": list(data_config["mean"]),
        "data.std": list(data_config["std"]),
        "data.interpolation": data_config["interpolation"],
        "aug.eval_crop_mode": data_config["crop_mode"],
        "aug.eval_crop_pct": data_config["crop_pct"],
    }
    cfg = copy.deepcopy(cfg)
    for key, value in from_checkpoint.items():
        if OmegaConf.select(cfg, key) is None:
            OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def check_fits(pretrained_cfg: dict, data: DictConfig, checkpoint: Path) -> None:
    """The data must have the checkpoint's classes and input shape; say so before reading any image."""
    channels, size, _ = pretrained_cfg["input_size"]
    if pretrained_cfg["num_classes"] != data.num_classes:
        raise UserError(f"{checkpoint} predicts {pretrained_cfg['num_classes']} classes, the data has "
                        f"data.num_classes={data.num_classes}; evaluate it on its own label space, or fine-tune it "
                        "first (mixer finetune --from ...)")
    if (data.channels, data.img_size) != (channels, size):
        raise UserError(f"{checkpoint} takes {channels}-channel {size}x{size} images, the config asks for "
                        f"{data.channels}-channel {data.img_size}x{data.img_size}; leave data.img_size unset to use "
                        "the checkpoint's, or grow the model first (mixer finetune --res)")


def default_name(checkpoint: Path) -> str:
    """The checkpoint's name; a run's last.ckpt or best.ckpt is named after its run (demo-last)."""
    run_config = checkpoint.parent / "config.yaml"
    run_name = OmegaConf.load(run_config).get("name") if run_config.is_file() else None
    return f"{run_name}-{checkpoint.stem}" if run_name else checkpoint.stem


def variant_of(model) -> str:
    from mixer_cli.models import VARIANTS

    spec = model.spec
    return next((name for name, fields in VARIANTS.items() if all(getattr(spec, k) == v for k, v in fields.items())),
                "custom")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, num_classes: int, device: torch.device,
             real: RealTop1 | None = None) -> dict:
    """One pass over the loader: top-1, top-5 and the number of images (and ReaL top-1 when `real`
    is given, for batches of (image, label, image number or key))."""
    top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro").to(device)
    top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro").to(device)
    real = real.to(device) if real is not None else None
    seen = 0
    model.eval().to(device)
    columns = (TextColumn("evaluating"), BarColumn(), MofNCompleteColumn(), TextColumn("images"))
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("eval", total=getattr(loader.dataset, "num_samples", None) or _len(loader.dataset))
        for x, y, *names in loader:
            logits = model(x.to(device))
            y = y.to(device)
            top1.update(logits, y)
            top5.update(logits, y)
            if real is not None:
                if not names:
                    raise UserError("this data source yields no image names, which ReaL labels need")
                numbers = names[0] if isinstance(names[0], torch.Tensor) else image_numbers(names[0])
                real.update(logits, numbers)
            seen += len(y)
            progress.advance(task, len(y))
    if seen == 0:
        raise UserError("the evaluation split holds no images; check data.eval_path")
    measured = {"top1": float(top1.compute()), "top5": float(top5.compute()), "num_samples": seen}
    if real is not None:
        counted = int(real.total)
        measured |= {"real_top1": float(real.compute()) if counted else None, "real_num_samples": counted}
    return measured


def _len(dataset) -> int | None:
    try:
        return len(dataset)
    except TypeError:  # a stream (shards) knows its length only when its index says so
        return None


def evaluate_checkpoint(cfg: DictConfig, checkpoint: Path) -> dict:
    """Evaluate the checkpoint on cfg.data's evaluation split; print a table and write
    runs/eval/<timestamp>-<name>/{config.yaml, results.json}. Returns the results."""
    from timm.data import resolve_data_config

    from mixer_cli.data import build_dataset
    from mixer_cli.evaluate.fewshot import make_loader
    from mixer_cli.models import load_mixer

    checkpoint = Path(checkpoint).resolve()
    model = load_mixer(checkpoint)
    cfg = with_checkpoint_preprocessing(cfg, resolve_data_config({}, model=model))
    cfg.name = cfg.name or default_name(checkpoint)
    check_fits(model.pretrained_cfg, cfg.data, checkpoint)
    real = RealTop1(read_real_labels(cfg.data.real_labels)) if cfg.data.get("real_labels") else None
    dataset = build_dataset(cfg.data, cfg.aug, "test")
    if real is not None:
        dataset = with_image_numbers(dataset)
        if isinstance(dataset, FolderWithImageNumbers):  # a folder's names are known now: check before the pass
            real.check(torch.tensor(dataset.numbers))
    start = time.perf_counter()
    loader = make_loader(dataset, cfg.eval.batch_size, cfg.data.get("num_workers", 0))
    measured = evaluate(model, loader, cfg.data.num_classes, pick_device(cfg.eval.device), real)
    results = {
        "command": "eval", "name": cfg.name, "from": str(checkpoint),
        "model": variant_of(model), "parameters": sum(p.numel() for p in model.parameters()),
        "data": cfg.data.source, "eval_path": cfg.data.get("eval_path"), "num_classes": cfg.data.num_classes,
        "preprocessing": {"img_size": cfg.data.img_size, "mean": list(cfg.data.mean), "std": list(cfg.data.std),
                          "interpolation": cfg.data.interpolation, "crop_mode": cfg.aug.eval_crop_mode,
                          "crop_pct": cfg.aug.eval_crop_pct},
        **measured,
        "eval_seconds": round(time.perf_counter() - start, 1),
    }
    run_dir = make_run_dir(cfg, "eval")
    try:  # written only once everything is measured; results.json last: its presence means complete
        results["run_dir"] = str(run_dir)
        save_config(cfg, run_dir)
        write_atomic(run_dir / "results.json", json.dumps(results, indent=2))
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    print_eval(results)
    return results


def print_eval(results: dict) -> None:
    p = results["preprocessing"]
    shown = {k: results[k] for k in ("top1", "top5", "real_top1", "num_samples", "real_num_samples") if k in results}
    shown["preprocessing"] = (f"{p['img_size']}px, {p['interpolation']}, {p['crop_mode']} crop {p['crop_pct']:g}, "
                              f"mean {p['mean']}, std {p['std']}")
    print_summary(shown, title=f"mixer eval {results['name']} ({results['model']}, {results['data']})")
    console.print(f"results: {results['run_dir']}/results.json", highlight=False)
