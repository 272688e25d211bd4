"""Mixup (Zhang et al., 2018) as the paper's recipes use it (Appendix B, Table 4: "mixup p").

As big_vision's `utils.mixup`, which the authors' recipes call: one weight per batch from
Dirichlet([p, p]) = Beta(p, p), sorted so the larger share stays on the original image, and every
sample is mixed with its neighbour in the batch rolled by one, images and targets alike. The roll
gives every image two different partners (the one before and the one after it); timm's mirror
(`flip(0)`) pairs i with B-1-i both ways, so near weight 0.5 the batch holds each mix twice.
Targets are probability or multi-hot rows (B, K), so multi-label data (JFT-300M) mixes too; timm's
Mixup one-hot encodes integer labels and cannot.
"""
from __future__ import annotations

import numpy as np
import torch

from mixer_cli.data.order import derived_seed


class BatchMixup:
    """One weight per global batch, drawn from (seed, optimiser step): every rank and accumulation slot
    mixes its micro-batch with the same weight. Partners are neighbours within the micro-batch, as in
    the authors' code, where each device mixed its own share of the batch."""

    def __init__(self, p: float, seed: int = 0):
        if not 0 < p:
            raise ValueError(f"mixup needs p > 0, got {p}")
        self.p, self.seed = p, seed

    def sample_weight(self, step: int) -> float:
        """The original image's share at `step`: the larger of the two Dirichlet weights, so in [0.5, 1]."""
        lam = float(np.random.default_rng(derived_seed(self.seed, "mixup", step)).beta(self.p, self.p))
        return max(lam, 1 - lam)

    def __call__(self, x: torch.Tensor, targets: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        lam = self.sample_weight(step)
        return lam * x + (1 - lam) * x.roll(1, 0), lam * targets + (1 - lam) * targets.roll(1, 0)
