"""RandAugment on uint8 (B, C, H, W) tensors, batched on any device: the PIL port's draws and ops.

A tensor port of data/randaugment.py, which ports `distort_image_with_randaugment` in
google-research/big_vision, big_vision/pp/archive/autoaugment.py (itself the TF TPU EfficientNet
code). The draws are the PIL port's own call (`RandAugment.draw`), made on the CPU per image in
its order (`draw_layers`), so one seed gives the same ops and arguments on either path. The ops then
run batched (`apply_layers`): layer by layer, the images that drew an op go through it together,
each with its own argument as a tensor (a lookup table, factor, affine matrix or mask per image).

Each op computes what PIL computes, in PIL's arithmetic, so the two ports agree bit for bit
(tests/test_device_randaugment.py measures every op):
- AutoContrast and Equalize build PIL's per-channel lookup tables from each image's histogram, in
  its float64 or integer steps.
- Color, Contrast, Brightness and Sharpness blend with PIL's degenerate image (its integer luma,
  its rounded mean, its 3x3 SMOOTH filter with the border copied) in float32, one rounding per
  operation as PIL's C code rounds (separate tensor ops: no fused multiply-add), truncated as PIL
  casts to uint8.
- Rotate and Shear sample the nearest pixel in PIL's 16.16 fixed point (`affine_fixed`, its path
  for images under 32768 pixels a side), Translate in its float64 (`ImagingScaleAffine`); uncovered
  pixels are grey (128).
One difference: below m=2.5 Posterize keeps 0 bits, a black image here, which PIL refuses (the PIL
port raises there); the recipes use m=10-20.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from mixer_cli.data.randaugment import FILL, RandAugment, at_pixel_centres, rotation

Draw = tuple[str, tuple]  # an op's name and its arguments, as the PIL port applies them
LUMA = (19595, 38470, 7471)  # PIL's RGB -> L weights, in 1/65536
SMOOTH_SIDE, SMOOTH_CENTRE = 1 / 13, 5 / 13  # ImageFilter.SMOOTH: 1 around 5, divided by 13


class ImageSize(NamedTuple):
    """What `op_args` reads of an image: Cutout's centre is drawn over its height and width."""

    height: int
    width: int


def draw_layers(randaugment: RandAugment, height: int, width: int) -> list[Draw]:
    """One image's `num_layers` (op, arguments), drawn as RandAugment.__call__ draws them."""
    return [randaugment.draw(ImageSize(height, width)) for _ in range(randaugment.num_layers)]


