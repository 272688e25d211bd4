"""What the engine asks of a network beyond `nn.Module`.

Every network follows timm's model contract: `pretrained_cfg` (its evaluation preprocessing) and
`set_grad_checkpointing`. A network that can be rebuilt from a checkpoint without guessing (our
Mixer) also has a `spec`; others (the shuffle experiment's timm ResNet) are saved as weights only.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import nn

from mixer_cli.models.mixer import variant_of


@runtime_checkable
class Specified(Protocol):
    spec: Any  # a MixerSpec: `to_dict()` records it
    pretrained_cfg: dict


def checkpoint_record(model: nn.Module) -> dict:
    """What our checkpoints store beside the weights so that loading needs no guessing."""
    if not isinstance(model, Specified):
        return {}
    return {"mixer": {"spec": model.spec.to_dict(), "pretrained_cfg": dict(model.pretrained_cfg)}}


def describe(model: nn.Module) -> str:
    """The network in a few words: its Table 1 variant, its sizes, or its class."""
    if not isinstance(model, Specified):
        return type(model).__name__
    s = model.spec
    return variant_of(s) or f"custom (patch {s.patch_size}, C {s.hidden_dim}, {s.num_blocks} blocks)"
