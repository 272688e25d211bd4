"""`mixer visualize`: what the first token-mixing MLPs and the stem learn (Sec. 3.5, Figure 5, App. D).

A hidden unit of a token-mixing MLP has one weight per patch (the rows of W1, 196 for B/16), so it
is drawn as a grid-shaped image (14 x 14 for B/16). As in Figure 5 each unit is paired with the unit
closest to its opposite (most negative cosine similarity), and the pairs are sorted by spatial
frequency; the stem's filters are drawn as P x P images (RGB for colour inputs).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mixer_cli.core.errors import UserError
from mixer_cli.core.files import csv_text, write_atomic
from mixer_cli.core.plots import pyplot, save_figure
from mixer_cli.models import load_mixer
from mixer_cli.models.mixer import Mixer


def token_mixing_units(model: Mixer, block: int) -> np.ndarray:
    """(D_S, grid, grid): the first-layer weights of the block's token-mixing MLP, one image per unit;
    tokens are the stem's output in row-major patch order, so the image is the patch layout."""
    g = model.spec.grid
    return model.blocks[block].mlp_tokens.fc1.weight.detach().float().cpu().numpy().reshape(-1, g, g)


def pair_opposite_phase(units: np.ndarray) -> list[tuple[int, int, float]]:
    """Greedy matching: repeatedly pair the two remaining units with the most negative cosine
    similarity. Returns (unit, partner, cosine); with an odd count the last unit pairs with itself."""
    flat = units.reshape(len(units), -1)
    flat = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
    cos = flat @ flat.T
    np.fill_diagonal(cos, np.inf)
    left, pairs = set(range(len(units))), []
    for flat_index in np.argsort(cos, axis=None):
        if len(left) < 2:
            break
        i, j = divmod(int(flat_index), len(units))
        if i < j and i in left and j in left:
            pairs.append((i, j, float(cos[i, j])))
            left -= {i, j}
    pairs += [(i, i, 1.0) for i in left]
    return pairs


def spatial_frequency(image: np.ndarray) -> float:
    """Power-weighted mean radial frequency (cycles per patch step) of the zero-mean image."""
    power = np.abs(np.fft.fft2(image - image.mean())) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(image.shape[0]), np.fft.fftfreq(image.shape[1]), indexing="ij")
    return float((power * np.hypot(fx, fy)).sum() / max(power.sum(), 1e-30))


def pairs_by_frequency(units: np.ndarray) -> list[dict]:
    """Opposite-phase pairs, lowest frequency first (the order of Figure 5)."""
    frequency = [spatial_frequency(u) for u in units]
    rows = [
        {"unit": i, "partner": j, "cosine": c, "frequency": (frequency[i] + frequency[j]) / 2}
        for i, j, c in pair_opposite_phase(units)
    ]
    return sorted(rows, key=lambda r: r["frequency"])


