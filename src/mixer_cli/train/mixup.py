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

import torch


class BatchMixup:
    def __init__(self, p: float):
        if not 0 < p:
            raise ValueError(f"mixup needs p > 0, got {p}")
        self.p = p

    def sample_weight(self) -> float:
        """The original image's share: the larger of the two Dirichlet weights, so in [0.5, 1]. torch's
        global generator draws it: seeded by Lightning, so runs repeat."""
        lam = float(torch.distributions.Beta(self.p, self.p).sample())
        return max(lam, 1 - lam)

    def __call__(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lam = self.sample_weight()
        return lam * x + (1 - lam) * x.roll(1, 0), lam * targets + (1 - lam) * targets.roll(1, 0)
