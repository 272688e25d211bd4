"""`mixer pretrain`: train a Mixer from scratch as a recipe describes (Sec. 3, Appendix B)."""
from __future__ import annotations

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from mixer_cli.models.mixer import Mixer
from mixer_cli.train.fit import fit, probes


def build_model(cfg: DictConfig) -> Mixer:
    """The config's Mixer (conf/model/mixer.yaml: a Table 1 variant or custom sizes), its head bias
    chosen by the loss (sigmoid cross-entropy starts every class at probability 1/K)."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the same initialisation for the same seed
    head_bias = instantiate(cfg.loss).initial_head_bias(cfg.data.num_classes)
    return instantiate(cfg.model, head_bias=head_bias)


def pretrain(cfg: DictConfig, progress: bool = True) -> dict:
    return fit(cfg, build_model(cfg), "pretrain", progress=progress, callbacks=probes(cfg))