def mosaic(tiles: np.ndarray, cols: int, gap: int, fill: float) -> np.ndarray:
    """(N, h, w[, 3]) tiles -> one image, `cols` tiles a row, `gap` pixels of `fill` between them."""
    n, h, w = tiles.shape[:3]
    rows = -(-n // cols)
    out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, *tiles.shape[3:]), fill, dtype=np.float32)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, cols)
        out[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = tile
    return out


def pair_tiles(units: np.ndarray, pairs: list[dict]) -> np.ndarray:
    """Each pair side by side, one column of blank between, scaled together to [-1, 1] so that
    opposite phases show as swapped colours."""
    g = units.shape[1]
    tiles = np.full((len(pairs), g, 2 * g + 1), np.nan, dtype=np.float32)
    for k, p in enumerate(pairs):
        a, b = units[p["unit"]], units[p["partner"]]
        scale = max(np.abs(a).max(), np.abs(b).max(), 1e-12)
        tiles[k, :, :g], tiles[k, :, g + 1 :] = a / scale, b / scale
    return tiles


def stem_tiles(model: Mixer) -> tuple[np.ndarray, str | None]:
    """The stem filters as (C, P, P) images (or (C, P, P, 3) for RGB) and the colour map to use."""
    w = model.stem.proj.weight.detach().float().cpu().numpy()  # (C, in_chans, P, P)
    if w.shape[1] == 3:
        lo, hi = w.min(axis=(1, 2, 3), keepdims=True), w.max(axis=(1, 2, 3), keepdims=True)
        return np.moveaxis((w - lo) / np.maximum(hi - lo, 1e-12), 1, -1), None
    w = w.mean(axis=1)
    return w / np.maximum(np.abs(w).max(axis=(1, 2), keepdims=True), 1e-12), "RdBu_r"


def save_image(image: np.ndarray, path: Path, title: str, cmap: str | None) -> None:
    """One mosaic as a PNG (blank = NaN shows white), at least 8 inches wide and 4 screen pixels a
    weight, written under a temporary name then renamed."""
    plt = pyplot()
    h, w = image.shape[:2]
    inches = max(0.04, 8 / w)  # per mosaic pixel, at 100 dpi
    title_inches = 0.4
    fig = plt.figure(figsize=(w * inches, h * inches + title_inches))
    ax = fig.add_axes((0, 0, 1, h * inches / (h * inches + title_inches)))
    if cmap:
        ax.imshow(np.ma.masked_invalid(image), cmap=plt.get_cmap(cmap).with_extremes(bad="white"), vmin=-1, vmax=1,
                  interpolation="nearest")
    else:
        ax.imshow(np.nan_to_num(image, nan=1.0), interpolation="nearest")
    ax.set_axis_off()
    fig.text(0.5, 1 - 0.5 * title_inches / (h * inches + title_inches), title, ha="center", va="center", fontsize=9)
    save_figure(fig, path, dpi=100)


def squarish_columns(count: int, tile_h: int, tile_w: int) -> int:
    """Tiles a row so that the mosaic comes out about square."""
    return max(1, min(count, round(np.sqrt(count * tile_h / tile_w))))


def visualize(checkpoint: Path, out_dir: Path | None = None, blocks: int = 3) -> list[Path]:
    """Write token_mixing_block<k>.png for the first `blocks` blocks, token_mixing_pairs.csv and
    stem.png into out_dir (default: beside the checkpoint); returns the files written."""
    if blocks < 1:
        raise UserError(f"--blocks must be at least 1, not {blocks}")
    checkpoint = Path(checkpoint)
    model = load_mixer(checkpoint)
    spec = model.spec
    blocks = min(blocks, spec.num_blocks)
    units = [token_mixing_units(model, b) for b in range(blocks)]
    per_block = [pairs_by_frequency(u) for u in units]  # all the work before any file is written
    out_dir = Path(out_dir) if out_dir is not None else checkpoint.parent / f"{checkpoint.stem}-units"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    g, gap = spec.grid, max(spec.grid // 4, 1) + 2  # wider than the blank inside a pair
    for b, pairs in enumerate(per_block):
        cols = squarish_columns(len(pairs), g + gap, 2 * g + 1 + gap)
        path = out_dir / f"token_mixing_block{b}.png"
        save_image(mosaic(pair_tiles(units[b], pairs), cols, gap, fill=np.nan), path,
                   f"block {b} token mixing: {spec.tokens_mlp_dim} units of {g}x{g} weights (one per patch), "
                   "opposite-phase pairs, low to high frequency", "RdBu_r")
        written.append(path)
    written.append(_write_pairs_csv(out_dir / "token_mixing_pairs.csv", per_block))
    tiles, cmap = stem_tiles(model)
    p, gap = spec.patch_size, max(spec.patch_size // 4, 1)
    path = out_dir / "stem.png"
    save_image(mosaic(tiles, squarish_columns(len(tiles), p + gap, p + gap), gap, fill=np.nan if cmap else 1.0), path,
               f"stem: {spec.hidden_dim} filters of {p}x{p} pixels", cmap)
    written.append(path)
    return written


def _write_pairs_csv(path: Path, per_block: list[list[dict]]) -> Path:
    rows = [{"block": b, "rank": rank, **p} for b, pairs in enumerate(per_block) for rank, p in enumerate(pairs)]
    write_atomic(path, csv_text(rows, ["block", "rank", "unit", "partner", "cosine", "frequency"]))
    return path
