"""Growing a Mixer for fine-tuning at a higher resolution (Appendix C of the paper).

The patch size stays fixed, so a K times larger image has S' = K^2 S tokens. The new token
sequence is read as K^2 sequences of length S, one per contiguous block of a K x K split of the
image, and each token-mixing MLP becomes block-diagonal with K^2 copies of (W1, W2): D_S' = K^2 D_S,
off-diagonal weights zero, biases tiled. Our stem numbers tokens row-major over the whole grid, so
"block-diagonal" holds up to that permutation of the tokens: block b's rows and columns are the
tokens of spatial block b, in the block's own row-major order.

Consequence (tested): an image made of K x K tiles gives the grown model's logits equal to the
mean of the original model's logits on each tile.
"""
from __future__ import annotations

import torch
from torch import nn

from mixer_cli.core.errors import UserError
from mixer_cli.models.mixer import Mixer, with_spec


def allowed_resolutions(model: Mixer, how_many: int = 4) -> list[int]:
    """The resolutions Appendix C can grow this model to: K times the current one, K = 1, 2, ..."""
    return [model.spec.img_size * k for k in range(1, how_many + 1)]


def growth_factor(model: Mixer, img_size: int) -> int:
    """K such that img_size = K x the model's resolution; a clear error for any other size."""
    spec = model.spec
    if img_size <= 0 or img_size % spec.img_size:
        sizes = ", ".join(map(str, allowed_resolutions(model)))
        raise UserError(
            f"cannot grow a Mixer trained at {spec.img_size}px to {img_size}px: Appendix C needs K^2 x its "
            f"{spec.num_tokens} tokens, i.e. a resolution of K x {spec.img_size}; allowed: {sizes}, ..."
        )
    return img_size // spec.img_size


def block_token_index(grid: int, k: int) -> torch.Tensor:
    """index[b, s] = position in the grown model's row-major token sequence of token s (row-major
    inside its block) of spatial block b (blocks row-major over the K x K split)."""
    inside = torch.arange(grid)
    index = []
    for bi in range(k):
        for bj in range(k):
            rows = bi * grid + inside[:, None]
            cols = bj * grid + inside[None, :]
            index.append((rows * grid * k + cols).flatten())
    return torch.stack(index)


@torch.no_grad()
def _grow_token_mlp(old: nn.Module, new: nn.Module, index: torch.Tensor) -> None:
    """Fill `new` (S' tokens, D_S' hidden) with K^2 copies of `old` on the diagonal blocks."""
    hidden = old.fc1.out_features
    new.fc1.weight.zero_()
    new.fc2.weight.zero_()
    for b, tokens in enumerate(index):
        units = slice(b * hidden, (b + 1) * hidden)
        new.fc1.weight[units, tokens] = old.fc1.weight
        new.fc1.bias[units] = old.fc1.bias
        new.fc2.weight[tokens, units] = old.fc2.weight
        new.fc2.bias[tokens] = old.fc2.bias


def grow_resolution(model: Mixer, img_size: int) -> Mixer:
    """A new Mixer for `img_size` by Appendix C; `model` is not changed. K = 1 returns a copy."""
    k = growth_factor(model, img_size)
    spec = model.spec
    grown = Mixer(with_spec(spec, img_size=img_size, tokens_mlp_dim=spec.tokens_mlp_dim * k * k))
    state = {n: t for n, t in model.state_dict().items() if ".mlp_tokens." not in n}
    missing, unexpected = grown.load_state_dict(state, strict=False)
    assert not unexpected and all(".mlp_tokens." in n for n in missing)
    index = block_token_index(spec.grid, k)
    for old_block, new_block in zip(model.blocks, grown.blocks):
        _grow_token_mlp(old_block.mlp_tokens, new_block.mlp_tokens, index)
    grown.set_grad_checkpointing(model.grad_checkpointing)
    grown.train(model.training)
    # The same preprocessing (mean/std, interpolation, crop) at the new resolution.
    grown.pretrained_cfg = {**model.pretrained_cfg, "input_size": (spec.in_chans, img_size, img_size)}
    return grown
