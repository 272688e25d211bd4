"""Appendix C: growing the token-mixing MLPs block-diagonally for a higher resolution (models/growth.py)."""
import pytest
import torch

from mixer_cli.models import build_mixer, grow_resolution


def _tiny(img_size=16, **kw):  # kept: 2 blocks and token MLP width 6, distinct, so every grown block is checked
    model = build_mixer(None, num_classes=5, img_size=img_size, patch_size=4, hidden_dim=12, num_blocks=2,
                        tokens_mlp_dim=6, channels_mlp_dim=24, **kw).eval()
    with torch.no_grad():  # a trained-looking model: non-zero head and biases everywhere
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def _tile(tiles: torch.Tensor, k: int) -> torch.Tensor:
    """(K*K, B, C, H, W) tiles, row-major -> (B, C, K*H, K*W) image."""
    rows = [torch.cat(list(tiles[i * k:(i + 1) * k]), dim=-1) for i in range(k)]
    return torch.cat(rows, dim=-2)


@pytest.mark.parametrize("k", [2, 3])
def test_tiled_image_gives_mean_of_per_tile_logits(k):
    model = _tiny()
    grown = grow_resolution(model, 16 * k)
    tiles = torch.randn(k * k, 3, 3, 16, 16)
    with torch.no_grad():
        expected = torch.stack([model(t) for t in tiles]).mean(0)
        torch.testing.assert_close(grown(_tile(tiles, k)), expected, atol=1e-5, rtol=1e-5)


def test_shapes_follow_appendix_c_and_the_preprocessing_follows_the_resolution():
    model = _tiny()
    model.pretrained_cfg = {**model.pretrained_cfg, "crop_mode": "squash", "crop_pct": 1.0, "mean": (0.1, 0.2, 0.3)}
    grown = grow_resolution(model, 32)
    assert grown.pretrained_cfg == {**model.pretrained_cfg, "input_size": (3, 32, 32)}
    assert grown.spec.num_tokens == 4 * model.spec.num_tokens  # S' = K^2 S
    assert grown.spec.tokens_mlp_dim == 4 * model.spec.tokens_mlp_dim  # D_S' = K^2 D_S
    assert grown.spec.patch_size == model.spec.patch_size
    assert grown.blocks[0].mlp_tokens.fc1.weight.shape == (24, 64)


def test_weights_are_block_diagonal_copies_in_block_token_order():
    model = _tiny()
    grown = grow_resolution(model, 32)
    old, new = model.blocks[1].mlp_tokens, grown.blocks[1].mlp_tokens
    # token (r, c) of the 8x8 grid belongs to block (r // 4, c // 4); take block (1, 0): rows 4-7, cols 0-3
    tokens = torch.tensor([r * 8 + c for r in range(4, 8) for c in range(4)])
    units = slice(2 * 6, 3 * 6)
    torch.testing.assert_close(new.fc1.weight[units][:, tokens], old.fc1.weight)
    torch.testing.assert_close(new.fc2.weight[tokens][:, units], old.fc2.weight)
    torch.testing.assert_close(new.fc1.bias, old.fc1.bias.repeat(4))
    torch.testing.assert_close(new.fc2.bias[tokens], old.fc2.bias)
    # everything outside the four diagonal blocks is zero: one non-zero per (unit, block) entry
    assert torch.count_nonzero(new.fc1.weight) == 4 * torch.count_nonzero(old.fc1.weight)
    assert torch.count_nonzero(new.fc2.weight) == 4 * torch.count_nonzero(old.fc2.weight)


def test_other_weights_are_copied_and_model_is_unchanged():
    model = _tiny()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    grown = grow_resolution(model, 48)
    for name, t in model.state_dict().items():
        torch.testing.assert_close(t, before[name])
        if ".mlp_tokens." not in name:
            torch.testing.assert_close(grown.state_dict()[name], t)
    assert model.spec.img_size == 16


def test_resolution_that_is_not_k_times_is_a_clear_error():
    model = _tiny()
    with pytest.raises(ValueError, match=r"^cannot grow a Mixer trained at 16px to 24px: Appendix C needs K\^2 x its "
                                         r"16 tokens, i.e. a resolution of K x 16; allowed: 16, 32, 48, 64, \.\.\.$"):
        grow_resolution(model, 24)
