"""`mixer visualize` (Sec. 3.5, Figure 5): token-mixing units as images, opposite-phase pairs, frequency order."""
import csv

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mixer_cli.cli import app
from mixer_cli.commands.visualize import pair_opposite_phase, pairs_by_frequency, spatial_frequency, token_mixing_units
from mixer_cli.models import build_mixer


def grating(g, fx, fy, phase=0.0):
    """A g x g cosine grating with fx, fy cycles per image along x and y."""
    y, x = np.mgrid[:g, :g] / g
    return np.cos(2 * np.pi * (fx * x + fy * y) + phase)


def test_spatial_frequency_of_a_grating_is_its_frequency():
    assert spatial_frequency(grating(14, 3, 0)) == pytest.approx(3 / 14)
    assert spatial_frequency(grating(14, 3, 4)) == pytest.approx(5 / 14)  # radial: hypot(3, 4) = 5
    assert spatial_frequency(grating(14, 2, 0) + 7.0) == pytest.approx(2 / 14)  # the mean does not count


def test_units_pair_with_their_opposite_phase():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(5, 7, 7))
    units = np.concatenate([base, -base + 0.1 * rng.normal(size=base.shape)])  # unit k and k + 5 are opposite
    order = rng.permutation(10)
    pairs = pair_opposite_phase(units[order])
    found = {frozenset(order[[i, j]] % 5 * 10 + order[[i, j]] // 5) for i, j, _ in pairs}
    assert found == {frozenset({10 * k, 10 * k + 1}) for k in range(5)}
    assert all(c < -0.9 for _, _, c in pairs)


def test_pairs_are_sorted_by_frequency():
    units = np.stack([grating(14, f, 0, phase) for f in (4, 1, 6, 2) for phase in (0, np.pi)])
    pairs = pairs_by_frequency(units)
    assert [round(p["frequency"] * 14) for p in pairs] == [1, 2, 4, 6]
    assert all({p["unit"], p["partner"]} == {2 * k, 2 * k + 1} for p, k in zip(pairs, [1, 3, 0, 2]))


def test_unit_image_follows_the_patch_layout():
    """The weight drawn at grid cell (r, c) is the one that reads the patch at row r, column c."""
    # kept: a 6 x 6 grid and 4 token-mixing units, the shape the drawing is checked against
    model = build_mixer(None, num_classes=3, img_size=24, in_chans=1, patch_size=4, hidden_dim=8, num_blocks=1,
                        tokens_mlp_dim=4, channels_mlp_dim=8)
    x = torch.zeros(1, 1, 24, 24)
    x[..., 2 * 4 : 3 * 4, 5 * 4 : 6 * 4] = 1.0  # the patch at row 2, column 5
    with torch.no_grad():
        tokens = model.stem(x)[0]
        (token,) = (tokens - model.stem.proj.bias).abs().sum(dim=1).nonzero()[:, 0].tolist()
    units = token_mixing_units(model, 0)
    assert units.shape == (4, 6, 6)
    np.testing.assert_array_equal(units[:, 2, 5], model.blocks[0].mlp_tokens.fc1.weight[:, token].detach().numpy())


def _checkpoint(path, in_chans=1):
    """A file as `mixer pretrain` wrote it before `pretrained_cfg`: spec and `preprocess` under "mixer",
    weights under "model." (such files must keep loading)."""
    # kept: 2 blocks of 9 token-mixing units (an odd count: one unit has no partner), as the tests count
    model = build_mixer(None, num_classes=10, img_size=28, in_chans=in_chans, patch_size=4, hidden_dim=16,
                        num_blocks=2, tokens_mlp_dim=9, channels_mlp_dim=32)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    preprocess = {"img_size": 28, "channels": in_chans, "mean": [0.5] * in_chans, "std": [0.5] * in_chans,
                  "interpolation": "bilinear", "eval_crop": "none"}
    torch.save({"state_dict": state, "mixer": {"spec": model.spec.to_dict(), "preprocess": preprocess}}, path)
    return path


@pytest.mark.parametrize("in_chans", [1, 3])
def test_cli_writes_the_figures_and_the_pairs(tmp_path, in_chans):
    ckpt = _checkpoint(tmp_path / "last.ckpt", in_chans)
    r = CliRunner().invoke(app, ["visualize", "--from", str(ckpt)])
    assert r.exit_code == 0, r.output
    out = tmp_path / "last-units"  # beside the checkpoint by default
    assert {p.name for p in out.iterdir()} == {"token_mixing_block0.png", "token_mixing_block1.png",
                                               "token_mixing_pairs.csv", "stem.png"}  # 2 blocks only
    with open(out / "token_mixing_pairs.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 5  # 9 units a block: 4 pairs and one left alone
    assert sorted(int(u) for r in rows if r["block"] == "0" for u in {r["unit"], r["partner"]}) == list(range(9))
    for name in ("token_mixing_block0.png", "stem.png"):
        with Image.open(out / name) as im:
            assert im.width >= 800


def test_cli_errors_are_one_line(tmp_path):
    r = CliRunner().invoke(app, ["visualize", "--from", str(tmp_path / "nope.ckpt")])
    assert r.exit_code == 2
    assert r.output.strip() == f"error: checkpoint {tmp_path / 'nope.ckpt'} does not exist"
    r = CliRunner().invoke(app, ["visualize", "--from", str(_checkpoint(tmp_path / "a.ckpt")), "--blocks", "0"])
    assert r.exit_code == 2 and r.output.strip() == "error: --blocks must be at least 1, not 0"
    assert not (tmp_path / "a-units").exists()
