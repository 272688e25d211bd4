"""The uint8 loader path and device normalisation give the model the float path's tensors; GPU
decoding (run here with device=cpu) crops the same boxes. Differences are in grey levels (0-255)."""
import io
import random

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import nn
from torchvision import transforms as T

from mixer_cli.commands.data_bench import pil_decode, synthetic_jpegs
from mixer_cli.core.errors import UserError
from mixer_cli.data import device_transforms
from mixer_cli.data.device_randaugment import apply_layers
from mixer_cli.data.device_transforms import (
    DecodeResize,
    NormalizeOnDevice,
    collate_encoded,
    dct_scale,
    decode,
    decode_on_device,
    eval_uint8_transform,
    gpu_decode_transform,
    is_plain_png,
    read_header,
    train_uint8_transform,
)
from mixer_cli.data.inception_crop import tf_resize_crops
from mixer_cli.data.transforms import eval_transform, randaugment, train_transform
from mixer_cli.train.module import Evaluator

MEAN, STD = [0.5, 0.4, 0.3], [0.5, 0.25, 0.2]  # unequal per channel: a broadcast or channel-order bug shows
SMALL = synthetic_jpegs(2, size=(200, 150), seed=1)  # crops at 64 px never reach the DCT-scaled decode
LARGE = synthetic_jpegs(1, seed=3)[0]  # 500x375, ImageNet-like


def configs(size: int, area_min: float = 0.05, magnitude: int = 0, mode: str = "center", pct: float = 0.875,
            antialias: bool = False):
    data = OmegaConf.create({"img_size": size, "channels": 3, "mean": MEAN, "std": STD, "interpolation": "bilinear"})
    aug = OmegaConf.create({"inception_crop": True, "crop_area_min": area_min, "crop_sampler": "tf",
                            "crop_antialias": antialias, "hflip": True, "randaug_layers": 2,
                            "randaug_magnitude": magnitude, "eval_crop_mode": mode, "eval_crop_pct": pct})
    return data, aug


def seeded(seed: int, fn, *args):
    """fn(*args) with the RNGs the transforms draw from (python's for the box, torch's) at `seed`."""
    random.seed(seed)
    torch.manual_seed(seed)
    return fn(*args)


