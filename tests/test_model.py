"""The Mixer of Eq. (1) and Table 1, against the paper, big_vision's stochastic depth and timm's model contract."""
import math

import numpy as np
import pytest
import timm.models.mlp_mixer as timm_mixer
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch.nn import functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from mixer_cli.models import VARIANTS, build_mixer
from mixer_cli.models.mixer import TOKEN_MIXING

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


def _tiny(**kw):
    opts = dict(num_classes=3, img_size=16, patch_size=4, hidden_dim=16, num_blocks=2, tokens_mlp_dim=8,
                channels_mlp_dim=32) | kw
    model = build_mixer(None, **opts)
    _randomise(model)
    return model


def _tiny_timm(img=32, patch=8, dim=64, blocks=2, classes=7):
    return timm_mixer.MlpMixer(
        num_classes=classes, img_size=img, patch_size=patch, num_blocks=blocks, embed_dim=dim, mlp_ratio=(0.5, 4.0)
    )


def _randomise(model):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)


def test_timm_state_dict_loads_strictly_and_gives_same_logits_and_features():
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
        tokens = ours.forward_features(x)
        torch.testing.assert_close(tokens, ref.forward_features(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.forward_head(tokens, pre_logits=True),
                                   ref.forward_head(ref.forward_features(x), pre_logits=True), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("autocast", [False, True])
def test_gradients_equal_timms_in_fp32_and_under_bf16_autocast(autocast):
    """The same function as timm's MlpMixer, gradients included, in fp32 and under bf16 autocast."""
    ref = _tiny_timm(dim=32)
    _randomise(ref)
    ours = build_mixer(None, num_classes=7, img_size=32, patch_size=8, hidden_dim=32, num_blocks=2,
                       tokens_mlp_dim=16, channels_mlp_dim=128, gelu="exact")
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 6, 2])
    for model in (ours, ref):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(x)
        F.cross_entropy(logits, y).backward()
    assert logits.dtype == (torch.bfloat16 if autocast else torch.float32)
    theirs = dict(ref.named_parameters())
    scale = max(p.grad.abs().max().item() for p in ref.parameters())
    for name, p in ours.named_parameters():
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=(2e-2 if autocast else 1e-6) * scale, rtol=0,
                                   msg=name)


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


@pytest.mark.parametrize("token_mixing", TOKEN_MIXING)
@pytest.mark.parametrize("gelu,approximate", [("tanh", "tanh"), ("exact", "none")])
def test_block_matches_equation_1(gelu, approximate, token_mixing):
    model = _tiny(img_size=24, num_blocks=1, gelu=gelu, token_mixing=token_mixing).eval()
    x = torch.randn(2, 36, 16)
    with torch.no_grad():
        expected = _eq1_block(x, model.blocks[0], approximate)
        torch.testing.assert_close(model.blocks[0](x), expected, atol=1e-5, rtol=1e-5)


def _meta(variant, **kw):
    """A model whose structure, not values, is under test: no memory, no initialisation cost."""
    with torch.device("meta"):
        return build_mixer(variant, **kw)


def test_gelu_defaults_to_tanh_approximation():
    model = _meta("S/32", img_size=64)
    assert model.blocks[0].mlp_tokens.act.approximate == "tanh"


def test_flax_initialisation():
    model = build_mixer(None, num_classes=10, img_size=8, patch_size=4, hidden_dim=512, num_blocks=1,
                        tokens_mlp_dim=4, channels_mlp_dim=256)
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    fc1 = model.blocks[0].mlp_channels.fc1
    assert torch.count_nonzero(fc1.bias) == 0
    # lecun normal: std = 1/sqrt(fan_in) (truncated normal, so slightly less)
    assert fc1.weight.std().item() == pytest.approx(1 / math.sqrt(512), rel=0.15)
    assert model.norm.eps == 1e-6


# --- stochastic depth --------------------------------------------------------------------------------

def test_stochastic_depth_rises_linearly_from_zero():
    model = _meta("S/32", img_size=64, drop_path=0.1)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in model.blocks]
    assert rates == pytest.approx([0.1 * i / 7 for i in range(8)])


