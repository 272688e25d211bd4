"""`mixer fewshot`: transfer a frozen checkpoint to a data set by the linear few-shot probe.

One feature pass covers every shot count and seed: the train examples any sample needs, and the
test split. The checkpoint's recorded preprocessing (resolution, mean/std, crop) is applied to the
data, with evaluation transforms on both splits (no augmentation of the few-shot samples).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.table import Table

from mixer_cli.config import make_run_dir, save_config, write_atomic
from mixer_cli.errors import UserError
from mixer_cli.evaluate.fewshot import (
    DEFAULT_L2,
    check_counts,
    extract_features,
    extract_train_pool,
    fewshot_accuracies,
    labels_of,
    make_loader,
)
from mixer_cli.report import console, csv_text, pyplot, save_figure

PREPROCESS_KEYS = {"img_size": "data", "channels": "data", "mean": "data", "std": "data",
                   "interpolation": "data", "eval_crop": "aug", "eval_resize": "aug"}


def parse_shots(text: str) -> list[int]:
    """'5' or '1,5,10,25' -> sorted distinct shot counts."""
    try:
        shots = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise UserError(f"--shots takes whole numbers separated by commas, e.g. --shots 1,5,10,25; got {text!r}") \
            from None
    if not shots or shots[0] < 1:
        raise UserError(f"--shots must be at least 1, e.g. --shots 1,5,10,25; got {text!r}")
    return shots


def with_checkpoint_preprocessing(cfg: DictConfig, preprocess: dict) -> DictConfig:
    """The config with the data and aug values the checkpoint was trained with: loading needs no guessing."""
    cfg = cfg.copy()
    for key, group in PREPROCESS_KEYS.items():
        if preprocess.get(key) is not None:
            OmegaConf.update(cfg, f"{group}.{key}", preprocess[key], force_add=True)
    return cfg


def eval_dataset(data: DictConfig, aug: DictConfig, split: str):
    """The split with evaluation preprocessing (the few-shot train sample is not augmented)."""
    from mixer_cli.data import build_dataset

    return build_dataset(data, aug, split, augment=False)


def resolve_l2(value) -> float | None:
    """A positive number, or None for 'select' (chosen on held-out train examples)."""
    if isinstance(value, str) and value.strip().lower() == "select":
        return None
    try:
        l2 = float(value)
    except (TypeError, ValueError):
        raise UserError(f"fewshot.l2 must be a positive number (default {DEFAULT_L2:g}) or 'select', not {value!r}") \
            from None
    if l2 <= 0:
        raise UserError(f"fewshot.l2 must be positive (default {DEFAULT_L2:g}) or 'select', not {value!r}")
    return l2


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and spread over seeds for every shot count."""
    summary = []
    for k in sorted({r["shots"] for r in rows}):
        acc = np.array([r["accuracy"] for r in rows if r["shots"] == k])
        l2s = sorted({r["l2"] for r in rows if r["shots"] == k})
        summary.append({
            "shots": k, "mean": float(acc.mean()), "std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "min": float(acc.min()), "max": float(acc.max()), "seeds": len(acc), "l2": l2s,
        })
    return summary


