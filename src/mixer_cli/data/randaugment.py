"""RandAugment (Cubuk et al., 2020) as the paper's code runs it, on PIL images.

A port of `distort_image_with_randaugment` in google-research/big_vision,
big_vision/pp/archive/autoaugment.py (itself the TF TPU EfficientNet code): `num_layers` times, pick
one of the 16 ops uniformly and apply it, always (the TF code draws a probability per op but never
uses it for RandAugment). Every op's strength is magnitude / 10 of its maximum, with no cap at 10:
m=15 rotates by 45 degrees, m=20 by 60. Rotate, shear and translate get a random sign; pixels that
a geometric op or Cutout uncovers are grey (128). Translate and Cutout sizes are in pixels
(translate_const=100, cutout_const=40), whatever the image size.

timm's RandAugment differs: it clips m at 10 unless told otherwise, and its op set and level
functions are not these.

Where the TF code quotes a PIL op (AutoContrast, Equalize, Invert, Posterize, Color, Contrast,
Brightness, Sharpness are "Equivalent of PIL ..."), PIL's op is used; the grey image behind Color
and Contrast can differ by one level (PIL rounds the luma and the mean, the TF port truncates).
The level functions keep the TF code's quirks, which the paper's runs had: Posterize keeps more
bits as m grows, and Solarize's threshold wraps around 256 (see `solarize`).
Random draws use torch's global generator, which Lightning seeds and each loader worker reseeds.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

MAX_LEVEL = 10.0
FILL = 128
TRANSLATE_CONST = 100  # pixels at m=10
CUTOUT_CONST = 40  # half the side of the grey square at m=10, in pixels


def _enhance_factor(m: float) -> float:
    return m / MAX_LEVEL * 1.8 + 0.1


# magnitude m -> the op's argument before any random sign (big_vision's `level_to_arg`).
LEVEL_TO_ARG: dict[str, Callable[[float], float]] = {
    "Rotate": lambda m: m / MAX_LEVEL * 30.0,  # degrees
    "Posterize": lambda m: int(m / MAX_LEVEL * 4),  # bits kept
    "Solarize": lambda m: int(m / MAX_LEVEL * 256),  # threshold, compared as uint8 (see `solarize`)
    "SolarizeAdd": lambda m: int(m / MAX_LEVEL * 110),
    "Color": _enhance_factor,
    "Contrast": _enhance_factor,
    "Brightness": _enhance_factor,
    "Sharpness": _enhance_factor,
    "ShearX": lambda m: m / MAX_LEVEL * 0.3,
    "ShearY": lambda m: m / MAX_LEVEL * 0.3,
    "TranslateX": lambda m: m / MAX_LEVEL * TRANSLATE_CONST,
    "TranslateY": lambda m: m / MAX_LEVEL * TRANSLATE_CONST,
    "Cutout": lambda m: int(m / MAX_LEVEL * CUTOUT_CONST),
}
SIGNED = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")


def _fill(img: Image.Image) -> tuple[int, ...]:
    return (FILL,) * len(img.getbands())


def at_pixel_centres(coefficients: tuple[float, ...]) -> tuple[float, ...]:
    """An affine map (a, b, c, d, e, f) in pixel-index coordinates, shifted for PIL: PIL samples at
    pixel centres (index + 0.5) and takes the floor, so that it rounds the indices."""
    a, b, c, d, e, f = coefficients
    return a, b, c + 0.5 - 0.5 * (a + b), d, e, f + 0.5 - 0.5 * (d + e)


def _warp(img: Image.Image, a: float, b: float, c: float, d: float, e: float, f: float) -> Image.Image:
    """tfa.image.transform as big_vision calls it: output pixel (x, y) takes the input pixel nearest to
    (a x + b y + c, d x + e y + f), in pixel-index coordinates; points outside the image are grey."""
    return img.transform(img.size, Image.Transform.AFFINE, at_pixel_centres((a, b, c, d, e, f)),
                         Image.Resampling.NEAREST, fillcolor=_fill(img))


def rotation(degrees: float, height: int, width: int) -> tuple[float, ...]:
    """The affine map of a rotation counter-clockwise on screen about the image centre (tfa.image.rotate)."""
    cos, sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    w, h = width - 1, height - 1
    return cos, -sin, (w - cos * w + sin * h) / 2, sin, cos, (h - sin * w - cos * h) / 2


def rotate(img: Image.Image, degrees: float) -> Image.Image:
    return _warp(img, *rotation(degrees, img.height, img.width))


def shear_x(img: Image.Image, level: float) -> Image.Image:
    return _warp(img, 1.0, level, 0.0, 0.0, 1.0, 0.0)


def shear_y(img: Image.Image, level: float) -> Image.Image:
    return _warp(img, 1.0, 0.0, 0.0, level, 1.0, 0.0)


def translate_x(img: Image.Image, pixels: float) -> Image.Image:
    """Content moves left by `pixels` (big_vision translates by -pixels)."""
    return _warp(img, 1.0, 0.0, pixels, 0.0, 1.0, 0.0)


def translate_y(img: Image.Image, pixels: float) -> Image.Image:
    """Content moves up by `pixels`."""
    return _warp(img, 1.0, 0.0, 0.0, 0.0, 1.0, pixels)


def cutout(img: Image.Image, pad: int, cy: int, cx: int) -> Image.Image:
    """A grey square of side 2 x pad centred at (cy, cx), clipped at the image border."""
    a = np.array(img)
    a[max(0, cy - pad): cy + pad, max(0, cx - pad): cx + pad] = FILL
    return Image.fromarray(a)


def posterize(img: Image.Image, bits: int) -> Image.Image:
    # Above m=20 the TF code shifts by a negative count, which TF leaves undefined; 8 bits keep the image.
    return ImageOps.posterize(img, min(bits, 8))


def solarize(img: Image.Image, threshold: int) -> Image.Image:
    """Invert the pixels at or above the threshold. TF compares against the threshold cast to uint8,
    so 256 (m=10) and 512 (m=20) invert every pixel, 384 (m=15) those from 128 up: big_vision issue
    #110 documents this overflow, which the paper's runs had."""
    return ImageOps.solarize(img, threshold % 256)


