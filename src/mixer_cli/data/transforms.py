"""Image transforms from the `aug` config group.

Training follows the paper's input pipeline as big_vision's ImageNet recipe writes it
(configs/mlp_mixer_i1k.py: `decode_jpeg_and_inception_crop(224)|flip_lr|randaug(2,15)|value_range(-1, 1)`):
the Inception crop (a random box of crop_area_min-100% of the area drawn by TF's sampler, resized to
the model's resolution as tf.image.resize does: data/inception_crop.py) and a horizontal flip, then
the paper's RandAugment (data/randaugment.py) where the recipe has one. Mixup mixes whole batches,
so it lives in the training step.

Evaluation is timm's eval transform, set by `aug.eval_crop_mode` and `aug.eval_crop_pct`:
"squash" resizes both sides to img_size / crop_pct (at 1.0: straight to the resolution),
"center" resizes the shorter side to img_size / crop_pct; both then centre-crop img_size. It resizes
with `aug.eval_interpolation` (else data.interpolation). "box" is the authors' pre-training
evaluation, big_vision's `resize_small(256, method="area")|central_crop(224)`: `AreaResizeCrop`
averages each output pixel over the input area it covers, as tf.image.resize's "area" does (PIL's
BOX filter, which timm would use, counts whole pixels by their centres instead).
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

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
DEFAULT_DECODE = "uint8"  # data.decode where a config has none: the loader hands over uint8, the device normalises
AREA = "box"  # timm's interpolation name for tf.image.resize's "area": a model's pretrained_cfg stays timm's


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
    return T.Compose([*resize_shift_flip(data, aug), MaybeToTensor(), T.Normalize(list(data.mean), list(data.std))])


def resize_shift_flip(data: DictConfig, aug: DictConfig) -> list:
    """Training without the Inception crop (the digits): resize, the optional pad-and-crop shift, the
    optional flip; on PIL images or uint8 tensors alike."""
    if randaugment(aug):
        raise UserError("RandAugment runs after the Inception crop; set aug.inception_crop=true or randaug_magnitude=0")
    steps = [T.Resize((data.img_size, data.img_size), interpolation=str_to_interp_mode(data.interpolation))]
    if aug.get("pad_crop"):
        steps.append(T.RandomCrop(data.img_size, padding=aug.pad_crop))
    if aug.get("hflip"):
        steps.append(T.RandomHorizontalFlip())
    return steps


def eval_data_config(data: DictConfig, aug: DictConfig) -> dict:
    """The evaluation preprocessing in timm's data-config keys, as a model's `pretrained_cfg` holds it.
    Without the keys: squash at 1.0, i.e. resize straight to the resolution."""
    mode, pct = aug.get("eval_crop_mode", "squash"), aug.get("eval_crop_pct", 1.0)
    interpolation = aug.get("eval_interpolation") or data.interpolation
    return {"input_size": (data.get("channels", 3), data.img_size, data.img_size), "interpolation": interpolation,
            "mean": tuple(data.mean), "std": tuple(data.std), "crop_pct": pct, "crop_mode": mode}


def eval_transform(data: DictConfig, aug: DictConfig) -> T.Compose:
    """PIL image -> normalised float tensor (C, img_size, img_size), deterministic."""
    cfg = eval_data_config(data, aug)
    if cfg["interpolation"] != AREA:
        return create_transform(**cfg, is_training=False)
    area = AreaResizeCrop(data.img_size, cfg["crop_pct"], cfg["crop_mode"])
    return T.Compose([area, v2.ToDtype(torch.float32, scale=True), T.Normalize(list(data.mean), list(data.std))])


@functools.lru_cache(maxsize=64)
def area_taps(n: int, n_out: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Output pixel j is the mean of the input over [j, j + 1) * n / n_out, each input pixel weighted
    by the share of it the interval covers: (input index, weight) per output pixel for each of the
    ceil(n / n_out) + 1 pixels an interval can touch (weight 0 past its end)."""
    scale = n / n_out
    start = torch.arange(n_out, dtype=torch.float64) * scale
    taps = []
    for k in range(math.ceil(scale) + 1):
        pixel = start.floor() + k
        share = (torch.minimum(start + scale, pixel + 1) - torch.maximum(start, pixel)).clamp_(min=0) / scale
        taps.append((pixel.clamp_(max=n - 1).long(), share))
    return taps


