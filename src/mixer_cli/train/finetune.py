"""`mixer finetune`: fine-tune a pre-trained Mixer on a target (Sec. 3, Appendix C, following ViT).

The body comes from the checkpoint; the head is new and zero-initialised for the target's classes;
a higher resolution grows the token-mixing MLPs by Appendix C. The optimiser, schedule and
clipping come from the config (conf/finetune.yaml: momentum SGD, warmup + cosine, no weight decay,
clip 1); the loop is the pre-training loop. A sweep (`--multirun`) runs one fine-tune per point of
the grid and ends with one table, as the paper picks the lr from {0.003, 0.01, 0.03, 0.06}.
"""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from mixer_cli.config import compose, expand_sweep, is_global_zero_process, make_run_dir, write_atomic
from mixer_cli.errors import UserError
from mixer_cli.models import load_mixer
from mixer_cli.models.mixer import VARIANTS, Mixer, with_spec
from mixer_cli.models.resize import grow_resolution
from mixer_cli.report import csv_text
from mixer_cli.train.pretrain import pretrain, resume_config


def new_head(model: Mixer, num_classes: int) -> Mixer:
    """The same body with a zero-initialised head (weights and bias) for `num_classes` classes."""
    fresh = Mixer(with_spec(model.spec, num_classes=num_classes, head_bias=0.0))
    body = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    missing, unexpected = fresh.load_state_dict(body, strict=False)
    assert not unexpected and all(k.startswith("head.") for k in missing)
    fresh.preprocess = model.preprocess
    return fresh


def check_variant(model: Mixer, variant: str | None, path: Path) -> None:
    """A recipe for one row of Table 2 (e.g. ft_i21k_l16_448) names the Mixer it fine-tunes."""
    if variant is None:
        return
    spec = model.spec
    have = {k: getattr(spec, k) for k in VARIANTS[variant]}
    if have != VARIANTS[variant]:
        raise UserError(
            f"this recipe fine-tunes a Mixer-{variant}, but {path} holds patch {spec.patch_size}, width "
            f"{spec.hidden_dim}, {spec.num_blocks} blocks; pass a {variant} checkpoint or override model.variant=null"
        )


def finetune_model(cfg: DictConfig, path: Path) -> Mixer:
    """The checkpoint's Mixer, with a new head for the target and grown to data.img_size."""
    m = cfg.model
    options = {"dropout": m.dropout, "drop_path": m.drop_path} | ({"gelu": m.gelu} if m.gelu else {})
    model = load_mixer(path, **options)
    check_variant(model, m.variant, path)
    if model.spec.in_chans != cfg.data.channels:
        raise UserError(f"{path} takes {model.spec.in_chans}-channel images, the data has {cfg.data.channels}")
    model = new_head(model, cfg.data.num_classes)
    if cfg.data.img_size != model.spec.img_size:
        model = grow_resolution(model, cfg.data.img_size)
    model.set_grad_checkpointing(m.grad_checkpointing)
    return model


def finetune(cfg: DictConfig, progress: bool = True, model: Mixer | None = None) -> dict:
    """One fine-tuning run; returns its final metrics (results.json of its run directory)."""
    if model is None:
        model = finetune_model(cfg, checkpoint_path(cfg))
    return pretrain(cfg, progress=progress, model=model, command="finetune")


def resume_finetune(run_dir: Path, overrides: list[str], progress: bool = True) -> dict:
    """Continue a fine-tune from its last.ckpt: the model is rebuilt from the spec recorded there
    (head and resolution included), then Lightning restores weights, optimiser and schedule."""
    if not (run_dir / "last.ckpt").is_file():
        raise UserError(f"nothing to resume in {run_dir}: no last.ckpt there")
    cfg = resume_config(run_dir, overrides)
    model = load_mixer(run_dir / "last.ckpt", dropout=cfg.model.dropout, drop_path=cfg.model.drop_path)
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    return pretrain(cfg, resume=run_dir, progress=progress, model=model, command="finetune")


def checkpoint_path(cfg: DictConfig) -> Path:
    if not cfg.checkpoint:
        raise UserError("fine-tuning needs a pre-trained model: --from CKPT (.ckpt, .npz, .pth or .safetensors)")
    return Path(cfg.checkpoint)


def compose_sweep(overrides: list[str]) -> list[tuple[list[str], DictConfig]]:
    """Every point of the sweep, composed (and so checked) before any of them runs; each run is
    named after the values that vary, e.g. ft_cifar10_lr0.003."""
    points = expand_sweep(overrides)
    configs = []
    for point in points:
        cfg = compose(point, config_name="finetune")
        label = "_".join(f"{key.rsplit('.', 1)[-1]}{value}" for key, value in varying(point, points).items())
        if label:
            cfg.name = f"{cfg.name}_{label}"
        configs.append((point, cfg))
    return configs


def sweep(overrides: list[str], progress: bool = True) -> list[dict]:
    """Run every point of a Hydra sweep in turn; one table (and sweep.csv) across them at the end."""
    points = compose_sweep(overrides)
    first = finetune_model(points[0][1], checkpoint_path(points[0][1]))  # a bad --from fails before any output
    base = compose(points[0][0], config_name="finetune")
    base.name = f"{base.name}-sweep"
    sweep_dir = make_run_dir(base, "finetune")
    grid = [p for p, _ in points]
    swept = list(varying(grid[0], grid))
    rows = []
    for i, (point, cfg) in enumerate(points):
        results = finetune(cfg, progress=progress, model=first if i == 0 else None)
        rows.append({**varying(point, grid), **results})
        if is_global_zero_process():
            write_atomic(sweep_dir / "sweep.json", json.dumps(rows, indent=2))
    if is_global_zero_process():
        write_atomic(sweep_dir / "sweep.csv", csv_text(rows))
        print_sweep(rows, swept, sweep_dir)
    return rows


def varying(point: list[str], points: list[list[str]]) -> dict[str, str]:
    """The overrides of `point` that differ across the sweep, as {key: value}."""
    keys = {}
    for i, override in enumerate(point):
        if any(p[i] != override for p in points):
            key, _, value = override.partition("=")
            keys[key] = value
    return keys


def print_sweep(rows: list[dict], keys: list[str], sweep_dir: Path) -> None:
    """One row per run: the swept values, then its results; the best test top-1 in green."""
    best = max(range(len(rows)), key=lambda i: rows[i].get("test_top1") or 0.0)
    table = Table(title=f"Sweep: {len(rows)} runs ({sweep_dir})", title_style="bold")
    for k in keys:
        table.add_column(k, style="cyan")
    for k in ("test top-1", "test top-5", "train loss", "steps", "run dir"):
        table.add_column(k, justify="right" if k != "run dir" else "left")
    for i, r in enumerate(rows):
        pct = [f"{100 * r[k]:.2f}%" if r.get(k) is not None else "-" for k in ("test_top1", "test_top5")]
        loss = f"{r['train_loss']:.4g}" if r.get("train_loss") is not None else "-"
        cells = [*(r[k] for k in keys), *pct, loss, f"{r['steps']:,}", r["run_dir"]]
        table.add_row(*cells, style="bold green" if i == best else None)
    Console().print(table)


def command_overrides(overrides: list[str], checkpoint: Path | None, res: int | None) -> list[str]:
    """The command line's options as overrides: --from sets checkpoint, --res sets data.img_size."""
    extra = []
    if checkpoint is not None:
        extra.append(f"checkpoint='{Path(checkpoint).resolve()}'")  # quoted: any path is one Hydra value
    if res is not None:
        extra.append(f"data.img_size={res}")
    return [*overrides, *extra]
