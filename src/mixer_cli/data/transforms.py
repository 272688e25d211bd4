"""Image transforms from the `aug` config group (PAPER.md, Pre-training and Fine-tuning).

Training: the Inception crop (random area and aspect ratio, resized to the model's resolution) and a
horizontal flip for JFT; ImageNet / ImageNet-21k add RandAugment (2 layers, magnitude m), both from
timm. Mixup mixes whole batches, so it lives in the training step (train/module.py), not here.
Evaluation: "resize-crop" (resize to eval_resize x eval_resize, centre crop) or "resmall-crop"
(shorter side to eval_resize, centre crop), or "none" (resize straight to the model's resolution).
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig
from timm.data import create_transform
from timm.data.transforms import MaybeToTensor, str_to_interp_mode
from torchvision import transforms as T
from torchvision.transforms import v2

from mixer_cli.errors import UserError

EVAL_CROPS = ("resize-crop", "resmall-crop", "none")


def randaugment_policy(aug: DictConfig) -> str | None:
    """timm's RandAugment string for `randaug_layers` ops at magnitude `randaug_magnitude` (0 = off)."""
    if not aug.get("randaug_magnitude"):
        return None
    return f"rand-m{aug.randaug_magnitude}-n{aug.randaug_layers}"


def train_transform(data: DictConfig, aug: DictConfig):
    """PIL image -> normalised float tensor (C, img_size, img_size), randomly augmented."""
    if aug.get("inception_crop"):
        return create_transform(
            data.img_size,
            is_training=True,
            scale=(aug.get("crop_area_min", 0.08), 1.0),
            hflip=0.5 if aug.get("hflip") else 0.0,
            color_jitter=None,  # timm's default jitter is no part of the paper's recipes
            auto_augment=randaugment_policy(aug),
            interpolation=data.interpolation,
            mean=tuple(data.mean),
            std=tuple(data.std),
        )
    if randaugment_policy(aug):
        raise UserError("RandAugment runs after the Inception crop; set aug.inception_crop=true or randaug_magnitude=0")
    # Without the Inception crop (the demo digits): resize, then the optional pad-and-crop shift.
    steps = [T.Resize((data.img_size, data.img_size), interpolation=str_to_interp_mode(data.interpolation))]
    if aug.get("pad_crop"):
        steps.append(T.RandomCrop(data.img_size, padding=aug.pad_crop))
    if aug.get("hflip"):
        steps.append(T.RandomHorizontalFlip())
    return T.Compose([*steps, MaybeToTensor(), T.Normalize(data.mean, data.std)])


def eval_transform(data: DictConfig, aug: DictConfig):
    """PIL image -> normalised float tensor (C, img_size, img_size), deterministic."""
    crop = aug.get("eval_crop", "none")
    interp = str_to_interp_mode(data.interpolation)
    if crop == "resize-crop":
        resize = [T.Resize((aug.eval_resize, aug.eval_resize), interpolation=interp), T.CenterCrop(data.img_size)]
    elif crop == "resmall-crop":
        resize = [T.Resize(aug.eval_resize, interpolation=interp), T.CenterCrop(data.img_size)]
    elif crop == "none":
        resize = [T.Resize((data.img_size, data.img_size), interpolation=interp)]
    else:
        raise UserError(f"unknown aug.eval_crop {crop!r}; choose one of: {', '.join(EVAL_CROPS)}")
    if crop != "none" and aug.eval_resize < data.img_size:
        raise UserError(
            f"aug.eval_resize={aug.eval_resize} is below data.img_size={data.img_size}; use at least the image size"
        )
    return T.Compose([*resize, MaybeToTensor(), T.Normalize(data.mean, data.std)])


def demo_transform(data: DictConfig, aug: DictConfig, train: bool) -> v2.Compose:
    """The in-memory demo digits (28x28 uint8 tensors): resized when the model wants another
    resolution (fine-tuning with --res), shifted on train, then normalised."""
    from mixer_cli.data.demo import IMG_SIZE

    size = data.img_size
    resize = [v2.Resize((size, size), interpolation=str_to_interp_mode(data.interpolation))] if size != IMG_SIZE else []
    shift = [v2.RandomCrop(size, padding=aug.pad_crop)] if train and aug.get("pad_crop") else []
    return v2.Compose([*resize, *shift, v2.ToDtype(torch.float32, scale=True), v2.Normalize(data.mean, data.std)])
