"""Mixup (Zhang et al., 2018) as the paper's recipes use it (Appendix B, Table 4: "mixup p").

One weight lam ~ Beta(p, p) per batch; every sample is mixed with its mirror in the batch, images
and targets alike, as timm's batch mode does. Targets are probability or multi-hot rows (B, K),
so multi-label data (JFT-300M) mixes too; timm's Mixup one-hot encodes integer labels and cannot.
"""
from __future__ import annotations

import torch


class BatchMixup:
    def __init__(self, p: float):
        if not 0 < p:
            raise ValueError(f"mixup needs p > 0, got {p}")
        self.p = p

    def sample_weight(self) -> float:
        # torch's global generator: seeded by Lightning, so runs repeat.
        return float(torch.distributions.Beta(self.p, self.p).sample())

    def __call__(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lam = self.sample_weight()
        return lam * x + (1 - lam) * x.flip(0), lam * targets + (1 - lam) * targets.flip(0)
