"""`mixer pretrain`: train a Mixer from scratch as a recipe describes (Sec. 3, Appendix B)."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf

from mixer_cli.config import load_run_config, make_run_dir, save_config, write_atomic
from mixer_cli.report import plot_curves, print_summary
from mixer_cli.train.datamodule import MixerDataModule
from mixer_cli.train.module import MixerClassifier, model_from_config
from mixer_cli.train.trainer import build_trainer


def total_steps(cfg: DictConfig, train_size: int) -> int:
    """Optimiser steps of the whole run (the schedule's length)."""
    if cfg.trainer.steps:
        return cfg.trainer.steps
    return max(train_size // cfg.data.global_batch, 1) * cfg.trainer.epochs


def pretrain(
    cfg: DictConfig, resume: Path | None = None, progress: bool = True, model=None, command: str = "pretrain"
) -> dict:
    """Train; returns the final metrics. With `resume`, continue that run from its last.ckpt.
    `model` (fine-tuning) replaces the config's fresh Mixer; `command` names the runs/ sub-folder."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model = model if model is not None else model_from_config(cfg)  # validates the spec before anything is written
    datamodule = MixerDataModule(cfg, device_batch=1)  # validates the data before anything is written
    steps = total_steps(cfg, datamodule.train_size)
    run_dir = resume if resume is not None else make_run_dir(cfg, command)
    try:
        trainer, plan = build_trainer(cfg, run_dir, progress=progress, resume=resume is not None)
        datamodule.device_batch = plan.device_batch
        datamodule.check_world(trainer.world_size)  # too few shards for ranks x workers: say so now
        if resume is None:
            save_config(cfg, run_dir)
    except BaseException:
        if resume is None:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    module = MixerClassifier(OmegaConf.to_container(cfg, resolve=True), steps, model=model)
    start = time.perf_counter()
    ckpt = run_dir / "last.ckpt" if resume is not None else None
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=False)
    results = _results(cfg, trainer, module, plan, steps, time.perf_counter() - start, run_dir)
    if trainer.is_global_zero:
        write_atomic(run_dir / "results.json", json.dumps(results, indent=2))
        plot_curves(run_dir / "metrics.csv", run_dir / "curves.png", title=f"mixer {command} {cfg.name}")
        print_summary(results)
    return results


def _results(cfg, trainer, module, plan, steps, seconds, run_dir) -> dict:
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    spec = module.model.spec
    return {
        "recipe": cfg.name,
        "model": cfg.model.variant
        or f"custom (patch {spec.patch_size}, C {spec.hidden_dim}, {spec.num_blocks} blocks)",
        "parameters": sum(p.numel() for p in module.model.parameters()),
        "data": cfg.data.source,
        "batch": plan.describe(),
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "planned_steps": steps,
        "train_seconds": round(seconds, 1),
        "train_loss": metrics.get("train/loss"),
        "test_top1": metrics.get("val/acc1"),
        "test_top5": metrics.get("val/acc5"),
        "test_samples": int(metrics["val/samples"]) if "val/samples" in metrics else None,  # = the split: exact
        # the last linear few-shot accuracies, when `fewshot.every_n_steps` logged them (Figure 4)
        **{f"fewshot_{k.removeprefix('fewshot/')}_top1": v for k, v in metrics.items() if k.startswith("fewshot/")},
        "run_dir": str(run_dir),
    }


def resume_config(run_dir: Path, overrides: list[str]) -> DictConfig:
    """The saved config of an earlier run, with `key=value` overrides (e.g. more epochs)."""
    cfg = load_run_config(run_dir)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    return cfg
