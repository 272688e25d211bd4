"""RandAugment as big_vision runs it: op strengths against its level formulas (read and measured on
images), the op set, uniform choice, random signs, pixel conventions, seeding."""
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from mixer_cli.data import randaugment as ra
from mixer_cli.data.randaugment import LEVEL_TO_ARG, OP_NAMES, OPS, RandAugment

# big_vision's level functions by hand: rotate m/10*30 degrees, shear m/10*0.3,
# translate m/10*100 px, Cutout half-side m/10*40 px, SolarizeAdd m/10*110.
EXTENTS = {  # m: (degrees, shear, translate px, cutout half-side px, solarize-add)
    10: (30, 0.3, 100, 40, 110),
    15: (45, 0.45, 150, 60, 165),
    20: (60, 0.6, 200, 80, 220),
}
BIG_VISION_OPS = {"AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color", "Contrast",
                  "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout", "SolarizeAdd"}


def only(monkeypatch, name: str) -> None:
    """Every layer picks `name`: the whole RandAugment path (level, sign, op) for one op."""
    monkeypatch.setattr(ra, "OP_NAMES", (name,))


def draws(aug, img, n):
    return [np.asarray(aug(img)) for _ in range(n)]


def white(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the white pixels: the drawn line, not the black background or grey fill."""
    return np.nonzero(a == 255)


def line_image(h: int, w: int, row: int | None = None, col: int | None = None) -> Image.Image:
    a = np.zeros((h, w), np.uint8)
    if row is not None:
        a[row, w // 5: w - w // 5] = 255
    if col is not None:
        a[:, col] = 255
    return Image.fromarray(a)


def photo(size: int = 224, seed: int = 0) -> Image.Image:
    """Smooth colour fields plus fine noise, like a natural image."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    noisy = np.asarray(coarse) + rng.normal(0, 8, (size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def test_the_op_set_is_big_visions_sixteen():
    assert set(OP_NAMES) == set(OPS) == BIG_VISION_OPS and len(OP_NAMES) == 16


@pytest.mark.parametrize("m", [10, 15, 20])
def test_level_arguments_follow_big_visions_formulas_without_a_cap_at_10(m):
    degrees, shear, pixels, half_side, addition = EXTENTS[m]
    assert LEVEL_TO_ARG["Rotate"](m) == pytest.approx(degrees)
    assert LEVEL_TO_ARG["ShearX"](m) == LEVEL_TO_ARG["ShearY"](m) == pytest.approx(shear)
    assert LEVEL_TO_ARG["TranslateX"](m) == LEVEL_TO_ARG["TranslateY"](m) == pytest.approx(pixels)
    assert LEVEL_TO_ARG["Cutout"](m) == half_side and LEVEL_TO_ARG["SolarizeAdd"](m) == addition
    assert LEVEL_TO_ARG["Posterize"](m) == {10: 4, 15: 6, 20: 8}[m]  # int(m/10*4) bits kept
    assert LEVEL_TO_ARG["Solarize"](m) == {10: 256, 15: 384, 20: 512}[m]  # int(m/10*256)
    for name in ("Color", "Contrast", "Brightness", "Sharpness"):
        assert LEVEL_TO_ARG[name](m) == pytest.approx({10: 1.9, 15: 2.8, 20: 3.7}[m])  # m/10*1.8+0.1


@pytest.mark.parametrize("m", [10, 15, 20])
def test_rotation_measured_on_a_bar_is_m_times_3_degrees_either_way(m, monkeypatch):
    only(monkeypatch, "Rotate")
    torch.manual_seed(0)
    angles = []
    for a in draws(RandAugment(1, m), line_image(201, 201, row=100), 12):
        y, x = white(a)
        (vx, vy) = np.linalg.eigh(np.cov(np.stack([x, y])))[1][:, -1]  # the bar's direction
        angles.append(np.degrees(np.arctan2(-vy, vx) if vx > 0 else np.arctan2(vy, -vx)))  # y points down
    degrees = EXTENTS[m][0]
    assert np.allclose(np.abs(angles), degrees, atol=1.0)
    assert min(angles) < 0 < max(angles)


def line_after(monkeypatch, op: str, axis: str, m: int, h: int, w: int, col: int) -> list[tuple]:
    """Twelve draws of RandAugment(1, m) doing only `op` along `axis` to a line across it (column `col`
    of an h x w image, transposed for Y): each the (along, across) coordinates of the line's pixels."""
    only(monkeypatch, f"{op}{axis}")
    img = line_image(h, w, col=col)
    if axis == "Y":
        img = img.transpose(Image.Transpose.TRANSPOSE)
    torch.manual_seed(0)
    lines = []
    for a in draws(RandAugment(1, m), img, 12):
        rows, cols = white(a)
        lines.append((rows, cols) if axis == "X" else (cols, rows))
    return lines


@pytest.mark.parametrize("m", [10, 15, 20])
@pytest.mark.parametrize("axis", ["X", "Y"])
def test_translation_measured_is_m_times_10_pixels_either_way(m, axis, monkeypatch):
    shifts = set()
    for _, across in line_after(monkeypatch, "Translate", axis, m, 9, 512, col=256):
        assert np.all(across == across[0])  # the whole line moved, unbent
        shifts.add(int(across[0]) - 256)
    assert shifts == {EXTENTS[m][2], -EXTENTS[m][2]}


@pytest.mark.parametrize("m", [10, 15, 20])
@pytest.mark.parametrize("axis", ["X", "Y"])
def test_shear_measured_on_a_line_is_m_times_0_03_either_way(m, axis, monkeypatch):
    lines = line_after(monkeypatch, "Shear", axis, m, 101, 301, col=150)
    slopes = [np.polyfit(along, across, 1)[0] for along, across in lines]
    assert np.allclose(np.abs(slopes), EXTENTS[m][1], atol=0.01)
    assert min(slopes) < 0 < max(slopes)


@pytest.mark.parametrize("m", [10, 15, 20])
def test_cutout_measured_is_a_grey_square_of_side_m_times_8_pixels(m, monkeypatch):
    side = 2 * EXTENTS[m][3]
    grey = np.asarray(OPS["Cutout"](Image.new("L", (300, 300)), EXTENTS[m][3], 150, 150)) == 128
    rows, cols = np.nonzero(grey)
    assert grey.sum() == side * side and np.ptp(rows) + 1 == np.ptp(cols) + 1 == side
    only(monkeypatch, "Cutout")  # through RandAugment: a random centre, the square clipped at the border
    torch.manual_seed(0)
    boxes = [np.ptp(np.nonzero(a == 128), axis=1) + 1 for a in draws(RandAugment(1, m), Image.new("L", (300, 300)), 30)]
    assert np.max(boxes) == side and np.min(boxes) >= EXTENTS[m][3]


def test_pixel_conventions_match_the_tf_code():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)
    img = Image.fromarray(a)
    assert np.array_equal(np.asarray(OPS["Rotate"](img, 90)), np.rot90(a))  # counter-clockwise about the centre
    moved = np.asarray(OPS["TranslateX"](img, 3))  # big_vision translates by -pixels: content moves left
    assert np.array_equal(moved[:, :6], a[:, 3:]) and np.all(moved[:, 6:] == 128)
    sheared = np.asarray(OPS["ShearX"](img, 1.0))  # output (x, y) reads input (x + y, y)
    assert np.array_equal(sheared[2, :7], a[2, 2:]) and np.all(sheared[2, 7:] == 128)
    # Solarize compares with the threshold cast to uint8: m=10 (256) inverts all, m=15 (384) from 128 up.
    ramp = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16))
    r = np.arange(256)
    assert np.array_equal(np.asarray(OPS["Solarize"](ramp, LEVEL_TO_ARG["Solarize"](10))).ravel(), 255 - r)
    assert np.array_equal(np.asarray(OPS["Solarize"](ramp, LEVEL_TO_ARG["Solarize"](15))).ravel(),
                          np.where(r < 128, r, 255 - r))
    added = np.where(r < 128, np.minimum(r + 110, 255), r)
    assert np.array_equal(np.asarray(OPS["SolarizeAdd"](ramp, 110)).ravel(), added)
    assert np.array_equal(np.asarray(OPS["Posterize"](ramp, 4)).ravel(), r & 0xF0)