def grey_levels(normalised: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """|a - b| of two normalised images, back in grey levels."""
    return (normalised - other).abs() * 255 * torch.tensor(STD).view(3, 1, 1)


def device_normalised(x: torch.Tensor) -> torch.Tensor:
    return NormalizeOnDevice(MEAN, STD)(x[None])[0]


@pytest.mark.parametrize("antialias", [False, True])
def test_uint8_path_gives_the_float_paths_tensors_and_boxes(antialias):
    """Same seed -> same box and flip. TF's resize is one function on both paths: equal tensors. The
    antialiased resamplers (PIL vs torchvision's uint8 kernel) round apart by at most one grey level
    (at up to a quarter of the values for some scales); the decoders do not differ at all."""
    data, aug = configs(64, antialias=antialias)
    floats, uint8 = train_transform(data, aug), train_uint8_transform(data, aug)
    flips = []
    for seed in range(6):
        raw = SMALL[seed % 2]
        (top, left, height, width), flip = seeded(seed, uint8.sample, read_header(raw))
        assert dct_scale(height, width, 64, 64) == 1
        flips.append(flip)
        ours = seeded(seed, uint8, raw)
        assert ours.dtype == torch.uint8 and ours.shape == (3, 64, 64)
        diff = grey_levels(seeded(seed, floats, pil_decode(raw)), device_normalised(ours))
        assert diff.max() <= (1 + 1e-3 if antialias else 1e-3) and diff.mean() < 0.3
    assert set(flips) == {True, False}


def test_uint8_path_with_randaugment_draws_the_same_ops():
    """RandAugment runs on the same PIL images: its draws line up, so only the resampling's one-level
    differences remain, which a threshold op (Solarize, Posterize) can amplify at single pixels."""
    data, aug = configs(64, magnitude=15, antialias=True)
    floats, uint8 = train_transform(data, aug), train_uint8_transform(data, aug)
    for seed in range(4):
        diff = grey_levels(seeded(seed, floats, pil_decode(SMALL[0])), device_normalised(seeded(seed, uint8, SMALL[0])))
        assert diff.mean() < 0.05


@pytest.mark.parametrize("mode,pct,interpolation", [("center", 0.875, None), ("squash", 1.0, None),
                                                   ("center", 0.875, "box")])
def test_uint8_eval_gives_the_float_eval_tensors(mode, pct, interpolation):
    """Bilinear: PIL's and torchvision's antialiased kernels, within a level. The area resize of the
    pre-training evaluation is one function on every path, the GPU's `on_tensor` too: equal tensors."""
    data, aug = configs(64, mode=mode, pct=pct)
    aug.eval_interpolation = interpolation
    floats, uint8 = eval_transform(data, aug), eval_uint8_transform(data, aug)
    for raw in [*SMALL, LARGE]:
        bound = 1e-3 if interpolation else 1 + 1e-3
        assert grey_levels(floats(pil_decode(raw)), device_normalised(uint8(raw))).max() <= bound
        if interpolation:
            assert torch.equal(uint8.on_tensor(decode(raw)), uint8(raw))


def test_dct_scale_leaves_the_crop_three_times_the_output():
    assert dct_scale(300, 400, 32, 32) == 2  # 300 / 32 = 9.4 >= 3 x 2, < 3 x 4
    assert dct_scale(800, 800, 32, 32) == 8
    assert dct_scale(95, 400, 32, 32) == 1  # the shorter side decides
    assert dct_scale(300, 200, 100, 10) == 1


def test_dct_scaled_decode_keeps_large_crops_within_about_a_grey_level():
    """With the antialiased resize, a crop >= 6x the output decodes at 1/2 or 1/4 scale: a different
    low-pass than decoding in full and resizing, bounded here on grain-heavy synthetic photos (mean <
    1.5 levels a crop). TF's resize has no low-pass to stand in for: it decodes in full, equal tensors."""
    data, aug = configs(32, area_min=0.5)
    floats, uint8 = train_transform(data, aug), train_uint8_transform(data, aug)
    assert grey_levels(seeded(0, floats, pil_decode(LARGE)), device_normalised(seeded(0, uint8, LARGE))).max() < 1e-3
    aug.crop_antialias = True
    floats, uint8 = train_transform(data, aug), train_uint8_transform(data, aug)
    for seed in range(4):
        (_, _, height, width), _ = seeded(seed, uint8.sample, read_header(LARGE))
        assert dct_scale(height, width, 32, 32) > 1
        diff = grey_levels(seeded(seed, floats, pil_decode(LARGE)), device_normalised(seeded(seed, uint8, LARGE)))
        assert diff.mean() < 1.5
    floats, uint8 = eval_transform(data, aug), eval_uint8_transform(data, aug)
    assert grey_levels(floats(pil_decode(LARGE)), device_normalised(uint8(LARGE))).mean() < 1.0  # 375 -> 36 px: at 1/2


def test_device_decode_crops_the_cpu_paths_boxes():
    """decode_on_device (nvJPEG on a GPU; libjpeg here) with the same seed gives the CPU path's crops:
    same sampler, same draws in the same order; a PNG in the batch decodes on the CPU instead."""
    data, aug = configs(32)
    png = io.BytesIO()
    Image.open(io.BytesIO(SMALL[1])).save(png, format="PNG")
    raws = [SMALL[0], png.getvalue(), SMALL[1]]
    images, labels = collate_encoded([(raw, i) for i, raw in enumerate(raws)])
    assert labels.tolist() == [0, 1, 2] and bytes(images[1].numpy()) == raws[1]
    for transform in gpu_decode_transform(data, aug, train=True), gpu_decode_transform(data, aug, train=False):
        batch = seeded(0, decode_on_device, images, transform, "cpu")
        assert batch.dtype == torch.uint8 and batch.shape == (3, 3, 32, 32)
        cpu = seeded(0, lambda t=transform: torch.stack([t(raw) for raw in raws]))
        assert (batch.int() - cpu.int()).abs().max() <= 1  # float vs uint8 resampling kernels


def test_device_decode_runs_randaugment_batched_as_the_cpu_path_does(monkeypatch):
    """With RandAugment, decode_on_device draws each image's ops right after its box and flip, as the
    CPU path does, and applies them batched: given the same crops (the CPU path's float resize may round
    a pixel a level apart: tests/test_inception_crop.py), the outputs are equal bit for bit (the tensor
    ops give the PIL ops' pixels: tests/test_device_randaugment.py)."""
    data, aug = configs(32, magnitude=15)
    transform = gpu_decode_transform(data, aug, train=True)
    monkeypatch.setattr(transform, "crop", lambda img, box, flip: tf_resize_crops([img], [box], [flip], 32)[0])
    assert repr(transform.randaugment) == "RandAugment(num_layers=2, magnitude=15)"
    raws = [SMALL[i % 2] for i in range(8)]
    images, _ = collate_encoded([(raw, 0) for raw in raws])
    batched, cropped = [], []
    monkeypatch.setattr(device_transforms, "apply_layers",
                        lambda x, draws: batched.append(len(x)) or apply_layers(x, draws))
    monkeypatch.setattr(device_transforms, "tf_resize_crops",
                        lambda images, *args: cropped.append(len(images)) or tf_resize_crops(images, *args))
    for seed in range(3):
        batch = seeded(seed, decode_on_device, images, transform, "cpu")
        cpu = seeded(seed, lambda: torch.stack([transform(raw) for raw in raws]))
        assert batch.dtype == torch.uint8 and batch.shape == (8, 3, 32, 32) and torch.equal(batch, cpu)
        transform.randaugment = None  # the same seed without RandAugment: it did change the batch
        assert not torch.equal(seeded(seed, decode_on_device, images, transform, "cpu"), batch)
        transform.randaugment = randaugment(aug)
    assert batched == [8, 8, 8] and cropped == [8] * 6  # once per batch, not per image


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_device_decode_crops_image_by_image_where_the_resize_is_not_tfs_bilinear(interpolation):
    """The antialiased resize and TF's bicubic have no batched form: each image is cropped as the CPU
    path crops it, after the same draws."""
    data, aug = configs(32, antialias=interpolation == "bilinear")
    data.interpolation = interpolation
    transform = gpu_decode_transform(data, aug, train=True)
    images, _ = collate_encoded([(raw, 0) for raw in SMALL])
    batch = seeded(1, decode_on_device, images, transform, "cpu")
    assert torch.equal(batch, seeded(1, lambda: torch.stack([transform(raw) for raw in SMALL])))


def test_device_decode_needs_the_inception_crop_for_training():
    data, aug = configs(32, magnitude=15)
    gpu_decode_transform(data, aug, train=False)  # evaluation has no RandAugment
    aug.inception_crop = False
    with pytest.raises(UserError, match="without aug.inception_crop use data.decode=uint8"):
        gpu_decode_transform(data, aug, train=True)


def test_normalize_on_device_maps_uint8_to_the_normalised_range_and_adds_no_state():
    norm = NormalizeOnDevice(MEAN, STD)
    x = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 1, 1, 3).expand(2, 3, 1, 3)
    out = norm(x)
    expected = [[(0 - m) / s, (1 - m) / s, (0.2 - m) / s] for m, s in zip(MEAN, STD)]
    assert out.dtype == torch.float32 and torch.allclose(out[1, :, 0], torch.tensor(expected), atol=1e-6)
    # no buffers: DDP has nothing to broadcast before an evaluation forward that only some ranks run
    evaluator = Evaluator(nn.Linear(3, 2), num_classes=2, normalize=norm)
    assert list(evaluator.buffers()) == [] and list(evaluator.state_dict()) == ["model.weight", "model.bias"]


