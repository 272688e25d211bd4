"""The Inception crop draws its boxes as TF's sample_distorted_bounding_box does and resizes them as
tf.image.resize(bilinear, antialias=False) with a truncating cast, the authors' input pipeline."""
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.transforms.v2 import functional as F

from mixer_cli.core.errors import UserError
from mixer_cli.data.inception_crop import InceptionCrop, tf_crop_box, tf_resize, tf_resize_crops

DRAWS = 20000
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def reference_tf_boxes(height: int, width: int, area_min: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(heights, widths) of n boxes, from the description of TF's algorithm, vectorised over draws: per
    attempt a ratio r = w/h uniform in [0.75, 1.33]; heights between round(sqrt(min_area / r)) and
    round(sqrt(max_area / r)), the top lowered until round(h r) <= width and h <= height; h uniform
    in between; w = round(h r); one step up if the area is too small, then one down if too large;
    accepted if it fits; 100 attempts, then the whole image."""
    rng = np.random.default_rng(seed)
    min_area, max_area = area_min * height * width, float(height * width)
    heights, widths, done = np.full(n, height), np.full(n, width), np.zeros(n, bool)
    for _ in range(100):
        r = rng.uniform(0.75, 1.33, n)
        low, top = np.rint(np.sqrt(min_area / r)), np.rint(np.sqrt(max_area / r))
        top = np.where(np.rint(top * r) > width, np.floor((width + 0.5) / r), top)
        top = np.minimum(np.where(np.rint(top * r) > width, top - 1, top), height)
        low = np.minimum(low, top)
        h = low + np.floor(rng.random(n) * (top - low + 1))
        h = np.where(np.rint(h * r) * h < min_area, h + 1, h)
        h = np.where(np.rint(h * r) * h > max_area, h - 1, h)
        w = np.rint(h * r)
        fits = (w * h >= min_area) & (w * h <= max_area) & (w >= 1) & (w <= width) & (h >= 1) & (h <= height)
        new = fits & ~done
        heights[new], widths[new], done = h[new], w[new], done | fits
    return heights, widths


def summary(heights, widths, height: int, width: int) -> np.ndarray:
    """Mean and quantiles of the crop's share of the image's area, then of its aspect ratio w/h."""
    area, ratio = np.asarray(heights) * np.asarray(widths) / (height * width), np.asarray(widths) / np.asarray(heights)
    return np.array([area.mean(), *np.quantile(area, QUANTILES), ratio.mean(), *np.quantile(ratio, QUANTILES)])


@pytest.mark.parametrize("height,width", [(375, 500), (512, 160)])  # a landscape photo; a tall strip that
def test_tf_sampler_matches_an_independent_implementation_of_tfs_algorithm(height, width):  # rejects many draws
    rng = random.Random(0)
    boxes = [tf_crop_box(height, width, 0.05, rng) for _ in range(DRAWS)]
    top, left, h, w = map(np.array, zip(*boxes))
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    assert ((top + h < height) | (h == height)).all()  # TF's offsets are Uniform(n): [0, n)
    ours, reference = summary(h, w, height, width), summary(*reference_tf_boxes(height, width, 0.05, DRAWS, 1),
                                                            height, width)
    np.testing.assert_allclose(ours, reference, atol=0.012)
    timm = [RandomResizedCropAndInterpolation.get_params(Image.new("L", (width, height)), (0.05, 1.0), (3 / 4, 4 / 3))
            for _ in range(4000)]
    assert abs(summary(*zip(*[b[2:] for b in timm]), height, width)[0] - reference[0]) > 0.03  # it tells them apart


def test_tf_crops_are_smaller_than_timms_on_a_photo():
    """The issue's measurement: mean crop area 0.343 (TF) vs 0.425 (timm) of a 500x375 image."""
    random.seed(0)
    crop_area = {sampler: np.mean([np.prod(InceptionCrop(224, 0.05, sampler).sample(Image.new("RGB", (500, 375)))[2:])
                                   for _ in range(DRAWS)]) / (500 * 375) for sampler in ("tf", "timm")}
    assert crop_area["tf"] == pytest.approx(0.343, abs=0.008) and crop_area["timm"] == pytest.approx(0.425, abs=0.008)


def test_tf_sampler_falls_back_to_the_whole_image():
    """A 400x20 strip (ratio 0.05) has no box of >= 90% of its area at a ratio of 0.75-1.33."""
    assert tf_crop_box(400, 20, 0.9, random.Random(0)) == (0, 0, 400, 20)


def test_tf_resize_interpolates_at_half_pixel_centres_and_truncates():
    row = torch.tensor([0, 15, 20, 31], dtype=torch.uint8).view(1, 1, 4).expand(1, 4, 4)
    out = tf_resize(row.contiguous(), 2)  # output pixel j samples input x = 2j + 0.5: the mean of 2j, 2j+1
    assert out[0, 0].tolist() == [7, 25]  # 7.5 and 25.5, truncated as tf.cast does (rounding: 8, 26)


def test_tf_resize_does_not_low_pass():
    """An 8x downscale without antialiasing samples pixels 3-4 of every 8 (aliasing, as the paper's
    runs had); the antialiased resize averages all 8."""
    lines = torch.zeros(3, 64, 64, dtype=torch.uint8)
    lines[:, :, 3::8] = lines[:, :, 4::8] = 255
    img = lines.contiguous()
    tf, smooth = InceptionCrop(8, 1.0, antialias=False), InceptionCrop(8, 1.0, antialias=True)
    box = (0, 0, 64, 64)
    assert (tf.crop(img, box) == 255).all()
    assert smooth.crop(img, box).max() < 80  # about a quarter of 255 (more at the edges)


def crops_one_by_one(images, boxes, flips, size):
    return torch.stack([F.horizontal_flip(out) if flip else out
                        for out, flip in ((tf_resize(F.crop(x, *box), size), flip)
                                          for x, box, flip in zip(images, boxes, flips))])


@pytest.mark.parametrize("channels", [1, 3])
def test_batched_crops_are_tf_resize_of_each_box_flipped_where_drawn(channels):
    """Images of many sizes, boxes from the sampler plus the edge cases (the whole image, one pixel, a box
    smaller than the output, flush with the bottom-right corner), against tf_resize one image at a time:
    within one grey level, where a float rounding falls the other side of the truncation (torch's own
    kernel rounds differently with one thread and with two)."""
    rng, generator = random.Random(channels), torch.Generator().manual_seed(channels)
    images = [torch.randint(0, 256, (channels, rng.randint(1, 300), rng.randint(1, 300)), dtype=torch.uint8,
                            generator=generator) for _ in range(12)]
    boxes = [tf_crop_box(*x.shape[1:], 0.05, rng) for x in images[:8]]
    (h0, w0), (h1, w1), (h2, w2), (h3, w3) = (x.shape[1:] for x in images[8:])
    boxes += [(0, 0, h0, w0), (h1 // 2, w1 // 2, 1, 1), (0, 0, min(h2, 5), min(w2, 9)),
              (h3 - h3 // 3, w3 - w3 // 2, h3 // 3 or 1, w3 // 2 or 1)]
    flips = [i % 3 == 0 for i in range(12)]
    for size in 7, 32, 224:
        batched = tf_resize_crops(images, boxes, flips, size)
        assert batched.shape == (12, channels, size, size) and batched.dtype == torch.uint8
        diff = (batched.int() - crops_one_by_one(images, boxes, flips, size)).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.01, (size, (diff > 0).float().mean())
    assert torch.equal(tf_resize_crops(images, boxes, [not f for f in flips], 32),
                       tf_resize_crops(images, boxes, flips, 32).flip(-1))


def test_batched_crops_interpolate_at_half_pixel_centres_of_the_box_and_truncate():
    """The hand-computed case of tf_resize, cut out of a larger image: the box's edges clamp, not the image's."""
    image = torch.full((1, 6, 8), 255, dtype=torch.uint8)
    image[0, 1:5, 2:6] = torch.tensor([0, 15, 20, 31], dtype=torch.uint8)
    out = tf_resize_crops([image, image], [(1, 2, 4, 4)] * 2, [False, True], 2)
    assert out[0, 0].tolist() == [[7, 25], [7, 25]] and out[1, 0].tolist() == [[25, 7], [25, 7]]


def test_pil_and_tensor_images_give_the_same_crop():
    pixels = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    tensor = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
    for antialias in (False, True):
        crop, box = InceptionCrop(32, 0.05, antialias=antialias), (10, 20, 60, 70)
        pil = torch.from_numpy(np.array(crop.crop(Image.fromarray(pixels), box))).permute(2, 0, 1)
        diff = (pil.int() - crop.crop(tensor, box).int()).abs()
        assert diff.max() <= (1 if antialias else 0)  # PIL's and torchvision's antialiased kernels round apart


def test_bad_crop_settings_are_user_errors():
    with pytest.raises(UserError, match="aug.crop_sampler must be one of tf, timm, got inception"):
        InceptionCrop(224, 0.05, "inception")
    with pytest.raises(UserError, match="set aug.crop_antialias=true for data.interpolation=lanczos"):
        InceptionCrop(224, 0.05, interpolation="lanczos")
