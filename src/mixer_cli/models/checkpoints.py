"""Load Mixers from files. Loading never executes code from a file (weights-only torch.load).

Formats: our Lightning checkpoints (spec and preprocessing recorded under the "mixer" key).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mixer_cli.errors import UserError
from mixer_cli.models.mixer import Mixer, MixerSpec, with_spec


def read_lightning_checkpoint(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a file that is not a checkpoint
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if "mixer" not in ckpt or "state_dict" not in ckpt:
        raise UserError(f"{path} is not a checkpoint written by mixer (no model spec inside)")
    return ckpt


def load_mixer(path: str | Path, **overrides) -> nn.Module:
    """The model a file describes, with its weights; `overrides` change spec fields that do not
    touch the weights' shapes (e.g. drop_path, gelu)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    ckpt = read_lightning_checkpoint(path)
    spec = with_spec(MixerSpec(**ckpt["mixer"]["spec"]), **overrides)
    model = Mixer(spec)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state, strict=True)
    model.preprocess = ckpt["mixer"]["preprocess"]
    return model
