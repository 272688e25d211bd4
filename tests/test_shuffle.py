"""The permutation experiment (Sec. 3.4, Figure 4): the shuffles, and why the Mixer is immune to one."""
import pytest
import torch
from torch import nn

from mixer_cli.experiments.shuffle import ShufflePixels, draw_permutations, patch_pixel_permutation
from mixer_cli.models import build_mixer

IMG, PATCH = 12, 4  # a 3 x 3 grid of 4 x 4 patches


@pytest.fixture
def perms():
    return draw_permutations(IMG, PATCH, seed=3)


def _patches(x, p=PATCH):
    """(B, C, H, W) -> (B, C, S, P*P): patches row-major, pixels row-major inside a patch."""
    b, c, h, w = x.shape
    return x.view(b, c, h // p, p, w // p, p).permute(0, 1, 2, 4, 3, 5).reshape(b, c, -1, p * p)


def test_pipelines_are_true_permutations(perms):
    assert list(perms) == ["original", "patch_pixel", "global_pixel"]
    for perm in perms.values():
        assert torch.equal(perm.sort().values, torch.arange(IMG * IMG))
    assert torch.equal(perms["original"], torch.arange(IMG * IMG))
    assert not torch.equal(perms["patch_pixel"], perms["original"])
    assert not torch.equal(perms["global_pixel"], perms["original"])


def test_shuffles_are_invertible(perms):
    x = torch.randn(2, 3, IMG, IMG)
    for perm in perms.values():
        shuffle = ShufflePixels(perm)
        y = shuffle(x)
        assert torch.equal(shuffle.inverse()(y), x)
        # every channel of every image moved the same way
        assert torch.equal(y[1, 2], ShufflePixels(perm)(x[1, 2]))


def test_permutations_are_seeded(perms):
    again = draw_permutations(IMG, PATCH, seed=3)
    other = draw_permutations(IMG, PATCH, seed=4)
    assert all(torch.equal(perms[k], again[k]) for k in perms)
    assert not torch.equal(perms["global_pixel"], other["global_pixel"])


def test_patch_pixel_moves_whole_patches_with_one_shared_pixel_order(perms):
    x = torch.arange(IMG * IMG).view(1, 1, IMG, IMG)  # each pixel holds its own index
    src = _patches(ShufflePixels(perms["patch_pixel"])(x))[0, 0]  # (S, P*P): where each pixel came from
    row, col = src // IMG, src % IMG
    from_patch = (row // PATCH) * (IMG // PATCH) + col // PATCH
    from_position = (row % PATCH) * PATCH + col % PATCH
    assert (from_patch == from_patch[:, :1]).all()  # each patch comes whole from one input patch
    assert torch.equal(from_patch[:, 0].sort().values, torch.arange(9))  # ... a permutation of them
    assert (from_position == from_position[:1]).all()  # one pixel order shared by all patches
    assert torch.equal(from_position[0].sort().values, torch.arange(PATCH * PATCH))
    assert not torch.equal(from_position[0], torch.arange(PATCH * PATCH))


def test_global_shuffle_breaks_patches(perms):
    x = torch.arange(IMG * IMG, dtype=torch.float32).view(1, 1, IMG, IMG)
    src = {frozenset(p.tolist()) for p in _patches(x)[0, 0]}
    out = {frozenset(p.tolist()) for p in _patches(ShufflePixels(perms["global_pixel"])(x))[0, 0]}
    assert not out & src


def _mixer():
    model = build_mixer(None, num_classes=5, img_size=IMG, in_chans=3, patch_size=PATCH, hidden_dim=16,
                        num_blocks=2, tokens_mlp_dim=8, channels_mlp_dim=32).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def _mixer_for_shuffled_inputs(model, patch_order, pixel_order):
    """Permute the stem kernels like the pixels inside a patch, and the token-mixing weights like
    the patches: token s of the shuffled image is then token patch_order[s] of the original."""
    out = _mixer()
    out.load_state_dict(model.state_dict())
    with torch.no_grad():
        w = out.stem.proj.weight
        w.copy_(w.flatten(-2)[..., pixel_order].view(w.shape))
        for block in out.blocks:
            block.mlp_tokens.fc1.weight.copy_(block.mlp_tokens.fc1.weight[:, patch_order])
            block.mlp_tokens.fc2.weight.copy_(block.mlp_tokens.fc2.weight[patch_order])
            block.mlp_tokens.fc2.bias.copy_(block.mlp_tokens.fc2.bias[patch_order])
    return out


def test_mixer_with_permuted_weights_is_exactly_invariant_to_patch_pixel_shuffle():
    patch_order, pixel_order = torch.randperm(9), torch.randperm(PATCH * PATCH)
    shuffle = ShufflePixels(patch_pixel_permutation(IMG, PATCH, patch_order, pixel_order))
    model = _mixer()
    twin = _mixer_for_shuffled_inputs(model, patch_order, pixel_order)
    x = torch.randn(4, 3, IMG, IMG, dtype=torch.float64)
    with torch.no_grad():
        reference, shuffled = model(x), twin(shuffle(x))
        torch.testing.assert_close(shuffled, reference, rtol=1e-12, atol=1e-12)
        # the same weights without the permutation see a different image: the check has teeth
        assert (model(shuffle(x)) - reference).abs().max() > 1e-2


def test_cnn_is_not_rescued_by_the_same_weight_permutation():
    """A CNN with the Mixer's patch stem, then a 3x3 convolution over the patch grid: permuting the
    stem like the pixels makes the tokens match, but the convolution ties neighbouring patches."""
    patch_order, pixel_order = torch.randperm(9), torch.randperm(PATCH * PATCH)
    shuffle = ShufflePixels(patch_pixel_permutation(IMG, PATCH, patch_order, pixel_order))
    cnn = nn.Sequential(
        nn.Conv2d(3, 16, PATCH, stride=PATCH), nn.GELU(), nn.Conv2d(16, 16, 3, padding=1), nn.GELU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    ).double()
    twin = nn.Sequential(*cnn)  # shares the later layers' weights; gets its own stem below
    twin[0] = nn.Conv2d(3, 16, PATCH, stride=PATCH).double()
    with torch.no_grad():
        twin[0].weight.copy_(cnn[0].weight.flatten(-2)[..., pixel_order].view(cnn[0].weight.shape))
        twin[0].bias.copy_(cnn[0].bias)
        x = torch.randn(4, 3, IMG, IMG, dtype=torch.float64)
        tokens, twin_tokens = cnn[0](x).flatten(2), twin[0](shuffle(x)).flatten(2)
        torch.testing.assert_close(twin_tokens, tokens[..., patch_order], rtol=1e-12, atol=1e-12)
        reference = cnn(x)
        assert (twin(shuffle(x)) - reference).abs().max() > 0.05 * reference.abs().max()
