"""`mixer shuffle-experiment`: Mixer vs ResNet under fixed pixel shuffles (Sec. 3.4, Figure 4).

Three input pipelines, each one fixed permutation of the pixels applied to every image (train and
eval alike, after augmentation): `original`; `patch_pixel`, the order of the Mixer's P x P patches
permuted and the pixels inside every patch permuted by one shared permutation; `global_pixel`, all
pixels permuted. A Mixer is equivariant to `patch_pixel` (permute its stem kernels and token-mixing
weights to match and it computes the same function), so its curves match the original's; a ResNet's
convolutions rely on neighbouring pixels and suffer. Both suffer under `global_pixel`.
"""
from __future__ import annotations

import csv
import io
from functools import partial
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.table import Table
from safetensors.torch import save_file
from torch import nn
from torchvision.transforms import v2

from mixer_cli.commands.pretrain import build_model
from mixer_cli.config.run_dirs import Run
from mixer_cli.core.console import console
from mixer_cli.core.errors import UserError
from mixer_cli.core.files import csv_text
from mixer_cli.core.plots import pyplot, save_figure
from mixer_cli.evaluate.fewshot import fewshot_callback, fewshot_evaluator
from mixer_cli.reporting.runs import read_metrics
from mixer_cli.train.fit import build, build_datasets, check_data
from mixer_cli.train.launch import check_launch

PIPELINES = ("original", "patch_pixel", "global_pixel")


def patch_pixel_permutation(
    img_size: int, patch_size: int, patch_order: torch.Tensor, pixel_order: torch.Tensor
) -> torch.Tensor:
    """Flat pixel indices of the image whose patch s is input patch `patch_order[s]` with its
    pixels taken in `pixel_order` (row-major inside the patch): shuffled.flat = image.flat[perm]."""
    g, p = img_size // patch_size, patch_size
    # pixel index of (patch, position in patch), patches and positions both row-major
    by_patch = torch.arange(img_size * img_size).view(g, p, g, p).permute(0, 2, 1, 3).reshape(g * g, p * p)
    shuffled = by_patch[patch_order][:, pixel_order]
    return shuffled.view(g, g, p, p).permute(0, 2, 1, 3).reshape(-1)


