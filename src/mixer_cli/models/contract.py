"""What the engine asks of a network beyond `nn.Module`.

Every network follows timm's model contract: `pretrained_cfg` (its evaluation preprocessing) and
`set_grad_checkpointing`. A network that can be rebuilt from a checkpoint without guessing (our
Mixer) also has a `spec`; others (the shuffle experiment's timm ResNet) are saved as weights only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from mixer_cli.core.errors import UserError
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


# Class names travel in timm's pretrained_cfg keys: `label_names` (a folder's sub-folder names, ImageNet's
# synset ids) and, where there is one, a longer `label_descriptions` (ImageNet's "tench, Tinca tinca").
LABEL_KEYS = ("label_names", "label_descriptions")
# How the head's logits become probabilities, as the model was trained: "softmax" (one class per image)
# or "sigmoid" (one yes/no per class). Files that record none are softmax-trained, as timm's are.
ACTIVATION_KEY = "head_activation"


def class_probabilities(logits: torch.Tensor, pretrained_cfg: dict) -> torch.Tensor:
    if pretrained_cfg.get(ACTIVATION_KEY) == "sigmoid":
        return logits.float().sigmoid()
    return logits.float().softmax(dim=-1)


def has_class_names(pretrained_cfg: dict) -> bool:
    return any(pretrained_cfg.get(key) for key in LABEL_KEYS)


def class_names(pretrained_cfg: dict) -> list[str]:
    """What a person reads for each class: the description, else the name, else the class index."""
    for key in ("label_descriptions", "label_names"):
        if pretrained_cfg.get(key):
            return list(pretrained_cfg[key])
    return [str(i) for i in range(pretrained_cfg["num_classes"])]


def with_class_names(pretrained_cfg: dict, names, descriptions=None) -> dict:
    """pretrained_cfg naming its classes (None: naming none); a count other than num_classes is a UserError."""
    cfg = {k: v for k, v in pretrained_cfg.items() if k not in LABEL_KEYS}
    for key, values in (("label_names", names), ("label_descriptions", descriptions)):
        if values is None:
            continue
        values = tuple(str(v) for v in values)
        if len(values) != cfg["num_classes"]:
            raise UserError(f"{len(values)} class names for a model of {cfg['num_classes']} classes")
        cfg[key] = values
    return cfg


def naming_classes(pretrained_cfg: dict, class_map: str | Path | None = None, data_names=None) -> dict:
    """pretrained_cfg with the names a command shows: a class map file's (the user's word wins), else the
    model's own, else the data's (an image folder's names for weights that carry none)."""
    if class_map:
        return with_class_names(pretrained_cfg, read_class_map(class_map, pretrained_cfg["num_classes"]))
    if has_class_names(pretrained_cfg) or not data_names:
        return pretrained_cfg
    return with_class_names(pretrained_cfg, data_names)


def read_class_map(path: Path, num_classes: int) -> tuple[str, ...]:
    """A class map file as timm's inference.py reads it: one name per line, in class order."""
    path = Path(path)
    try:
        names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--class-map {path}: cannot read it ({e.strerror or e})") from None
    if len(names) != num_classes:
        raise UserError(f"--class-map {path} names {len(names)} classes, the model has {num_classes}: "
                        "one name per line, in class order")
    return names
