"""Optimiser parameter groups and the learning-rate schedule (Appendix B: pre-training; C: fine-tuning).

The optimiser itself is a config (`conf/optim/*.yaml`: `_target_: torch.optim.AdamW`, partial); the
LightningModule calls it on timm's weight-decay groups of the network (train/module.py).
"""
from __future__ import annotations

import math

import torch


def lr_factor(step: int, total: int, warmup: int, decay: str) -> float:
    """Multiplier of the peak lr at `step`: linear warmup from 0, then linear or cosine decay to 0."""
    warmup = min(warmup, total)
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    if decay == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, decay: str
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup for `warmup_steps`, then `decay` ("linear" or "cosine") to 0 at `total_steps`;
    stepped once per optimiser step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, decay))