def test_each_layer_applies_one_op_picked_uniformly_with_a_random_sign(monkeypatch):
    calls = []
    for name in OP_NAMES:
        monkeypatch.setitem(OPS, name, lambda img, *args, name=name: calls.append((name, args)) or img)
    torch.manual_seed(0)
    aug, img = RandAugment(2, 15), Image.new("RGB", (32, 32))
    for _ in range(1600):
        aug(img)
    assert len(calls) == 3200  # every layer applies its op: no skip probability
    counts = Counter(name for name, _ in calls)
    assert stats.chisquare([counts[n] for n in OP_NAMES]).pvalue > 1e-3
    for name in ra.SIGNED:
        args = [a[0] for n, a in calls if n == name]
        assert np.allclose(np.abs(args), LEVEL_TO_ARG[name](15))
        assert stats.binomtest(sum(a > 0 for a in args), len(args)).pvalue > 1e-3
    centres = np.array([a[1:] for n, a in calls if n == "Cutout"])
    assert centres.min() == 0 and centres.max() == 31  # uniform over the whole image, borders included


def test_a_larger_magnitude_changes_images_more():
    img = photo()
    ref = np.asarray(img).astype(float)
    change = []
    for m in (5, 10, 15, 20):
        torch.manual_seed(0)  # the same ops and signs for every m: only the strength differs
        change.append(np.mean([np.abs(a - ref).mean() for a in draws(RandAugment(2, m), img, 150)]))
    assert np.all(np.diff(change) > 0), change


def test_the_same_seed_gives_the_same_images():
    img = photo(64)

    def run(seed):
        torch.manual_seed(seed)
        return draws(RandAugment(2, 15), img, 8)

    assert all(np.array_equal(a, b) for a, b in zip(run(0), run(0)))
    assert not all(np.array_equal(a, b) for a, b in zip(run(0), run(1)))


def test_it_pickles_for_loader_worker_processes():
    import pickle

    aug = pickle.loads(pickle.dumps(RandAugment(2, 15)))
    assert (aug.num_layers, aug.magnitude) == (2, 15) and aug(photo(32)).size == (32, 32)
