"""The Mixer of Eq. (1) and Table 1, against the paper and timm's MlpMixer."""
import math

import pytest
import timm.models.mlp_mixer as timm_mixer
import torch
from torch.nn import functional as F

from mixer_cli.models import VARIANTS, build_mixer

# Table 1: parameters in millions, without the head, at 224x224.
TABLE1_PARAMS_M = {"S/32": 19, "S/16": 18, "B/32": 60, "B/16": 59, "L/32": 206, "L/16": 207, "H/14": 431}
TABLE1_TOKENS = {"S/32": 49, "S/16": 196, "B/32": 49, "B/16": 196, "L/32": 49, "L/16": 196, "H/14": 256}


@pytest.mark.parametrize("variant", list(TABLE1_PARAMS_M))
def test_parameter_count_matches_table1(variant):
    with torch.device("meta"):  # H/14 has 431M parameters: count them without allocating
        model = build_mixer(variant, num_classes=1000)
    body = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head."))
    assert round(body / 1e6) == TABLE1_PARAMS_M[variant]
    assert model.spec.num_tokens == TABLE1_TOKENS[variant]


def test_variants_are_the_seven_of_table1():
    assert list(VARIANTS) == list(TABLE1_PARAMS_M)


def _tiny_timm(img=32, patch=8, dim=64, blocks=2, classes=7):
    return timm_mixer.MlpMixer(
        num_classes=classes, img_size=img, patch_size=patch, num_blocks=blocks, embed_dim=dim, mlp_ratio=(0.5, 4.0)
    )


def _randomise(model):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)


def test_timm_state_dict_loads_strictly_and_gives_same_logits():
    ref = _tiny_timm().eval()
    _randomise(ref)
    ours = build_mixer(
        None, num_classes=7, img_size=32, patch_size=8, hidden_dim=64, num_blocks=2,
        tokens_mlp_dim=32, channels_mlp_dim=256, gelu="exact",
    ).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.forward_features(x), ref.forward_head(ref.forward_features(x), pre_logits=True),
                                   atol=1e-5, rtol=1e-5)


def _eq1_block(x, blk, approximate):
    """Eq. (1) written out: U = X + W2 gelu(W1 LN(X)^T)^T ; Y = U + W4 gelu(W3 LN(U))."""
    def ln(t, norm):
        return F.layer_norm(t, t.shape[-1:], norm.weight, norm.bias, eps=1e-6)

    t, c = blk.mlp_tokens, blk.mlp_channels
    xt = ln(x, blk.norm1).transpose(1, 2)  # (B, C, S): rows are channels, mixed along tokens
    mixed = F.gelu(xt @ t.fc1.weight.T + t.fc1.bias, approximate=approximate) @ t.fc2.weight.T + t.fc2.bias
    u = x + mixed.transpose(1, 2)
    h = F.gelu(ln(u, blk.norm2) @ c.fc1.weight.T + c.fc1.bias, approximate=approximate)
    return u + h @ c.fc2.weight.T + c.fc2.bias


@pytest.mark.parametrize("gelu,approximate", [("tanh", "tanh"), ("exact", "none")])
def test_block_matches_equation_1(gelu, approximate):
    model = build_mixer(None, num_classes=3, img_size=24, patch_size=4, hidden_dim=16, num_blocks=1,
                        tokens_mlp_dim=8, channels_mlp_dim=32, gelu=gelu).eval()
    _randomise(model)
    x = torch.randn(2, 36, 16)
    with torch.no_grad():
        expected = _eq1_block(x, model.blocks[0], approximate)
        torch.testing.assert_close(model.blocks[0](x), expected, atol=1e-5, rtol=1e-5)


def test_gelu_defaults_to_tanh_approximation():
    model = build_mixer("S/32", img_size=64)
    assert model.blocks[0].mlp_tokens.act.approximate == "tanh"


def test_flax_initialisation():
    model = build_mixer("S/32", num_classes=10, img_size=64)
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    fc1 = model.blocks[0].mlp_channels.fc1
    assert torch.count_nonzero(fc1.bias) == 0
    # lecun normal: std = 1/sqrt(fan_in) (truncated normal, so slightly less)
    assert fc1.weight.std().item() == pytest.approx(1 / math.sqrt(512), rel=0.15)
    assert model.norm.eps == 1e-6


def test_stochastic_depth_rises_linearly_from_zero():
    model = build_mixer("S/32", img_size=64, drop_path=0.1)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in model.blocks]
    assert rates == pytest.approx([0.1 * i / 7 for i in range(8)])


def test_custom_sizes_for_small_images():
    model = build_mixer("S/32", img_size=28, patch_size=4, num_blocks=4, in_chans=1, num_classes=10)
    assert model.spec.num_tokens == 49 and len(model.blocks) == 4
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_image_size_not_divisible_by_patch_is_a_clear_error():
    message = r"^image size 30 is not divisible by patch size 4; use a multiple of 4 such as 28 or 32$"
    with pytest.raises(ValueError, match=message):
        build_mixer("S/32", img_size=30, patch_size=4)


def test_wrong_input_resolution_is_a_clear_error():
    model = build_mixer("S/32", img_size=64)
    with pytest.raises(ValueError, match=r"takes images of shape \(3, 64, 64\).*got \(3, 96, 96\)"):
        model(torch.randn(1, 3, 96, 96))


def test_unknown_variant_lists_the_known_ones():
    message = "unknown Mixer variant 'B/8'; choose one of S/32, S/16, B/32, B/16, L/32, L/16, H/14"
    with pytest.raises(ValueError, match=message):
        build_mixer("B/8")


def test_gradient_checkpointing_gives_same_gradients():
    model = build_mixer(None, num_classes=3, img_size=16, patch_size=4, hidden_dim=16, num_blocks=2,
                        tokens_mlp_dim=8, channels_mlp_dim=32)
    _randomise(model)
    x = torch.randn(2, 3, 16, 16)
    model(x).sum().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for a, p in zip(ref, model.parameters()):
        torch.testing.assert_close(p.grad, a)
