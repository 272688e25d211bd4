"""The Inception crop draws its boxes as TF's sample_distorted_bounding_box does and resizes them as
tf.image.resize(bilinear, antialias=False) with a truncating cast, the authors' input pipeline."""
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation

from mixer_cli.core.errors import UserError
from mixer_cli.data.inception_crop import InceptionCrop, tf_crop_box, tf_resize

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
