"""uint8 images from the loader, float on the device: less CPU work per image.

The loader workers decode, crop, resize and flip, and hand over uint8 (C, H, W) tensors, a quarter
of the bytes of float ones; the conversion to float and the normalisation run batched on the
accelerator (`NormalizeOnDevice`, as timm's PrefetchLoader does), and mixup after them. The CPU
work per image is also cheaper: torchvision's JPEG decoder instead of PIL's, with the crop taken as
a view of the decoded image. With the antialiased crop resize (`aug.crop_antialias=true`), a crop
at least 2 x REDUCING_GAP = 6 times the output per side decodes at 1/2, 1/4 or 1/8 scale in the
DCT instead (PIL `draft`, as PIL's `reducing_gap` does for thumbnails), which skips most of the
decoding work; TF's resize (the default) samples the full-size pixels without a low-pass, so it
always decodes in full.

Same images as the float path of data/transforms.py: the crop box comes from the same sampler
(data/inception_crop.py) and the flip from torchvision's coin, drawn in the same order, so a seed
gives the same boxes and flips on either path; the crop resize is the same function (TF's resize)
or two antialiased resamplers within one grey level (PIL's and torchvision's); RandAugment is the
same PIL transform (tests/test_device_transforms.py).

With `data.decode=gpu` the CPU only reads bytes: `decode_on_device` decodes a batch of JPEGs with
nvJPEG (torchvision's `decode_jpeg(..., device="cuda")`) and crops, resizes and flips the batch on
the device (data/inception_crop.py `tf_resize_crops`: the same boxes from the same sampler, the same
resize). RandAugment follows, batched on the device (data/device_randaugment.py): each image's ops and
arguments are drawn on the CPU right after its box and flip, as the CPU path draws them, and the
tensor ops compute the PIL ops' pixels (tests/test_device_randaugment.py).
"""
from __future__ import annotations

import io
import math

import torch
from omegaconf import DictConfig
from PIL import Image
from timm.data.transforms import str_to_interp_mode, str_to_pil_interp
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2 import functional as F

from mixer_cli.core.errors import UserError
from mixer_cli.data.device_randaugment import apply_layers, draw_layers
from mixer_cli.data.inception_crop import Box, InceptionCrop, inception_crop, tf_resize_crops
from mixer_cli.data.randaugment import RandAugment
from mixer_cli.data.transforms import AREA, AreaResizeCrop, eval_data_config, randaugment, resize_shift_flip

DCT_SCALES = (8, 4, 2)  # libjpeg's scaled decoding
REDUCING_GAP = 3.0  # decode at 1/s only where the crop stays >= 3x the output (PIL: "indistinguishable")
JPEG_MAGIC = b"\xff\xd8"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PNG_COLOUR = {1: 0, 3: 2}  # channels -> the IHDR colour type that holds them: grey, RGB (no palette, no alpha)


def encoded(raw: bytes) -> torch.Tensor:
    """The bytes as the 1-D uint8 tensor torchvision's decoders read (a copy: `bytes` is read-only)."""
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def dct_scale(height: float, width: float, out_height: int, out_width: int) -> int:
    """The largest libjpeg scale 1/s that leaves a height x width region at least REDUCING_GAP
    times the output in both sides; 1 when none does."""
    room = min(height / out_height, width / out_width) / REDUCING_GAP
    return next((s for s in DCT_SCALES if room >= s), 1)


def decode(raw: bytes, channels: int = 3) -> torch.Tensor:
    """An encoded image (JPEG, PNG, WebP, ...) -> uint8 RGB or grey (C, H, W), by torchvision's decoders."""
    return decode_image(encoded(raw), mode=ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY)


class DecodePIL:
    """An encoded image -> PIL image in RGB or grey ("L"), as the float path's loaders decode it."""

    def __init__(self, channels: int):
        self.mode = "RGB" if channels == 3 else "L"

    def __call__(self, raw: bytes) -> Image.Image:
        return Image.open(io.BytesIO(raw)).convert(self.mode)


def is_plain_png(raw: bytes, channels: int, size: int) -> bool:
    """An 8-bit PNG of `channels` (grey or RGB: no palette, alpha or transparent colour) that is already
    size x size, read from its IHDR chunk: decoding it needs no conversion and no resize, and any two
    PNG decoders give it the same pixels."""
    return (raw[:8] == PNG_MAGIC and raw[12:16] == b"IHDR" and int.from_bytes(raw[16:20], "big") == size
            and int.from_bytes(raw[20:24], "big") == size and raw[24] == 8 and raw[25] == PNG_COLOUR[channels]
            and b"tRNS" not in raw)


class DecodeResize:
    """Encoded image -> uint8 (C, H, W) as the float path's loader has it before ToTensor: decoded by PIL
    in RGB or grey, then `resize` (a PIL transform to size x size). A plain PNG already at that size
    (`is_plain_png`) takes torchvision's decoder instead: the same pixels, at a third of the CPU time."""

    def __init__(self, channels: int, size: int, resize):
        self.channels, self.size, self.resize = channels, size, resize
        self.decode_pil = DecodePIL(channels)

    def __call__(self, raw: bytes) -> torch.Tensor:
        if is_plain_png(raw, self.channels, self.size):
            return decode(raw, self.channels)
        return F.pil_to_tensor(self.resize(self.decode_pil(raw)))


