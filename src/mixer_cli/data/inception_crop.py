"""The Inception crop (Szegedy et al., 2015) as the paper's input pipeline draws and resizes it.

big_vision's `inception_crop` (pp/ops_image.py), which the authors' recipes call, takes its box from
TF's `sample_distorted_bounding_box(area_range=(area_min, 1), aspect_ratio_range=(0.75, 1.33),
max_attempts=100, min_object_covered=0, use_image_if_no_bounding_boxes=True)` and resizes it with
`tf.image.resize(method="bilinear", antialias=False)`, cast back to uint8 by truncation.

Box samplers (`aug.crop_sampler`):
- "tf" (default), `tf_crop_box`: per attempt, an aspect ratio w/h uniform in [0.75, 1.33]; the
  crop height uniform between the heights of the smallest and the largest allowed area at that
  ratio; up to 100 attempts, then the whole image. Mean crop area at area_min 0.05: 0.34 of a
  500x375 image.
- "timm": timm's RandomResizedCrop box: area uniform, ratio log-uniform in [3/4, 4/3], 10 tries,
  then a centre crop. Its crops are larger: mean area 0.42 on the same image.

Resize (`aug.crop_antialias`): false (default) is TF's: bilinear interpolation at half-pixel
centres without a low-pass, truncated to uint8; a crop much larger than the output aliases, as it
did in the paper's runs. true is PIL's and torchvision's antialiased resize, rounded.

Draws come from python's `random`, which Lightning seeds and reseeds in each loader worker.
"""
from __future__ import annotations

import math
import random

import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_interp_mode, str_to_pil_interp
from torchvision.transforms.v2 import functional as F

from mixer_cli.core.errors import UserError

Box = tuple[int, int, int, int]  # top, left, height, width
CROP_SAMPLERS = ("tf", "timm")  # the schema checks aug.crop_sampler against these
TF_RATIO_RANGE = (0.75, 1.33)  # sample_distorted_bounding_box's default aspect_ratio_range
TF_ATTEMPTS = 100  # its default max_attempts
TIMM_RATIO_RANGE = (3 / 4, 4 / 3)
TF_RESIZE_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest-exact"}  # half-pixel centres


def tf_crop_box(height: int, width: int, area_min: float, rng: random.Random = random,
                ratio_range: tuple[float, float] = TF_RATIO_RANGE, attempts: int = TF_ATTEMPTS) -> Box:
    """TF's `sample_distorted_bounding_box` for an image without boxes, area in [area_min, 1].
    rng: python's `random` module (its global generator) or a `random.Random`."""
    for _ in range(attempts):
        ratio = ratio_range[0] + rng.random() * (ratio_range[1] - ratio_range[0])
        box = tf_crop_attempt(height, width, area_min, 1.0, ratio, rng)
        if box is not None:
            return box
    return 0, 0, height, width


def tf_crop_attempt(height: int, width: int, area_min: float, area_max: float, ratio: float,
                    rng: random.Random) -> Box | None:
    """One attempt of TF's GenerateRandomCrop at aspect ratio `ratio` (= w / h); None when the rounded
    box misses the area range. Python's round() is lrintf's round-half-to-even."""
    min_area, max_area = area_min * height * width, area_max * height * width
    h = round(math.sqrt(min_area / ratio))
    max_h = round(math.sqrt(max_area / ratio))
    if round(max_h * ratio) > width:  # the tallest box whose rounded width still fits
        max_h = int((width + 0.5 - 1e-7) / ratio)
        if round(max_h * ratio) > width:
            max_h -= 1
    max_h = min(max_h, height)
    h = min(h, max_h)
    if h < max_h:
        h += rng.randint(0, max_h - h)
    w = round(h * ratio)
    if w * h < min_area:  # TF's one step to undo rounding: up when too small, then down when too large
        h += 1
        w = round(h * ratio)
    if w * h > max_area:
        h -= 1
        w = round(h * ratio)
    if not (min_area <= w * h <= max_area and 0 < w <= width and 0 < h <= height):
        return None
    top = rng.randrange(height - h) if h < height else 0  # TF's Uniform(n) is [0, n): never flush bottom-right
    left = rng.randrange(width - w) if w < width else 0
    return top, left, h, w


class InceptionCrop:
    """PIL image -> PIL image, or uint8 (C, H, W) tensor -> tensor: a random box resized to `size`.
    `sample` draws the box, `crop` resizes it: the uint8 and GPU paths call them apart."""

    def __init__(self, size: int, area_min: float, sampler: str = "tf", antialias: bool = False,
                 interpolation: str = "bilinear"):
        if sampler not in CROP_SAMPLERS:
            raise UserError(f"aug.crop_sampler must be one of {', '.join(CROP_SAMPLERS)}, got {sampler}")
        if not antialias and interpolation not in TF_RESIZE_MODES:
            raise UserError(f"aug.crop_antialias=false resizes as tf.image.resize ({', '.join(TF_RESIZE_MODES)}); "
                            f"set aug.crop_antialias=true for data.interpolation={interpolation}")
        self.size, self.area_min, self.sampler, self.antialias = size, area_min, sampler, antialias
        self.interpolation = interpolation

    def sample(self, img: Image.Image | torch.Tensor) -> Box:
        if self.sampler == "timm":
            return RandomResizedCropAndInterpolation.get_params(img, (self.area_min, 1.0), TIMM_RATIO_RANGE)
        return tf_crop_box(*F.get_size(img), self.area_min)

    def crop(self, img: Image.Image | torch.Tensor, box: Box) -> Image.Image | torch.Tensor:
        if isinstance(img, Image.Image):
            if self.antialias:
                top, left, height, width = box
                return img.crop((left, top, left + width, top + height)).resize(
                    (self.size, self.size), str_to_pil_interp(self.interpolation))
            return F.to_pil_image(self.crop(F.pil_to_tensor(img), box))
        if self.antialias:
            return F.resized_crop(img, *box, [self.size, self.size], str_to_interp_mode(self.interpolation),
                                  antialias=True)
        return tf_resize(F.crop(img, *box), self.size, self.interpolation)

    def __call__(self, img: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        return self.crop(img, self.sample(img))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, area_min={self.area_min}, sampler={self.sampler}, "
                f"antialias={self.antialias}, interpolation={self.interpolation})")


def tf_resize(img: torch.Tensor, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """uint8 (C, H, W) -> uint8 (C, size, size) as `tf.cast(tf.image.resize(img, antialias=False), uint8)`:
    interpolated at half-pixel centres (align_corners=False), then truncated."""
    out = torch.nn.functional.interpolate(img[None].float(), size=(size, size), mode=TF_RESIZE_MODES[interpolation],
                                          **({} if interpolation == "nearest" else {"align_corners": False}))
    return out[0].clamp_(0, 255).to(torch.uint8)  # the cast truncates


def inception_crop(size: int, aug, interpolation: str) -> InceptionCrop:
    """The crop an `aug` config asks for at `size`."""
    return InceptionCrop(size, aug.get("crop_area_min", 0.08), aug.get("crop_sampler", "tf"),
                         bool(aug.get("crop_antialias", False)), interpolation)
