"""The device a command that runs outside Lightning (few-shot, benchmark) puts its model on."""
from __future__ import annotations

import torch

from mixer_cli.core.errors import UserError


def pick_device(name: str) -> torch.device:
    """`auto` (CUDA when torch sees a GPU, else the CPU), `cpu`, `cuda` or `cuda:N` (the schema's
    DEVICE rule checked the name); one line when this machine lacks the device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but torch sees no CUDA GPU here; use device=cpu")
    return device
