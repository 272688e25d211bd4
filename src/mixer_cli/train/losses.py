"""The two classification losses of the paper's code (config group `loss`).

Both take logits (B, K) and targets as class indices (B,) or as rows of weights (B, K): one-hot,
mixup-mixed, or multi-hot for multi-label data such as JFT-300M.
- softmax: cross-entropy against the target rows normalised to sum 1.
- sigmoid: K independent binary cross-entropies, summed over classes, averaged over the batch
  (big_vision's `sigmoid_xent`). Trained from scratch, its head bias starts at -log(K) so every
  class begins at probability about 1/K (big_vision's configs/mlp_mixer_i1k.py: head bias -6.9
  for 1,000 classes); softmax needs no such start.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def target_rows(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class indices (B,) -> one-hot rows (B, K); rows pass through."""
    if targets.ndim == 1:
        return F.one_hot(targets.long(), num_classes).float()
    return targets.float()


class SoftmaxCrossEntropy(nn.Module):
    activation = "softmax"  # how the trained head's logits become probabilities (mixer predict)

    def initial_head_bias(self, num_classes: int) -> float:
        return 0.0

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.ndim == 1:
            return F.cross_entropy(logits, targets.long())
        rows = targets.float()
        rows = rows / rows.sum(dim=1, keepdim=True).clamp_min(1e-12)  # multi-hot rows share the mass
        return -(rows * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


class SigmoidCrossEntropy(nn.Module):
    activation = "sigmoid"

    def initial_head_bias(self, num_classes: int) -> float:
        return -math.log(num_classes)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows = target_rows(targets, logits.shape[1])
        per_class = F.binary_cross_entropy_with_logits(logits.float(), rows, reduction="none")
        return per_class.sum(dim=1).mean()