def _channel_branch_block(rate, rescale):
    """The last block (stochastic depth `rate`) with its token-mixing branch zeroed, so that its
    output is x + mask * channel-mixing branch, one mask value per sample."""
    model = _tiny(num_blocks=2, drop_path=rate, drop_path_rescale=rescale)
    block = model.blocks[-1]
    with torch.no_grad():
        block.mlp_tokens.fc2.weight.zero_()
        block.mlp_tokens.fc2.bias.zero_()
    return block


@pytest.mark.parametrize("rescale", [False, True])
def test_stochastic_depth_drops_the_whole_branch_per_sample(rescale):
    rate, n = 0.3, 4000
    block = _channel_branch_block(rate, rescale)
    x = torch.randn(1, 16, 16).expand(n, -1, -1)
    with torch.no_grad():
        branch = block.eval()(x[:1]) - x[:1]
        out = block.train()(x)
    kept_value = x[:1] + (branch / (1 - rate) if rescale else branch)  # big_vision: no 1/keep; timm: rescaled
    dropped = (out == x[:1]).flatten(1).all(1)
    kept = torch.isclose(out, kept_value, atol=1e-6, rtol=1e-5).flatten(1).all(1)
    assert bool((dropped ^ kept).all())  # every sample is exactly one of the two
    assert abs(dropped.float().mean().item() - rate) < 5 * math.sqrt(rate * (1 - rate) / n)
    expected_mean = x[:1] + (branch if rescale else (1 - rate) * branch)
    torch.testing.assert_close(out.mean(0, keepdim=True), expected_mean, atol=0.05 * branch.abs().max().item(), rtol=0)


def test_stochastic_depth_is_identity_in_evaluation():
    model = _tiny(drop_path=0.5).eval()
    reference = _tiny(drop_path=0.0).eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        first = model(x)
        torch.testing.assert_close(model(x), first, atol=0, rtol=0)
        torch.testing.assert_close(reference(x), first, atol=0, rtol=0)


# --- timm's model contract ---------------------------------------------------------------------------

def test_forward_features_are_the_normalised_tokens_and_forward_head_pools_them():
    model = _tiny().eval()
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (5, 16, 16)  # (B, S, C): 4x4 patches of 4 pixels, width 16
        after_blocks = model.blocks(model.stem(x))
        torch.testing.assert_close(tokens, F.layer_norm(after_blocks, (16,), model.norm.weight, model.norm.bias, 1e-6))
        pre_logits = model.forward_head(tokens, pre_logits=True)
        torch.testing.assert_close(pre_logits, tokens.mean(dim=1))
        torch.testing.assert_close(model(x), pre_logits @ model.head.weight.T + model.head.bias)
    assert model.num_features == 16 and model.get_classifier() is model.head


def test_reset_classifier_gives_a_zero_head_and_keeps_the_body():
    model = _tiny(num_classes=10, head_bias=-6.9).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        before = model.forward_features(x)
        model.reset_classifier(37)
        logits = model(x)
        torch.testing.assert_close(model.forward_features(x), before)
    assert logits.shape == (3, 37) and torch.count_nonzero(logits) == 0
    assert model.spec.num_classes == 37 and model.spec.head_bias == 0.0 and model.num_classes == 37
    assert model.pretrained_cfg["num_classes"] == 37
    assert not model.head.training  # the new head follows the model's mode
    model.reset_classifier(0)
    assert model(x).shape == (3, 16)  # no head: the pre-logits


def _pil(width=40, height=30, channels=3):
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels)


