"""The batched tensor RandAugment (data/device_randaugment.py) against the PIL port it stands in for
(data/randaugment.py): the same draws for a seed, and each op's pixels, on CPU tensors."""
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from mixer_cli.data import device_randaugment as dra
from mixer_cli.data import randaugment as ra
from mixer_cli.data.device_randaugment import ImageSize, apply_layers, draw_layers
from mixer_cli.data.randaugment import OP_NAMES, RandAugment, op_args

# Largest |tensor port - PIL port| in grey levels, measured over MAGNITUDES on the batches below
# (photos, noise, flat and two-level images, non-square, tiny) and asserted. Every op is exact: each
# reproduces PIL's own arithmetic (its C code's, where a float rounding decides a level).
MAX_DIFFERENCE = {
    "AutoContrast": 0,  # PIL's float64 lut: level x scale + offset, truncated; a flat channel unchanged
    "Equalize": 0,  # PIL's integer lut: (step // 2 + pixels below) // step; one level or step 0 unchanged
    "Invert": 0,
    "Rotate": 0,  # PIL's 16.16 fixed-point nearest sampling (affine_fixed), grey fill
    "Posterize": 0,
    "Solarize": 0,  # threshold wrapped at 256, as the PIL port
    "Color": 0,  # PIL's integer luma, then Image.blend in float32 with its roundings, truncated
    "Contrast": 0,  # the luma's mean, rounded as PIL's int(mean + 0.5), then blend
    "Brightness": 0,  # blend with black
    "Sharpness": 0,  # PIL's 3x3 SMOOTH in float32, in its summation order, border copied; then blend
    "ShearX": 0,  # fixed point, as Rotate
    "ShearY": 0,
    "TranslateX": 0,  # PIL's float64 scale path (ImagingScaleAffine)
    "TranslateY": 0,
    "Cutout": 0,
    "SolarizeAdd": 0,
}
# From m=2.5 (PIL refuses Posterize's 0 bits below it) past 10, where no level is capped: 27 keeps
# 10 -> 8 bits and wraps Solarize's threshold twice; fractional m gives fractional offsets and angles;
# at 10 a shear of 0.3 puts every 10th row's coordinates exactly on pixel edges.
MAGNITUDES = (2.5, 9.3, 10, 15, 20, 27)


def photo(height: int, width: int, seed: int) -> torch.Tensor:
    """uint8 (3, H, W): smooth colour fields plus grain, like a natural image."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    noisy = np.asarray(coarse) + rng.normal(0, 12, (height, width, 3))
    return torch.from_numpy(np.clip(noisy, 0, 255).astype(np.uint8)).permute(2, 0, 1).contiguous()


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8)
    flat = torch.full((1, 3, 32, 32), 77, dtype=torch.uint8)  # AutoContrast's and Equalize's identity case
    # half its pixels at 40, half at 201: a mean of 120.5, which PIL's int(mean + 0.5) takes up to 121
    two_levels = torch.full((32 * 32,), 40, dtype=torch.uint8)
    two_levels[torch.randperm(32 * 32, generator=g)[:512]] = 201
    two_levels = two_levels.view(1, 1, 32, 32).expand(1, 3, 32, 32)
    return [
        torch.cat([torch.stack([photo(32, 32, seed) for seed in range(4)]), noise, flat, two_levels]),
        torch.stack([photo(24, 40, seed) for seed in range(3)]),  # non-square: height and width kept apart
        torch.randint(0, 256, (3, 3, 8, 8), generator=g, dtype=torch.uint8),  # Equalize: too few pixels for a step
    ]


def pil_port(name: str, images: torch.Tensor, args: list[tuple]) -> torch.Tensor:
    return torch.stack([F.pil_to_tensor(ra.OPS[name](F.to_pil_image(img), *a)) for img, a in zip(images, args)])


@pytest.mark.parametrize("name", OP_NAMES)
def test_each_op_gives_the_pil_ports_pixels(name):
    torch.manual_seed(0)
    changed = False
    for images in batches():
        height, width = images.shape[-2:]
        for m in MAGNITUDES:
            args = [op_args(name, m, ImageSize(height, width)) for _ in images]
            ours, expected = dra.OPS[name](images, args), pil_port(name, images, args)
            assert ours.dtype == torch.uint8 and ours.shape == images.shape
            assert (ours.int() - expected.int()).abs().max() <= MAX_DIFFERENCE[name], (m, tuple(images.shape))
            changed |= not torch.equal(expected, images)
    assert changed  # each op did something on these images, so the comparison has teeth


def recorded_pil_draws(monkeypatch, randaugment: RandAugment, images: torch.Tensor) -> tuple[list, torch.Tensor]:
    """The PIL RandAugment on each image: the (op, arguments) it applied, in order, and its outputs."""
    applied: list = []
    for name, op in list(ra.OPS.items()):
        def recording(img, *args, name=name, op=op):
            applied[-1].append((name, args))
            return op(img, *args)
        monkeypatch.setitem(ra.OPS, name, recording)
    outputs = []
    for img in images:
        applied.append([])
        outputs.append(F.pil_to_tensor(randaugment(F.to_pil_image(img))))
    return applied, torch.stack(outputs)


@pytest.mark.parametrize("magnitude", [10, 15])
def test_a_seeded_batch_draws_the_pil_paths_ops_and_gives_its_images(monkeypatch, magnitude):
    """One seed, the same (op, arguments) per image in the same order, and the same images; each op
    runs once per layer, on all the images that drew it (batched, not per image)."""
    randaugment = RandAugment(num_layers=3, magnitude=magnitude)
    images = torch.stack([photo(32, 32, seed) for seed in range(24)])
    torch.manual_seed(7)
    expected_draws, expected = recorded_pil_draws(monkeypatch, randaugment, images)
    torch.manual_seed(7)
    draws = [draw_layers(randaugment, 32, 32) for _ in images]
    assert draws == expected_draws

    calls = []  # (op, images it ran on)
    for name, op in list(dra.OPS.items()):
        def counting(x, args, name=name, op=op):
            calls.append((name, len(x)))
            return op(x, args)
        monkeypatch.setitem(dra.OPS, name, counting)
    out = apply_layers(images, draws)
    assert torch.equal(out, expected)
    layers = [Counter(name for name, _ in layer) for layer in zip(*draws)]
    assert all(len(layer) > 1 for layer in layers)  # several ops per layer: the grouping is exercised
    assert Counter(calls) == sum((Counter(layer.items()) for layer in layers), Counter())


def test_apply_layers_leaves_its_input_alone_and_stays_on_the_device():
    images = torch.stack([photo(16, 16, seed) for seed in range(2)])
    before = images.clone()
    out = apply_layers(images, [[("Invert", ())], [("Cutout", (4, 8, 8))]])
    assert torch.equal(images, before) and out.device == images.device
    assert torch.equal(out[0], 255 - images[0]) and (out[1, :, 4:12, 4:12] == 128).all()
