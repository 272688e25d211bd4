"""Image transforms from the `aug` config group.

Training follows the paper's input pipeline as big_vision's ImageNet recipe writes it
(configs/mlp_mixer_i1k.py: `decode_jpeg_and_inception_crop(224)|flip_lr|randaug(2,15)|value_range(-1, 1)`):
the Inception crop (a random box of crop_area_min-100% of the area drawn by TF's sampler, resized to
the model's resolution as tf.image.resize does: data/inception_crop.py) and a horizontal flip, then
the paper's RandAugment (data/randaugment.py) where the recipe has one. Mixup mixes whole batches,
so it lives in the training step.

Evaluation is timm's eval transform, set by `aug.eval_crop_mode` and `aug.eval_crop_pct`:
"squash" resizes both sides to img_size / crop_pct (at 1.0: straight to the resolution),
"center" resizes the shorter side to img_size / crop_pct; both then centre-crop img_size.
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig
from timm.data import create_transform
from timm.data.transforms import MaybeToTensor, str_to_interp_mode
from torchvision import transforms as T
from torchvision.transforms import v2

from mixer_cli.core.errors import UserError
from mixer_cli.data.inception_crop import inception_crop
from mixer_cli.data.randaugment import RandAugment

EVAL_CROP_MODES = ("squash", "center")  # the schema checks aug.eval_crop_mode against these


def randaugment(aug: DictConfig) -> RandAugment | None:
    """The paper's RandAugment with `randaug_layers` ops at magnitude `randaug_magnitude`; None when either is 0."""
    layers, magnitude = aug.get("randaug_layers", 2), aug.get("randaug_magnitude", 0)
    return RandAugment(layers, magnitude) if layers and magnitude else None


def train_transform(data: DictConfig, aug: DictConfig) -> T.Compose:
    """PIL image -> normalised float tensor (C, img_size, img_size), randomly augmented."""
    ra = randaugment(aug)
    if aug.get("inception_crop"):
        crop = inception_crop(data.img_size, aug, data.interpolation)
        steps = [crop, *([T.RandomHorizontalFlip()] if aug.get("hflip") else []), *([ra] if ra else [])]
        return T.Compose([*steps, MaybeToTensor(), T.Normalize(list(data.mean), list(data.std))])
    if ra:
        raise UserError("RandAugment runs after the Inception crop; set aug.inception_crop=true or randaug_magnitude=0")
    # Without the Inception crop (the demo digits): resize, then the optional pad-and-crop shift.
    steps = [T.Resize((data.img_size, data.img_size), interpolation=str_to_interp_mode(data.interpolation))]
    if aug.get("pad_crop"):
        steps.append(T.RandomCrop(data.img_size, padding=aug.pad_crop))
    if aug.get("hflip"):
        steps.append(T.RandomHorizontalFlip())
    return T.Compose([*steps, MaybeToTensor(), T.Normalize(list(data.mean), list(data.std))])


def eval_data_config(data: DictConfig, aug: DictConfig) -> dict:
    """The evaluation preprocessing in timm's data-config keys, as a model's `pretrained_cfg` holds it.
    Without the keys: squash at 1.0, i.e. resize straight to the resolution."""
    mode, pct = aug.get("eval_crop_mode", "squash"), aug.get("eval_crop_pct", 1.0)
    return {"input_size": (data.get("channels", 3), data.img_size, data.img_size), "interpolation": data.interpolation,
            "mean": tuple(data.mean), "std": tuple(data.std), "crop_pct": pct, "crop_mode": mode}


def eval_transform(data: DictConfig, aug: DictConfig) -> T.Compose:
    """PIL image -> normalised float tensor (C, img_size, img_size), deterministic."""
    return create_transform(**eval_data_config(data, aug), is_training=False)


def demo_transform(data: DictConfig, aug: DictConfig, train: bool) -> v2.Compose:
    """The in-memory demo digits (28x28 uint8 tensors): resized when the model wants another
    resolution (fine-tuning with --res), shifted on train, then normalised."""
    from mixer_cli.data.demo import IMG_SIZE

    size = data.img_size
    resize = [v2.Resize((size, size), interpolation=str_to_interp_mode(data.interpolation))] if size != IMG_SIZE else []
    shift = [v2.RandomCrop(size, padding=aug.pad_crop)] if train and aug.get("pad_crop") else []
    normalize = v2.Normalize(list(data.mean), list(data.std))
    return v2.Compose([*resize, *shift, v2.ToDtype(torch.float32, scale=True), normalize])