def read_header(raw: bytes) -> Image.Image:
    """The image with only its header read: its size is known, no pixel is decoded yet."""
    return Image.open(io.BytesIO(raw))


def draft_resize(header: Image.Image, scale: int, box: tuple[float, float, float, float],
                 size: tuple[int, int], resample: Image.Resampling, channels: int = 3) -> torch.Tensor:
    """The JPEG decoded at 1/scale in the DCT (PIL `draft`), then the region `box` (left, upper,
    right, lower in full-size pixels) resized to `size` (width, height) -> uint8 (C, H, W). PIL takes
    the box in fractions of a pixel, so the geometry stays that of the full-size image."""
    width = header.width
    _, reduced = header.draft(None, (header.width // scale, header.height // scale))
    factor = width / reduced[2]
    mode = "RGB" if channels == 3 else "L"
    image = header if header.mode == mode else header.convert(mode)
    out = image.resize(size, resample, box=tuple(v / factor for v in box))
    return F.pil_to_tensor(out)


class InceptionCropUint8:
    """Encoded image -> uint8 (C, size, size): the Inception crop resized to `size`, a random
    horizontal flip, then RandAugment where given. The draws are train_transform's, in its order."""

    def __init__(self, crop: InceptionCrop, hflip: bool = True, randaugment: RandAugment | None = None,
                 channels: int = 3):
        self.inception, self.hflip, self.randaugment, self.channels = crop, hflip, randaugment, channels
        self.resample = str_to_pil_interp(crop.interpolation)

    def sample(self, img: Image.Image | torch.Tensor) -> tuple[Box, bool]:
        """The crop's box, then torchvision RandomHorizontalFlip's coin: the float path's draws."""
        return self.inception.sample(img), self.hflip and bool(torch.rand(1) < 0.5)

    def crop(self, img: torch.Tensor, box: Box, flip: bool) -> torch.Tensor:
        """Crop, resize and flip, on whatever device `img` is."""
        out = self.inception.crop(img, box)
        return F.horizontal_flip(out) if flip else out

    def crop_batch(self, images: list[torch.Tensor], boxes: list[Box], flips: list[bool]) -> torch.Tensor:
        """`crop` of each image -> uint8 (B, C, size, size): batched for TF's bilinear resize (the recipes'),
        image by image for the others."""
        if self.inception.antialias or self.inception.interpolation != "bilinear":
            return torch.stack([self.crop(img, box, flip) for img, box, flip in zip(images, boxes, flips)])
        return tf_resize_crops(images, boxes, flips, self.inception.size)

    def on_batch(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Decoded uint8 (C, H, W) images on the device -> uint8 (B, C, size, size): cropped and flipped
        (`crop_batch`), then RandAugment on the whole batch. Each image's RandAugment draws follow its box
        and flip, the order `__call__` draws them in, so a seed gives the CPU path's boxes, flips and ops."""
        boxes, flips, draws = [], [], []
        for img in images:
            box, flip = self.sample(img)
            boxes.append(box)
            flips.append(flip)
            if self.randaugment is not None:
                draws.append(draw_layers(self.randaugment, self.inception.size, self.inception.size))
        batch = self.crop_batch(images, boxes, flips)
        return apply_layers(batch, draws) if draws else batch

    def __call__(self, raw: bytes) -> torch.Tensor:
        header = read_header(raw)
        box, flip = self.sample(header)
        top, left, height, width = box
        size = self.inception.size
        # A scaled decode low-passes: right for an antialiased resize, not for TF's aliasing one.
        scale = dct_scale(height, width, size, size) if header.format == "JPEG" and self.inception.antialias else 1
        if scale > 1:
            pil_box = (left, top, left + width, top + height)
            out = draft_resize(header, scale, pil_box, (size, size), self.resample, self.channels)
            out = F.horizontal_flip(out) if flip else out
        else:
            out = self.crop(decode(raw, self.channels), box, flip)
        if self.randaugment is None:
            return out
        return F.pil_to_tensor(self.randaugment(F.to_pil_image(out)))


class EvalResizeUint8:
    """Encoded image -> uint8 (C, size, size), timm's evaluation geometry: resize to size / crop_pct
    ("squash": both sides; "center": the shorter side), then centre-crop size. With the "box"
    interpolation, the area resize of the float path (`AreaResizeCrop`), from the full-size pixels."""

    def __init__(self, size: int, crop_pct: float, crop_mode: str, interpolation: str = "bilinear",
                 channels: int = 3):
        self.size, self.crop_mode, self.channels = size, crop_mode, channels
        self.resize_to = math.floor(size / crop_pct)  # timm's scale_size
        self.interpolation, self.resample = str_to_interp_mode(interpolation), str_to_pil_interp(interpolation)
        self.area = AreaResizeCrop(size, crop_pct, crop_mode) if interpolation == AREA else None

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize, as torchvision's Resize rounds them."""
        if self.crop_mode == "squash":
            return self.resize_to, self.resize_to
        longer = int(self.resize_to * max(height, width) / min(height, width))
        return (longer, self.resize_to) if height > width else (self.resize_to, longer)

    def on_tensor(self, img: torch.Tensor) -> torch.Tensor:
        if self.area is not None:
            return self.area(img)
        resized = F.resize(img, list(self.resized_size(*img.shape[-2:])), self.interpolation, antialias=True)
        return F.center_crop(resized, [self.size, self.size])

    def on_batch(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Decoded uint8 (C, H, W) images on the device -> uint8 (B, C, size, size); the area resize
        batched (`AreaResizeCrop.on_batch`), the antialiased ones image by image."""
        if self.area is not None:
            return self.area.on_batch(images)
        return torch.stack([self.on_tensor(img) for img in images])

    def __call__(self, raw: bytes) -> torch.Tensor:
        if self.area is not None:
            return self.area(decode(raw, self.channels))
        header = read_header(raw)
        width, height = header.size
        out_height, out_width = self.resized_size(height, width)
        scale = dct_scale(height, width, out_height, out_width) if header.format == "JPEG" else 1
        if scale == 1:
            return self.on_tensor(decode(raw, self.channels))
        resized = draft_resize(header, scale, (0, 0, width, height), (out_width, out_height), self.resample,
                               self.channels)
        return F.center_crop(resized, [self.size, self.size])


def train_uint8_transform(data: DictConfig, aug: DictConfig) -> InceptionCropUint8 | T.Compose:
    """The uint8 counterpart of transforms.train_transform: the Inception crop of the paper's recipes,
    or, without it (the digits), the float path's own steps before its float conversion (the shift and
    flip draw the same numbers on tensors as on PIL images)."""
    if not aug.get("inception_crop"):
        resize, *shift_flip = resize_shift_flip(data, aug)
        return T.Compose([DecodeResize(data.channels, data.img_size, resize), *shift_flip])
    return InceptionCropUint8(inception_crop(data.img_size, aug, data.interpolation), bool(aug.get("hflip")),
                              randaugment(aug), data.channels)


def eval_uint8_transform(data: DictConfig, aug: DictConfig) -> EvalResizeUint8:
    """The uint8 counterpart of transforms.eval_transform."""
    cfg = eval_data_config(data, aug)
    return EvalResizeUint8(data.img_size, cfg["crop_pct"], cfg["crop_mode"], cfg["interpolation"], data.channels)


def gpu_decode_transform(data: DictConfig, aug: DictConfig, train: bool) -> InceptionCropUint8 | EvalResizeUint8:
    """The transform `decode_on_device` applies: the Inception crop and flip, then RandAugment where
    configured, or the evaluation resize."""
    if train and not aug.get("inception_crop"):
        raise UserError("data.decode=gpu crops on the device for the Inception-crop recipes; without "
                        "aug.inception_crop use data.decode=uint8")
    return train_uint8_transform(data, aug) if train else eval_uint8_transform(data, aug)


def decode_on_device(images: list[torch.Tensor], transform: InceptionCropUint8 | EvalResizeUint8,
                     device: torch.device | str) -> torch.Tensor:
    """Encoded images (1-D uint8 CPU tensors) -> uint8 (B, C, size, size) on `device`. The JPEGs
    decode as one batch (nvJPEG on a GPU); any other format decodes on the CPU and is copied over.
    The batch is then cropped, resized and flipped on the device, and RandAugment, where the
    transform has it, runs on it (`transform.on_batch`)."""
    is_jpeg = [x[:2].tolist() == list(JPEG_MAGIC) for x in images]
    jpegs = [x for x, j in zip(images, is_jpeg) if j]
    on_device = iter(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device) if jpegs else [])
    decoded = [next(on_device) if j else decode_image(x, mode=ImageReadMode.RGB).to(device)
               for x, j in zip(images, is_jpeg)]
    return transform.on_batch(decoded)


def collate_encoded(samples: list[tuple[bytes, int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(encoded image, label) samples -> (1-D uint8 tensors for `decode_on_device`, labels)."""
    return [encoded(raw) for raw, _ in samples], torch.tensor([label for _, label in samples])


class NormalizeOnDevice:
    """uint8 (B, C, H, W) -> float (x / 255 - mean) / std, batched on the batch's device: what
    ToTensor + Normalize did per image in the loader, in their order, so bit for bit the float path's.

    Not an nn.Module: a module's buffers are state DDP broadcasts before every forward, evaluation's
    included, where a rank whose share of the split has ended would never join it (a hang); and a
    checkpoint's keys stay the model's."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        self.mean, self.std = tuple(mean), tuple(std)
        self.constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device not in self.constants:
            self.constants[x.device] = tuple(torch.tensor(v).view(1, -1, 1, 1).to(x.device)
                                             for v in (self.mean, self.std))
        mean, std = self.constants[x.device]
        return x.to(torch.float32).div_(255).sub_(mean).div_(std)