def test_timm_resolves_the_papers_evaluation_preprocessing(tiny_mixer):
    """build_mixer's default: pixels to [-1, 1], shorter side bilinearly to img/0.875, centre crop."""
    model = tiny_mixer(num_classes=4, img_size=16)
    cfg = resolve_data_config({}, model=model)
    assert cfg == {"input_size": (1, 16, 16), "interpolation": "bilinear", "mean": (0.5,), "std": (0.5,),
                   "crop_pct": 0.875, "crop_mode": "center"}
    image = _pil(channels=1)
    expected = TF.center_crop(TF.resize(image, 18, InterpolationMode.BILINEAR), 16)  # 18 = floor(16 / 0.875)
    expected = (TF.pil_to_tensor(expected).float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(create_transform(**cfg)(image), expected)
    assert model(create_transform(**cfg)(image)[None]).shape == (1, 4)


# --- the rest ----------------------------------------------------------------------------------------

def test_custom_sizes_for_small_images():
    model = _meta("S/32", img_size=28, patch_size=4, num_blocks=4, in_chans=1, num_classes=10)
    assert model.spec.num_tokens == 49 and len(model.blocks) == 4 and model.spec.hidden_dim == 512
    assert model(torch.empty(2, 1, 28, 28, device="meta")).shape == (2, 10)


def test_image_size_not_divisible_by_patch_is_a_clear_error():
    message = r"^image size 30 is not divisible by patch size 4; use a multiple of 4 such as 28 or 32$"
    with pytest.raises(ValueError, match=message):
        build_mixer("S/32", img_size=30, patch_size=4)


def test_wrong_input_resolution_is_a_clear_error():
    model = _meta("S/32", img_size=64)
    with pytest.raises(ValueError, match=r"takes images of shape \(3, 64, 64\).*got \(3, 96, 96\)"):
        model(torch.empty(1, 3, 96, 96, device="meta"))


def test_unknown_variant_lists_the_known_ones():
    message = "unknown Mixer variant 'B/8'; choose one of S/32, S/16, B/32, B/16, L/32, L/16, H/14"
    with pytest.raises(ValueError, match=message):
        build_mixer("B/8")


def test_gradient_checkpointing_gives_same_gradients():
    model = _tiny()
    x = torch.randn(2, 3, 16, 16)
    model(x).sum().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for a, p in zip(ref, model.parameters()):
        torch.testing.assert_close(p.grad, a)


def _logits_and_gradient(model, x, y, autocast=False):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(x)
    F.cross_entropy(logits, y).backward()
    return logits.float(), torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("token_mixing", [m for m in TOKEN_MIXING if m != "transpose"])
def test_token_mixing_layouts_give_the_same_logits_and_gradients(token_mixing):
    """Every layout of Eq. (1)'s token mixing is the same function of the same parameters: a state dict
    moves between them strictly, and logits and gradients agree in fp32. Under bf16 autocast the
    layouts round differently; each stays as close to the fp32 result as today's transpose layout
    (measured on 4 seeds: gradients 4.5-6.4% from fp32 for transpose, 0.9-1.5% for matmul and einsum)."""
    ref = _tiny(img_size=24, patch_size=4)  # 36 tokens, 8 hidden units: a non-square W1
    ours = build_mixer(None, **{**ref.spec.to_dict(), "token_mixing": token_mixing})
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert (ref.blocks[0].mlp_tokens.token_mixing, ours.blocks[0].mlp_tokens.token_mixing) == ("transpose",
                                                                                              token_mixing)
    x, y = torch.randn(3, 3, 24, 24), torch.tensor([0, 2, 1])
    logits, gradient = _logits_and_gradient(ref, x, y)
    ours_logits, ours_gradient = _logits_and_gradient(ours, x, y)
    torch.testing.assert_close(ours_logits, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_gradient, gradient, atol=1e-6 * gradient.abs().max().item(), rtol=0)

    def bf16_error(model):
        bf16_logits, bf16_gradient = _logits_and_gradient(model, x, y, autocast=True)
        return (bf16_logits - logits).abs().max().item(), ((bf16_gradient - gradient).norm() / gradient.norm()).item()

    (ref_logit_err, ref_grad_err), (logit_err, grad_err) = bf16_error(ref), bf16_error(ours)
    assert ref_grad_err < 0.1 and logit_err < 5e-3
    assert grad_err <= 1.5 * ref_grad_err and logit_err <= 2 * ref_logit_err + 1e-3


def test_unknown_token_mixing_layout_is_a_clear_error():
    with pytest.raises(ValueError, match="^token_mixing must be one of transpose, matmul, einsum, not 'bmm'$"):
        _tiny(token_mixing="bmm")