def area_resize_first(x: torch.Tensor, n_out: int) -> torch.Tensor:
    """float64 (n, ...) -> (n_out, ...) along dim 0, where selecting rows copies contiguous memory."""
    out = torch.zeros(n_out, *x.shape[1:], dtype=x.dtype, device=x.device)
    for index, share in area_taps(x.shape[0], n_out):
        out.add_(x.index_select(0, index.to(x.device)).mul_(share.to(x.device).view(-1, *[1] * (x.dim() - 1))))
    return out


def area_resize(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 (C, H, W) -> uint8 (C, height, width) as `tf.cast(tf.image.resize(img, method="area"), uint8)`:
    area means, truncated (the 1e-9 keeps a flat region's value from float error)."""
    rows = area_resize_first(img.permute(1, 0, 2).contiguous().to(torch.float64), height)  # (height, C, W)
    out = area_resize_first(rows.permute(2, 1, 0).contiguous(), width)  # (width, C, height)
    return out.permute(1, 2, 0).add_(1e-9).floor_().clamp_(0, 255).to(torch.uint8)


def area_resize_crops(images: list[torch.Tensor], resized: list[tuple[int, int]], size: int) -> torch.Tensor:
    """uint8 (C, H, W) images of any sizes, each area-resized to its (height, width) in `resized` and
    centre-cropped to size x size (floor of the margins) -> uint8 (B, C, size, size): `area_resize`
    and the crop in batched ops, as many as the batch's largest scale needs, not one set per image
    (kernel launches, on a GPU); only the kept pixels are computed. The images lie end to end in one
    buffer. Along a row, the area under an output pixel is a difference of the buffer's running sums
    (exact, in integers) at its first and last pixels, plus the part of the first it covers and less
    the part of the last it does not; down a column, `area_taps` weight the rows. Equal to
    `area_resize` but where float64's other order of sums lands the other side of a whole level."""
    channels = images[0].shape[0]
    flat = torch.cat([image.reshape(channels, -1) for image in images], 1)
    sums = flat.cumsum(1, dtype=torch.long)  # sums[:, p]: flat[:, :p + 1] summed
    kept = [kept_area(*image.shape[-2:], *out, size) for image, out in zip(images, resized)]
    taps = max(len(k.rows) for k in kept)
    rows, shares = (torch.stack([torch.stack([k.rows[t][i] if t < len(k.rows) else torch.zeros_like(k.rows[0][i])
                                              for k in kept]) for t in range(taps)]) for i in (0, 1))
    first, last, start_cut, end_cut = (torch.stack([getattr(k, name) for k in kept])
                                       for name in ("first", "last", "start_cut", "end_cut"))
    offsets = list(itertools.accumulate((image[0].numel() for image in images[:-1]), initial=0))
    rows, first, last, offsets, widths = on_device(flat.device, rows, first, last, torch.tensor(offsets),
                                                   torch.tensor([image.shape[-1] for image in images]))
    shares, start_cut, end_cut, scales = on_device(flat.device, shares, start_cut, end_cut,
                                                   torch.tensor([k.scale for k in kept], dtype=torch.float64))
    first_in, last_out = (1 - start_cut)[:, None, :], (1 - end_cut)[:, None, :]
    shape = (channels, len(images), size, size)
    out = torch.zeros(shape, dtype=torch.float64, device=flat.device)
    for row, share in zip(rows, shares):  # (B, size) each: one input row of each kept output row, and its weight
        line = (offsets[:, None] + row * widths[:, None])[:, :, None]
        begin, end = (line + first[:, None, :]).view(-1), (line + last[:, None, :]).view(-1)
        covered = (sums.index_select(1, end) - sums.index_select(1, begin)).view(shape).to(torch.float64)
        covered.addcmul_(flat.index_select(1, begin).view(shape), first_in)
        covered.addcmul_(flat.index_select(1, end).view(shape), last_out, value=-1)
        out.addcmul_(covered, share[:, :, None])
    out.div_(scales[:, None, None]).add_(1e-9).floor_().clamp_(0, 255)  # the 1e-9 as in area_resize
    return out.to(torch.uint8).permute(1, 0, 2, 3).contiguous()


@dataclass
class KeptArea:
    """One image's part in `area_resize_crops`, worked out on the CPU."""

    rows: list[tuple[torch.Tensor, torch.Tensor]]  # area_taps of the kept output rows: (input row, weight) each
    first: torch.Tensor  # (size,) the first input column each kept output column covers, in part
    last: torch.Tensor  # (size,) its last
    start_cut: torch.Tensor  # (size,) the part of `first` before the output column's start
    end_cut: torch.Tensor  # (size,) the part of `last` before the output column's end
    scale: float  # input columns per output column


@functools.lru_cache(maxsize=256)  # a data set's images come in a few sizes: ImageNet's mostly 500x375, 375x500
def kept_area(height: int, width: int, out_height: int, out_width: int, size: int) -> KeptArea:
    top, left = (out_height - size) // 2, (out_width - size) // 2
    scale = width / out_width
    start = torch.arange(left, left + size, dtype=torch.float64) * scale  # as area_taps' starts
    end = (start + scale).clamp_(max=width)
    first, last = start.floor(), (end.ceil() - 1).clamp_(min=start.floor())  # an end flush with a pixel's: not the next
    return KeptArea([(index[top:top + size], share[top:top + size]) for index, share in area_taps(height, out_height)],
                    first.long(), last.long(), start - first, end - last, scale)


def on_device(device: torch.device, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """CPU tensors of one dtype on the device, moved in one copy rather than one each."""
    packed = torch.cat([t.reshape(-1) for t in tensors]).to(device)
    return [part.view(t.shape) for part, t in zip(packed.split([t.numel() for t in tensors]), tensors)]


class AreaResizeCrop:
    """PIL image or uint8 (C, H, W) tensor -> uint8 (C, size, size): big_vision's
    `resize_small(size / crop_pct, "area")|central_crop(size)` ("center") or an area resize of both
    sides ("squash"), with TF's rounding of the longer side and floor of the crop offsets."""

    def __init__(self, size: int, crop_pct: float, crop_mode: str):
        self.size, self.crop_mode = size, crop_mode
        self.resize_to = math.floor(size / crop_pct)  # timm's scale_size: 256 for 224 at 0.875

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        if self.crop_mode == "squash":
            return self.resize_to, self.resize_to
        ratio = self.resize_to / min(height, width)
        return round(height * ratio), round(width * ratio)  # tf.round: half to even, as python's

    def __call__(self, img) -> torch.Tensor:
        img = img if isinstance(img, torch.Tensor) else v2.functional.pil_to_tensor(img)
        height, width = self.resized_size(*img.shape[-2:])
        top, left = (height - self.size) // 2, (width - self.size) // 2
        return area_resize(img, height, width)[..., top:top + self.size, left:left + self.size]

    def on_batch(self, images: list[torch.Tensor]) -> torch.Tensor:
        """uint8 (C, H, W) images of any sizes, on one device -> uint8 (B, C, size, size), each as
        `__call__` makes it. Batched on a GPU, where a few ops per image would be kernel launches; on a
        CPU `area_resize`'s copies of whole rows beat the batch's gathers (12x, one thread, 128 images)."""
        if images[0].device.type == "cpu":
            return torch.stack([self(img) for img in images])
        return area_resize_crops(images, [self.resized_size(*img.shape[-2:]) for img in images], self.size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, resize_to={self.resize_to}, crop_mode={self.crop_mode})"


def demo_transform(data: DictConfig, aug: DictConfig, train: bool) -> v2.Transform:
    """The in-memory demo digits (28x28 uint8 tensors): resized when the model wants another
    resolution (fine-tuning with --res), shifted on train, then normalised here (data.decode=pil) or
    on the device (uint8)."""
    from mixer_cli.data.demo import IMG_SIZE

    size = data.img_size
    resize = [v2.Resize((size, size), interpolation=str_to_interp_mode(data.interpolation))] if size != IMG_SIZE else []
    shift = [v2.RandomCrop(size, padding=aug.pad_crop)] if train and aug.get("pad_crop") else []
    steps = [*resize, *shift, *to_float(data)]
    return v2.Compose(steps) if steps else v2.Identity()


def hands_over_uint8(data: DictConfig) -> bool:
    """Whether the loader hands over uint8 images (or encoded bytes) for the device to normalise."""
    return data.get("decode", DEFAULT_DECODE) != "pil"


def to_float(data: DictConfig) -> list:
    """The float path's last steps, uint8 -> normalised float; none where the device normalises."""
    if hands_over_uint8(data):
        return []
    # x / 255 as ToTensor divides (v2.ToDtype multiplies by 1 / 255: a last bit apart), for every source alike
    return [T.ConvertImageDtype(torch.float32), T.Normalize(list(data.mean), list(data.std))]