def draw_permutations(img_size: int, patch_size: int, seed: int) -> dict[str, torch.Tensor]:
    """One fixed flat pixel permutation per pipeline, reproducible from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    num_patches = (img_size // patch_size) ** 2
    patch_order = torch.randperm(num_patches, generator=gen)
    pixel_order = torch.randperm(patch_size**2, generator=gen)
    return {
        "original": torch.arange(img_size * img_size),
        "patch_pixel": patch_pixel_permutation(img_size, patch_size, patch_order, pixel_order),
        "global_pixel": torch.randperm(img_size * img_size, generator=gen),
    }


class ShufflePixels(nn.Module):
    """The same pixel permutation for every image and every channel: (..., H, W) -> (..., H, W)."""

    def __init__(self, perm: torch.Tensor):
        super().__init__()
        self.register_buffer("perm", perm.long(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(-2)[..., self.perm].view(x.shape)

    def inverse(self) -> ShufflePixels:
        return ShufflePixels(torch.argsort(self.perm))


# ---------------------------------------------------------------------------------------------
# The experiment: every model under every pipeline, the few-shot curve of each, the drops.

MODELS = ("mixer", "resnet")
# Sec. 3.4: what the paper found, for each model and shuffled pipeline.
PAPER_FINDING = {
    ("mixer", "patch_pixel"): "none (curves match)",
    ("mixer", "global_pixel"): "~45%",
    ("resnet", "patch_pixel"): "large",
    ("resnet", "global_pixel"): "~75%",
}


def build_network(cfg: DictConfig, kind: str) -> nn.Module:
    """The Mixer of cfg.model or the ResNet of cfg.resnet (conf/resnet/), initialised from cfg.seed."""
    if kind == "mixer":
        return build_model(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    return instantiate(cfg.resnet)


def with_shuffle(dataset, shuffle: ShufflePixels):
    """The dataset with the pipeline's permutation after its own preprocessing; every data source
    (demo tensors, image folders, shards) keeps its per-image transform in `.transform`."""
    dataset.transform = v2.Compose([dataset.transform, shuffle])
    return dataset


def check_config(cfg: DictConfig) -> None:
    s = cfg.shuffle
    for key, allowed in (("models", MODELS), ("pipelines", PIPELINES)):
        unknown = [v for v in s[key] if v not in allowed]
        if unknown:
            raise UserError(f"shuffle.{key} must list some of {', '.join(allowed)}, got {list(s[key])}")
    if "original" not in s.pipelines:
        raise UserError("shuffle.pipelines must include original: the drops are measured against it")


def train_one(cfg: DictConfig, kind: str, pipeline: str, perm: torch.Tensor, run_dir: Path) -> dict:
    """Train one model on one pipeline from the same seed; returns its final numbers and its curve.
    The probe sees the pipeline's images too (the permutation applies to its batches)."""
    shuffle = ShufflePixels(perm)
    model = build_network(cfg, kind)
    job = build(cfg, model, build_datasets(cfg).map(partial(with_shuffle, shuffle=shuffle)), probe_transform=shuffle)
    run_dir.mkdir()
    results = job.run("shuffle-experiment", run_dir, progress=cfg.shuffle.progress)
    final = fewshot_evaluator(cfg, seeds=range(cfg.fewshot.seeds), transform=shuffle).run(model)
    return {
        "model": kind,
        "pipeline": pipeline,
        "fewshot": final["accuracy"][cfg.fewshot.shots],
        "top1": results["top1"],
        "steps": results["steps"],
        "train_seconds": results["train_seconds"],
        "curve": read_metrics(run_dir / "metrics.csv")[f"fewshot/{cfg.fewshot.shots}shot"],
    }


def relative_drop(value: float, original: float) -> float | None:
    """1 - value / original; None where the original pipeline scored 0 (too short a run to say)."""
    return 1 - value / original if original else None


def relative_drops(results: list[dict]) -> list[dict]:
    """Each run's drop against the same model's original pipeline: 1 - shuffled / original."""
    original = {r["model"]: r for r in results if r["pipeline"] == "original"}
    for r in results:
        base = original[r["model"]]
        r["fewshot_drop"] = relative_drop(r["fewshot"], base["fewshot"])
        r["top1_drop"] = relative_drop(r["top1"], base["top1"])
        r["paper"] = PAPER_FINDING.get((r["model"], r["pipeline"]), "")
    return results


def verdict(results: list[dict], tolerance: float, shots: int) -> str | None:
    """Sec. 3.4's qualitative finding on this run, when both models ran the patch + pixel pipeline."""
    drop = {r["model"]: r["fewshot_drop"] for r in results if r["pipeline"] == "patch_pixel"}
    if set(drop) != set(MODELS) or None in drop.values():
        return None
    holds = abs(drop["mixer"]) <= tolerance < drop["resnet"]
    return (
        f"{'holds' if holds else 'does NOT hold'}: under patch + pixel shuffling the Mixer's {shots}-shot drop is "
        f"{100 * drop['mixer']:+.1f}% (paper: none; tolerance {100 * tolerance:.0f}%), "
        f"the ResNet's {100 * drop['resnet']:+.1f}% (paper: large)"
    )


