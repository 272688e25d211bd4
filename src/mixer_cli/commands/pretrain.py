"""`mixer pretrain`: train a Mixer from scratch as a recipe describes (Sec. 3, Appendix B)."""
from __future__ import annotations

from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from mixer_cli.commands.sweep import multirun
from mixer_cli.config.compose import compose
from mixer_cli.models.mixer import Mixer
from mixer_cli.train.fit import build, build_datasets
from mixer_cli.train.fit import resume as resume_run


def build_model(cfg: DictConfig) -> Mixer:
    """The config's Mixer (conf/model/mixer.yaml: a Table 1 variant or custom sizes), its head bias
    chosen by the loss (sigmoid cross-entropy starts every class at probability 1/K)."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the same initialisation for the same seed
    head_bias = instantiate(cfg.loss).initial_head_bias(cfg.data.num_classes)
    return instantiate(cfg.model, head_bias=head_bias)


def pretrain(cfg: DictConfig, progress: bool = True, run_dir: Path | None = None) -> dict:
    return build(cfg, build_model(cfg), build_datasets(cfg)).run("pretrain", run_dir, progress)


def sweep_point(cfg: DictConfig, run_dir: Path) -> dict:
    return pretrain(cfg, progress=False, run_dir=run_dir)


def run_pretrain(overrides: list[str], resume_dir: Path | None = None, sweep: bool = False) -> None:
    """`mixer pretrain`: a new run, a sweep of runs (`--multirun`), or a stopped run continued (`--resume`)."""
    if resume_dir is not None:
        resume_run(resume_dir, overrides, "pretrain")
    elif sweep:
        multirun("pretrain", "config", overrides, sweep_point)
    else:
        pretrain(compose(overrides))
