"""Optimiser and learning-rate schedule factories (Appendix B: pre-training; C: fine-tuning)."""
from __future__ import annotations

import math

import torch
from omegaconf import DictConfig
from torch import nn

from mixer_cli.errors import UserError


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay kernels only (matrices and conv filters), not biases or LayerNorm scales, as
    big_vision's `wd_mults` default does for the paper's models."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    keep = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def build_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.name == "adamw":
        return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas))
    if cfg.name == "sgd":
        return torch.optim.SGD(
            param_groups(model, cfg.get("weight_decay", 0.0)), lr=cfg.lr, momentum=cfg.momentum, nesterov=False
        )
    raise UserError(f"unknown optimiser {cfg.name!r}; choose one of: adamw, sgd")


def lr_factor(step: int, total: int, warmup: int, decay: str) -> float:
    """Multiplier of the peak lr at `step`: linear warmup from 0, then linear or cosine decay to 0."""
    warmup = min(warmup, total)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    progress = min(progress, 1.0)
    if decay == "linear":
        return 1.0 - progress
    if decay == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise UserError(f"unknown lr decay {decay!r}; choose one of: linear, cosine")


def build_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    decay = {"warmup_linear": "linear", "warmup_cosine": "cosine"}.get(cfg.name)
    if decay is None:
        raise UserError(f"unknown schedule {cfg.name!r}; choose one of: warmup_linear, warmup_cosine")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, cfg.warmup_steps, decay)
    )