def per_image(values: list, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One value per image as an (n, 1, 1, 1) tensor on `like`'s device, broadcasting over pixels."""
    return torch.tensor(values, dtype=dtype).view(-1, 1, 1, 1).to(like.device)


def first_args(args: list[tuple]) -> list:
    return [a[0] for a in args]


def apply_lut(images: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """uint8 (n, C, H, W) through a per-image, per-channel table (n, C, 256) of values in 0-255."""
    flat = images.flatten(2).long()
    return lut.gather(2, flat).to(torch.uint8).view_as(images)


def histograms(images: torch.Tensor) -> torch.Tensor:
    """(n, C, 256) int64 counts of each grey level per image and channel."""
    n, c = images.shape[:2]
    rows = torch.arange(n * c, device=images.device).view(n, c, 1) * 256
    return torch.bincount((images.flatten(2).long() + rows).flatten(), minlength=n * c * 256).view(n, c, 256)


def identity_lut(like: torch.Tensor) -> torch.Tensor:
    return torch.arange(256, device=like.device).expand(*like.shape[:2], 256)


def autocontrast(images: torch.Tensor, args: list[tuple]) -> torch.Tensor:
    """ImageOps.autocontrast: each channel's darkest level to 0, its lightest to 255, linearly
    (PIL's float64 scale and offset, truncated); a flat channel is left as it is."""
    flat = images.flatten(2)
    lo, hi = flat.amin(2, keepdim=True).double(), flat.amax(2, keepdim=True).double()
    # A true division by a tensor: torch divides a scalar by a tensor, or a CUDA tensor by a scalar, as a
    # product with the reciprocal, which can land a level's value on the other side of an integer.
    scale = torch.full_like(lo, 255.0) / (hi - lo).clamp(min=1)
    levels = torch.arange(256, dtype=torch.float64, device=images.device)
    lut = (levels * scale + -lo * scale).trunc().clamp(0, 255).long()
    return apply_lut(images, torch.where(hi > lo, lut, identity_lut(images)))


def equalize(images: torch.Tensor, args: list[tuple]) -> torch.Tensor:
    """ImageOps.equalize: PIL's table (step // 2 + pixels below the level) // step per channel, where
    step is the pixel count without the last occupied level, over 255; a channel with one level, or
    too few pixels for a step, is left as it is."""
    counts = histograms(images)
    last_level = 255 - (counts.flip(2) > 0).int().argmax(2, keepdim=True)
    step = (counts.sum(2, keepdim=True) - counts.gather(2, last_level)) // 255
    below = counts.cumsum(2) - counts
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp(max=255)
    flat = ((counts > 0).sum(2, keepdim=True) <= 1) | (step == 0)
    return apply_lut(images, torch.where(flat, identity_lut(images), lut))


def invert(images: torch.Tensor, args: list[tuple]) -> torch.Tensor:
    return 255 - images


def posterize(images: torch.Tensor, args: list[tuple]) -> torch.Tensor:
    """Keep each image's top `bits` bits; above 8 the image stays (see randaugment.posterize)."""
    masks = [(0xFF << (8 - min(bits, 8))) & 0xFF for bits in first_args(args)]
    return images & per_image(masks, images, torch.uint8)


def solarize(images: torch.Tensor, args: list[tuple]) -> torch.Tensor:
    """Invert the pixels at or above each image's threshold, wrapped at 256 (see randaugment.solarize)."""
    thresholds = per_image([t % 256 for t in first_args(args)], images, torch.int16)
    return torch.where(images < thresholds, images, 255 - images)


def solarize_add(images: torch.Tensor, args: list[tuple]) -> torch.Tensor:
    """Add each image's addition to the pixels below 128, clipped to [0, 255]."""
    added = (images.short() + per_image(first_args(args), images, torch.int16)).clamp(0, 255).to(torch.uint8)
    return torch.where(images < 128, added, images)


def blend(degenerate: torch.Tensor, images: torch.Tensor, factors: list[float]) -> torch.Tensor:
    """Image.blend(degenerate, image, factor): degenerate + factor x (image - degenerate) in float32, a
    rounding after the product and after the sum as PIL's C code has them, then clipped and truncated."""
    start = degenerate.float()
    step = per_image(factors, images, torch.float32) * (images.float() - start)
    return (start + step).clamp(0, 255).trunc().to(torch.uint8)


def luma(images: torch.Tensor) -> torch.Tensor:
    """(n, 1, H, W) int32: PIL's RGB -> L conversion, rounded in integers; a grey image is its own."""
    if images.shape[1] == 1:
        return images.int()
    weights = torch.tensor(LUMA, dtype=torch.int32, device=images.device).view(1, 3, 1, 1)
    return ((images.int() * weights).sum(1, keepdim=True) + 0x8000) >> 16


def color(images: torch.Tensor, args: list[tuple]) -> torch.Tensor:
    """ImageEnhance.Color: blend with the grey version of the image."""
    return blend(luma(images).expand_as(images), images, first_args(args))


def contrast(images: torch.Tensor, args: list[tuple]) -> torch.Tensor:
    """ImageEnhance.Contrast: blend with the image's mean grey level, rounded to an integer."""
    grey = luma(images).flatten(1).double()
    mean = grey.sum(1) / torch.full_like(grey[:, 0], grey.shape[1])  # a true division (see autocontrast)
    return blend((mean + 0.5).floor().view(-1, 1, 1, 1).expand_as(images), images, first_args(args))


def brightness(images: torch.Tensor, args: list[tuple]) -> torch.Tensor:
    """ImageEnhance.Brightness: blend with black."""
    return blend(torch.zeros_like(images), images, first_args(args))


def row_of_three(rows: torch.Tensor, side: float, centre: float) -> torch.Tensor:
    """PIL's KERNEL1x3 at each interior column: left x side + middle x centre + right x side, in float32."""
    return rows[..., :-2] * side + rows[..., 1:-1] * centre + rows[..., 2:] * side


def smooth(images: torch.Tensor) -> torch.Tensor:
    """ImageFilter.SMOOTH as PIL's 3x3 filter runs it: 0.5 plus the rows below, at and above each pixel,
    summed in that order in float32 and truncated; the border rows and columns are copied."""
    x = images.float()
    total = 0.5 + row_of_three(x[..., 2:, :], SMOOTH_SIDE, SMOOTH_SIDE)
    total = total + row_of_three(x[..., 1:-1, :], SMOOTH_SIDE, SMOOTH_CENTRE)
    total = total + row_of_three(x[..., :-2, :], SMOOTH_SIDE, SMOOTH_SIDE)
    out = images.clone()
    out[..., 1:-1, 1:-1] = total.clamp(0, 255).trunc().to(torch.uint8)
    return out


def sharpness(images: torch.Tensor, args: list[tuple]) -> torch.Tensor:
    """ImageEnhance.Sharpness: blend with the smoothed image."""
    return blend(smooth(images), images, first_args(args))


def to_fixed_point(v: float) -> int:
    """PIL's FIX: v in 16.16 fixed point, rounded."""
    return math.floor(v * 65536.0 + 0.5)


def sample_nearest(images: torch.Tensor, src_x: torch.Tensor, src_y: torch.Tensor) -> torch.Tensor:
    """uint8 (n, C, H, W): output pixel (x, y) of image i is input pixel (src_x, src_y)[i, y, x] of it,
    grey (FILL) where that lies outside the image."""
    n, channels, h, w = images.shape
    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
    index = (src_y.clamp(0, h - 1) * w + src_x.clamp(0, w - 1)).view(n, 1, h * w).expand(n, channels, h * w)
    sampled = images.flatten(2).gather(2, index).view_as(images)
    return torch.where(inside.unsqueeze(1), sampled, torch.full_like(sampled, FILL))


def fixed_point_warp(images: torch.Tensor, coefficients: list[tuple[float, ...]]) -> torch.Tensor:
    """randaugment._warp batched as PIL runs a rotation or shear (`affine_fixed` in Geometry.c): the
    coefficients and the first pixel centre's coordinate rounded to 16.16 fixed point, the source
    pixel the integer part of a x + b y + c, d x + e y + f there; each image with its own coefficients."""
    rows = []
    for a, b, c, d, e, f in map(at_pixel_centres, coefficients):
        rows.append([to_fixed_point(v) for v in (a, b, c + a * 0.5 + b * 0.5, d, e, f + d * 0.5 + e * 0.5)])
    n, _, h, w = images.shape
    a, b, c, d, e, f = torch.tensor(rows).view(n, 6, 1, 1).to(images.device).unbind(1)
    ys = torch.arange(h, device=images.device).view(1, h, 1)
    xs = torch.arange(w, device=images.device).view(1, 1, w)
    return sample_nearest(images, (a * xs + b * ys + c) >> 16, (d * xs + e * ys + f) >> 16)


def translate_warp(images: torch.Tensor, offsets: list[tuple[float, float]]) -> torch.Tensor:
    """randaugment._warp batched for a translation by (c, f) pixels per image, as PIL runs one
    (ImagingScaleAffine): in float64, the source pixel the floor of (x + 0.5 + c', y + 0.5 + f'), c'
    and f' shifted to pixel centres. PIL adds 1 per pixel where this adds x once: the same sums, as
    the level's offsets are whole pixels or far from a pixel edge."""
    shifted = [at_pixel_centres((1.0, 0.0, c, 0.0, 1.0, f)) for c, f in offsets]
    n, _, h, w = images.shape
    c = torch.tensor([s[2] for s in shifted], dtype=torch.float64).view(n, 1, 1).to(images.device)
    f = torch.tensor([s[5] for s in shifted], dtype=torch.float64).view(n, 1, 1).to(images.device)
    ys = torch.arange(h, dtype=torch.float64, device=images.device).view(1, h, 1) + 0.5
    xs = torch.arange(w, dtype=torch.float64, device=images.device).view(1, 1, w) + 0.5
    return sample_nearest(images, (xs + c).floor().long().expand(n, h, w), (ys + f).floor().long().expand(n, h, w))


def rotate(images: torch.Tensor, args: list[tuple]) -> torch.Tensor:
    h, w = images.shape[-2:]
    return fixed_point_warp(images, [rotation(degrees, h, w) for degrees in first_args(args)])


def shear_x(images: torch.Tensor, args: list[tuple]) -> torch.Tensor:
    return fixed_point_warp(images, [(1.0, level, 0.0, 0.0, 1.0, 0.0) for level in first_args(args)])


def shear_y(images: torch.Tensor, args: list[tuple]) -> torch.Tensor:
    return fixed_point_warp(images, [(1.0, 0.0, 0.0, level, 1.0, 0.0) for level in first_args(args)])


def translate_x(images: torch.Tensor, args: list[tuple]) -> torch.Tensor:
    """Content moves left by the image's pixels."""
    return translate_warp(images, [(pixels, 0.0) for pixels in first_args(args)])


def translate_y(images: torch.Tensor, args: list[tuple]) -> torch.Tensor:
    """Content moves up by the image's pixels."""
    return translate_warp(images, [(0.0, pixels) for pixels in first_args(args)])


def cutout(images: torch.Tensor, args: list[tuple]) -> torch.Tensor:
    """A grey square of side 2 x pad centred at (cy, cx) per image, clipped at the border."""
    pad, cy, cx = (torch.tensor(column, device=images.device).view(-1, 1) for column in zip(*args))
    rows = torch.arange(images.shape[-2], device=images.device)
    cols = torch.arange(images.shape[-1], device=images.device)
    in_rows = (rows >= (cy - pad).clamp(min=0)) & (rows < cy + pad)
    in_cols = (cols >= (cx - pad).clamp(min=0)) & (cols < cx + pad)
    square = in_rows[:, None, :, None] & in_cols[:, None, None, :]
    return images.masked_fill(square, FILL)


# The PIL port's OPS on uint8 (n, C, H, W) batches: each takes the images and one argument tuple per image.
OPS: dict[str, Callable[[torch.Tensor, list[tuple]], torch.Tensor]] = {
    "AutoContrast": autocontrast,
    "Equalize": equalize,
    "Invert": invert,
    "Rotate": rotate,
    "Posterize": posterize,
    "Solarize": solarize,
    "Color": color,
    "Contrast": contrast,
    "Brightness": brightness,
    "Sharpness": sharpness,
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateX": translate_x,
    "TranslateY": translate_y,
    "Cutout": cutout,
    "SolarizeAdd": solarize_add,
}


def apply_layers(images: torch.Tensor, draws: list[list[Draw]]) -> torch.Tensor:
    """uint8 (B, C, H, W) -> uint8 (B, C, H, W): image i through its draws[i] in order, batched: at
    each layer the images that drew an op go through it together (a loop over ops, not images)."""
    out = images.clone()
    for layer in zip(*draws):
        for name in dict.fromkeys(name for name, _ in layer):
            chosen = [i for i, (drawn, _) in enumerate(layer) if drawn == name]
            index = torch.tensor(chosen, device=images.device)
            out[index] = OPS[name](out[index], [layer[i][1] for i in chosen])
    return out