def solarize_add(img: Image.Image, addition: int, threshold: int = 128) -> Image.Image:
    """Add `addition` to the pixels below the threshold, clipped to [0, 255]."""
    a = np.asarray(img)
    added = np.clip(a.astype(np.int64) + addition, 0, 255).astype(np.uint8)
    return Image.fromarray(np.where(a < threshold, added, a))


OPS: dict[str, Callable[..., Image.Image]] = {
    "AutoContrast": ImageOps.autocontrast,
    "Equalize": ImageOps.equalize,
    "Invert": ImageOps.invert,
    "Rotate": rotate,
    "Posterize": posterize,
    "Solarize": solarize,
    "Color": lambda img, factor: ImageEnhance.Color(img).enhance(factor),
    "Contrast": lambda img, factor: ImageEnhance.Contrast(img).enhance(factor),
    "Brightness": lambda img, factor: ImageEnhance.Brightness(img).enhance(factor),
    "Sharpness": lambda img, factor: ImageEnhance.Sharpness(img).enhance(factor),
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateX": translate_x,
    "TranslateY": translate_y,
    "Cutout": cutout,
    "SolarizeAdd": solarize_add,
}
OP_NAMES = tuple(OPS)  # big_vision's `available_ops`, in its order


def _randint(n: int) -> int:
    return int(torch.randint(n, ()))


def op_args(name: str, magnitude: float, img: Image.Image) -> tuple:
    """One application's arguments: the level of `magnitude`, negated half the time for the geometric
    ops; Cutout's centre is uniform over the image."""
    if name not in LEVEL_TO_ARG:
        return ()
    arg = LEVEL_TO_ARG[name](magnitude)
    if name in SIGNED and _randint(2):
        arg = -arg
    if name == "Cutout":
        return arg, _randint(img.height), _randint(img.width)
    return (arg,)


class RandAugment:
    """PIL image -> PIL image: `num_layers` ops, each picked uniformly from OPS and applied at `magnitude`."""

    def __init__(self, num_layers: int = 2, magnitude: float = 10):
        self.num_layers = num_layers
        self.magnitude = magnitude

    def draw(self, img) -> tuple[str, tuple]:
        """One layer's op, uniform over OPS, and its arguments for `img` (read for its height and width)."""
        name = OP_NAMES[_randint(len(OP_NAMES))]
        return name, op_args(name, self.magnitude, img)

    def __call__(self, img: Image.Image) -> Image.Image:
        for _ in range(self.num_layers):
            name, args = self.draw(img)
            img = OPS[name](img, *args)
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_layers={self.num_layers}, magnitude={self.magnitude})"
