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

import itertools
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


def tf_bilinear_taps(start: torch.Tensor, length: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
    """(B,) crop starts and lengths along one axis -> the two source indices (B, size), offset by `start`,
    and their weights, of `size` outputs resized from each crop as `tf_resize` (bilinear) does it: half-pixel
    centres clamped to the crop. The arithmetic is upsample_bilinear2d's, with the fused multiply-adds (addcmul)
    its multi-threaded CPU kernel and CUDA's compiler use."""
    scale = (length.to(torch.float32) / size)[:, None]
    centres = torch.arange(size, dtype=torch.float32, device=start.device) + 0.5
    source = torch.addcmul(torch.tensor(-0.5, device=start.device), scale, centres).clamp_(min=0)
    last = (length - 1)[:, None]
    first = torch.minimum(source.long(), last)
    weight = (source - first).clamp_(0, 1)
    return start[:, None] + first, start[:, None] + first + (first < last), 1 - weight, weight


def tf_resize_crops(images: list[torch.Tensor], boxes: list[Box], flips: list[bool], size: int) -> torch.Tensor:
    """uint8 (C, H, W) images of any sizes, a box and a flip each -> uint8 (B, C, size, size): each box resized
    as `tf_resize` (bilinear) resizes it and mirrored where flipped, in a fixed number of batched ops instead of
    a few per image (kernel launches, on a GPU). The images lie end to end in one buffer; each output pixel
    gathers its four neighbours from it. The pixels are tf_resize's within one grey level: torch's kernel itself
    rounds differently on one thread, on several and on a GPU, and truncation turns an ulp into a level."""
    channels = images[0].shape[0]
    flat = torch.cat([image.reshape(channels, -1) for image in images], 1)
    offsets = itertools.accumulate((image.shape[-2] * image.shape[-1] for image in images[:-1]), initial=0)
    widths = [image.shape[-1] for image in images]
    top, left, height, width, row_length, offset, flip = torch.tensor(
        [*zip(*boxes), widths, list(offsets), flips], dtype=torch.long).to(images[0].device)
    y0, y1, wy0, wy1 = tf_bilinear_taps(top, height, size)
    mirrored = flip.bool()[:, None]
    x0, x1, wx0, wx1 = (torch.where(mirrored, t.flip(1), t) for t in tf_bilinear_taps(left, width, size))

    def pixels(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:  # -> float (C, B, size, size)
        index = (offset[:, None] + rows * row_length[:, None])[:, :, None] + cols[:, None, :]
        return flat.index_select(1, index.view(-1)).view(channels, *index.shape).to(torch.float32)

    wx0, wx1, wy0, wy1 = wx0[:, None, :], wx1[:, None, :], wy0[:, :, None], wy1[:, :, None]
    upper = torch.addcmul(pixels(y0, x1) * wx1, pixels(y0, x0), wx0)
    lower = torch.addcmul(pixels(y1, x1) * wx1, pixels(y1, x0), wx0)
    out = torch.addcmul(lower * wy1, upper, wy0).clamp_(0, 255).to(torch.uint8)  # the cast truncates
    return out.permute(1, 0, 2, 3).contiguous()


def inception_crop(size: int, aug, interpolation: str) -> InceptionCrop:
    """The crop an `aug` config asks for at `size`."""
    return InceptionCrop(size, aug.get("crop_area_min", 0.08), aug.get("crop_sampler", "tf"),
                         bool(aug.get("crop_antialias", False)), interpolation)