def fewshot(cfg: DictConfig, checkpoint: Path, shots: list[int]) -> dict:
    """Few-shot accuracy of the frozen checkpoint on cfg.data, for every shot count and seed."""
    from mixer_cli.models import load_mixer

    f = cfg.fewshot
    l2 = resolve_l2(f.l2)
    if f.seeds < 1:
        raise UserError(f"fewshot.seeds must be at least 1, got {f.seeds}")
    held_out = f.held_out if l2 is None else 0
    if l2 is None and held_out < 1:
        raise UserError("fewshot.l2=select needs fewshot.held_out >= 1 examples per class to choose on")
    model = load_mixer(checkpoint)
    cfg = with_checkpoint_preprocessing(cfg, getattr(model, "preprocess", {}) or {})
    train_set = eval_dataset(cfg.data, cfg.aug, "train")
    test_set = eval_dataset(cfg.data, cfg.aug, "test")
    labels = labels_of(train_set)
    if labels is not None:  # a mistake is reported before anything is written or computed
        check_counts(labels, max(shots), cfg.data.num_classes, held_out)
    model.to(pick_device(f.device))
    run_dir = make_run_dir(cfg, "fewshot")
    try:  # a stream (shards) shows a class with too few examples only now: leave no half-written run
        save_config(cfg, run_dir)
        seeds = list(range(f.seeds))
        pool = extract_train_pool(model, train_set, max(shots), seeds, cfg.data.num_classes,
                                  f.batch_size, f.num_workers, held_out=held_out)
        test_x, test_y = extract_features(model, make_loader(test_set, f.batch_size, f.num_workers))
        rows = fewshot_accuracies(pool, test_x, test_y, cfg.data.num_classes, shots, l2, held_out)
        results = {
            "checkpoint": str(checkpoint), "data": cfg.data.source, "num_classes": cfg.data.num_classes,
            "feature_dim": int(test_x.shape[1]), "test_examples": len(test_y),
            "l2": "select" if l2 is None else l2, "summary": summarise(rows), "runs": rows, "run_dir": str(run_dir),
        }
        write_atomic(run_dir / "fewshot.csv", csv_text(rows, ["shots", "seed", "l2", "accuracy"]))
        plot_fewshot(results["summary"], run_dir / "fewshot.png", title=f"linear few-shot, {cfg.data.source}")
        write_atomic(run_dir / "results.json", json.dumps(results, indent=2))  # last: its presence means complete
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    print_fewshot(results)
    return results


def print_fewshot(results: dict) -> None:
    table = Table(title=f"Linear few-shot top-1 ({results['data']}, {results['num_classes']} classes, "
                        f"{results['test_examples']:,} test images)", title_style="bold")
    for column in ("shots", "mean", "± std", "min", "max", "seeds", "l2"):
        table.add_column(column, justify="right")
    for s in results["summary"]:
        table.add_row(str(s["shots"]), f"{100 * s['mean']:.2f}%", f"{100 * s['std']:.2f}", f"{100 * s['min']:.2f}%",
                      f"{100 * s['max']:.2f}%", str(s["seeds"]), ", ".join(f"2^{np.log2(v):g}" for v in s["l2"]))
    console.print(table)
    console.print(f"results: {results['run_dir']}/results.json")


def plot_fewshot(summary: list[dict], out: Path, title: str) -> None:
    """Accuracy against shots (log scale), mean and min-max over seeds."""
    shots = [s["shots"] for s in summary]
    mean = np.array([s["mean"] for s in summary])
    fig, ax = pyplot().subplots(figsize=(5, 4))
    ax.errorbar(shots, mean, yerr=[mean - [s["min"] for s in summary], [s["max"] for s in summary] - mean],
                marker="o", capsize=3)
    ax.set(xscale="log", xlabel="shots per class", ylabel="top-1 accuracy", title=title)
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out)


def fewshot_callback(cfg: DictConfig):
    """The FewShotCallback that `mixer pretrain fewshot.every_n_steps=N` asks for: probes the
    pre-training data's own splits (eval transforms), or the data set `fewshot.data` names, drawn at
    the pre-training resolution and normalisation."""
    from mixer_cli.config import package_root
    from mixer_cli.evaluate.fewshot import FewShotCallback

    f = cfg.fewshot
    data = cfg.data
    if f.get("data"):
        path = package_root() / "conf" / "data" / f"{f.data}.yaml"
        if not path.is_file():
            names = sorted(p.stem for p in path.parent.glob("*.yaml"))
            raise UserError(f"unknown fewshot.data {f.data!r}; choose one of: {', '.join(names)}")
        data = OmegaConf.merge(OmegaConf.load(path), {k: cfg.data[k] for k in ("img_size", "channels", "mean", "std")})
    shots = [f.shots] if isinstance(f.shots, int) else list(f.shots)
    l2 = resolve_l2(f.l2)
    if l2 is None:
        raise UserError("fewshot.l2=select is for `mixer fewshot`; during pre-training give a number (default 1024)")
    return FewShotCallback(
        eval_dataset(data, cfg.aug, "train"), eval_dataset(data, cfg.aug, "test"), shots=shots,
        every_n_steps=f.every_n_steps, l2=l2, seed=f.get("seed", 0), batch_size=f.get("batch_size", 256),
        num_workers=data.get("num_workers", 0), num_classes=data.num_classes,
    )