def encoded_image(mode: str, size: int, fmt: str = "PNG", seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
    img = Image.fromarray(pixels).convert(mode.removesuffix("+tRNS"))
    if mode == "RGBA":
        img.putalpha(Image.fromarray(pixels[..., 0]))
    out = io.BytesIO()
    img.save(out, fmt, **({"transparency": 7} if mode.endswith("+tRNS") else {}))
    return out.getvalue()


PNG_CASES = [("L", 28, "PNG", True), ("RGB", 28, "PNG", True), ("P", 28, "PNG", False), ("RGBA", 28, "PNG", False),
             ("L+tRNS", 28, "PNG", False), ("I;16", 28, "PNG", False), ("L", 32, "PNG", False),
             ("RGB", 28, "JPEG", False)]


@pytest.mark.parametrize("channels, mode, size, fmt, fast", [
    (c, *case) for c in (1, 3) for case in PNG_CASES if not (c == 3 and case[0] == "I;16")])  # PIL: no 16-bit to RGB
def test_decode_resize_gives_the_float_paths_pixels(channels, mode, size, fmt, fast):
    """Grey or RGB, palette, alpha, a transparent grey level, 16-bit, another size, JPEG: the PIL decode and
    resize, bit for bit; torchvision's PNG decoder only where the PNG already holds the wanted pixels."""
    raw = encoded_image(mode, size, fmt)
    assert (b"tRNS" in raw) == mode.endswith("+tRNS")
    resize = T.Resize((28, 28))
    expected = T.PILToTensor()(resize(Image.open(io.BytesIO(raw)).convert("RGB" if channels == 3 else "L")))
    assert is_plain_png(raw, channels, 28) == (fast and (mode == "L") == (channels == 1))
    assert torch.equal(DecodeResize(channels, 28, resize)(raw), expected)