def run_experiment(cfg: DictConfig) -> list[dict]:
    """Figure 4: every model under every pipeline; writes the curves (CSV, PNG), the table
    (results.csv, results.json) and the permutations into a new run directory."""
    check_config(cfg)
    s = cfg.shuffle
    patch_size = build_network(cfg, "mixer").spec.patch_size  # validates the Mixer before anything is written
    if "resnet" in s.models:
        build_network(cfg, "resnet")
    fewshot_callback(cfg)  # validates the probe's data and shots before anything is written
    check_data(cfg, build_datasets(cfg).train, check_launch(cfg.trainer))  # e.g. too few shards for the workers
    perms = draw_permutations(cfg.data.img_size, patch_size, s.seed)
    with Run(cfg, "shuffle-experiment") as run:
        save_file({k: v.contiguous() for k, v in perms.items()}, run.path / "permutations.safetensors")
        runs = [(kind, pipeline) for kind in s.models for pipeline in s.pipelines]
        results = []
        for i, (kind, pipeline) in enumerate(runs, 1):
            console.rule(f"[bold]{kind} · {pipeline}[/] ({i}/{len(runs)})")
            results.append(train_one(cfg, kind, pipeline, perms[pipeline], run.path / f"{kind}-{pipeline}"))
        relative_drops(results)
        write_outputs(results, run, cfg)
    print_table(results, cfg.fewshot.shots, f"mixer shuffle-experiment {cfg.name}: {run.path}")
    finding = verdict(results, s.tolerance, cfg.fewshot.shots)
    if finding:
        console.print(f"Sec. 3.4 finding {finding}")
    return results


def write_outputs(results: list[dict], run: Run, cfg: DictConfig) -> None:
    shots = cfg.fewshot.shots
    curves = io.StringIO()
    writer = csv.writer(curves)
    writer.writerow(["model", "pipeline", "step", f"fewshot_{shots}shot"])
    for r in results:
        writer.writerows([r["model"], r["pipeline"], step, f"{acc:.4f}"] for step, acc in r["curve"])
    run.write("fewshot_curves.csv", curves.getvalue())
    keys = ["model", "pipeline", "fewshot", "fewshot_drop", "top1", "top1_drop", "paper", "steps", "train_seconds"]
    run.write("results.csv", csv_text(results, keys))
    plot_curves(results, run.path / "fewshot_curves.png", shots, title=f"mixer shuffle-experiment {cfg.name}")
    run.finish(results)


PIPELINE_LABEL = {"original": "original", "patch_pixel": "patch + pixel shuffling", "global_pixel": "global shuffling"}


def plot_curves(results: list[dict], out: Path, shots: int, title: str) -> None:
    """Figure 4's layout: one panel per model, linear k-shot accuracy against steps per pipeline."""
    models = list(dict.fromkeys(r["model"] for r in results))
    fig, axes = pyplot().subplots(1, len(models), figsize=(5 * len(models), 4), sharey=True, squeeze=False)
    for ax, kind in zip(axes[0], models):
        for r in (r for r in results if r["model"] == kind):
            steps, accs = zip(*r["curve"])
            ax.plot(steps, accs, marker="o", markersize=3, label=PIPELINE_LABEL[r["pipeline"]])
        ax.set(title={"mixer": "Mixer", "resnet": "ResNet"}[kind], xlabel="training steps")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0][0].set_ylabel(f"linear {shots}-shot accuracy")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, out)


def percent_change(drop: float | None) -> str:
    return "-" if drop is None else f"{100 * drop:+.1f}%"


def print_table(results: list[dict], shots: int, title: str) -> None:
    table = Table(title=title, title_style="bold")
    for name in ("model", "pipeline", f"{shots}-shot", "drop", "test top-1", "drop", "paper's drop", "steps"):
        table.add_column(name, justify="left" if name in ("model", "pipeline", "paper's drop") else "right")
    for r in results:
        table.add_row(
            r["model"], PIPELINE_LABEL[r["pipeline"]], f"{100 * r['fewshot']:.1f}%", percent_change(r["fewshot_drop"]),
            f"{100 * r['top1']:.1f}%", percent_change(r["top1_drop"]), r["paper"], f"{r['steps']:,}",
        )
    console.print(table)
