"""MLP-Mixer (Tolstikhin et al., 2021), Eq. (1) and the Table 1 variants.

Parameter names follow timm's ``MlpMixer`` (stem.proj, blocks.N.norm1, blocks.N.mlp_tokens.fc1,
..., norm, head) so timm state dicts load strictly; initialisation follows the paper's Flax code
(lecun-normal kernels, zero biases, zero head, LayerNorm eps 1e-6).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from timm.layers import DropPath, lecun_normal_
from torch import nn

from mixer_cli.errors import UserError


@dataclass(frozen=True)
class MixerSpec:
    """Everything needed to rebuild a Mixer; stored in every checkpoint the toolkit writes."""

    patch_size: int
    hidden_dim: int  # C
    num_blocks: int
    tokens_mlp_dim: int  # D_S
    channels_mlp_dim: int  # D_C
    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000
    gelu: str = "tanh"  # the released code's approximation; "exact" for erf-GELU (timm)
    dropout: float = 0.0
    drop_path: float = 0.0  # stochastic depth at the last block; 0 at the first, linear between
    head_bias: float = 0.0  # -6.9 = log(1/1000) for sigmoid cross-entropy from scratch

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_tokens(self) -> int:  # S
        return self.grid**2

    def to_dict(self) -> dict:
        return asdict(self)


# Table 1: (layers, patch, C, D_C, D_S)
VARIANTS: dict[str, dict[str, int]] = {
    name: dict(num_blocks=n, patch_size=p, hidden_dim=c, channels_mlp_dim=dc, tokens_mlp_dim=ds)
    for name, (n, p, c, dc, ds) in {
        "S/32": (8, 32, 512, 2048, 256),
        "S/16": (8, 16, 512, 2048, 256),
        "B/32": (12, 32, 768, 3072, 384),
        "B/16": (12, 16, 768, 3072, 384),
        "L/32": (24, 32, 1024, 4096, 512),
        "L/16": (24, 16, 1024, 4096, 512),
        "H/14": (32, 14, 1280, 5120, 640),
    }.items()
}


def spec_for(variant: str | None, **overrides) -> MixerSpec:
    """The spec of a Table 1 variant with the given fields replaced (None values are ignored)."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if variant is None:
        base = {}
    elif variant in VARIANTS:
        base = VARIANTS[variant]
    else:
        raise UserError(f"unknown Mixer variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    fields = {**base, **overrides}
    missing = {"patch_size", "hidden_dim", "num_blocks", "tokens_mlp_dim", "channels_mlp_dim"} - set(fields)
    if missing:
        raise UserError(f"a custom Mixer needs {', '.join(sorted(missing))} (or a variant such as 'B/16')")
    unknown = set(fields) - set(MixerSpec.__dataclass_fields__)
    if unknown:
        raise UserError(f"unknown Mixer option(s) {', '.join(sorted(unknown))}")
    spec = MixerSpec(**fields)
    validate(spec)
    return spec


def validate(spec: MixerSpec) -> None:
    if spec.img_size % spec.patch_size:
        lo = spec.img_size - spec.img_size % spec.patch_size
        raise UserError(
            f"image size {spec.img_size} is not divisible by patch size {spec.patch_size}; "
            f"use a multiple of {spec.patch_size} such as {lo or spec.patch_size} or {lo + spec.patch_size}"
        )
    if spec.gelu not in ("tanh", "exact"):
        raise UserError(f"gelu must be 'tanh' or 'exact', not {spec.gelu!r}")


class PatchStem(nn.Module):
    """Per-patch linear embedding as a strided convolution; output (B, S, C), tokens in row-major
    patch order."""

    def __init__(self, spec: MixerSpec):
        super().__init__()
        self.proj = nn.Conv2d(spec.in_chans, spec.hidden_dim, spec.patch_size, stride=spec.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)

    def token_major(self, x: torch.Tensor) -> torch.Tensor:
        """The same tokens as a contiguous (S, B, C) tensor, the layout the blocks run in."""
        return self.proj(x).flatten(2).permute(2, 0, 1).contiguous()


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, gelu: str, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh" if gelu == "tanh" else "none")
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class TokenMixingMlp(Mlp):
    """The token-mixing MLP on token-major activations (S, B, C): seen as an (S, B*C) matrix, mixing
    tokens is one product W @ X with the bias fused (addmm), for the whole batch, no transpose.
    Measured faster than timm's transpose + Linear and than a batched W @ X on (B, S, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(x.shape[0], -1)
        h = self.drop(self.act(torch.addmm(self.fc1.bias[:, None], self.fc1.weight, rows)))
        return self.drop(torch.addmm(self.fc2.bias[:, None], self.fc2.weight, h)).view(x.shape)


class MixerBlock(nn.Module):
    """Eq. (1): U = X + W2 gelu(W1 LN(X)^T)^T ; Y = U + W4 gelu(W3 LN(U))."""

    def __init__(self, spec: MixerSpec, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(spec.hidden_dim, eps=1e-6)
        self.mlp_tokens = TokenMixingMlp(spec.num_tokens, spec.tokens_mlp_dim, spec.gelu, spec.dropout)
        self.norm2 = nn.LayerNorm(spec.hidden_dim, eps=1e-6)
        self.mlp_channels = Mlp(spec.hidden_dim, spec.channels_mlp_dim, spec.gelu, spec.dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, C) -> (B, S, C), like timm's block; the Mixer itself calls forward_token_major."""
        return self.forward_token_major(x.transpose(0, 1)).transpose(0, 1)

    def forward_token_major(self, x: torch.Tensor) -> torch.Tensor:
        """(S, B, C) -> (S, B, C): both MLPs are then single 2-D matrix products over the batch."""
        x = x + self._drop_path(self.mlp_tokens(self.norm1(x)))
        return x + self._drop_path(self.mlp_channels(self.norm2(x)))

    def _drop_path(self, x: torch.Tensor) -> torch.Tensor:
        # timm's DropPath drops whole samples along dim 0; here the samples are along dim 1.
        return self.drop_path(x.transpose(0, 1)).transpose(0, 1)


class Mixer(nn.Module):
    def __init__(self, spec: MixerSpec):
        super().__init__()
        validate(spec)
        self.spec = spec
        self.stem = PatchStem(spec)
        rates = [spec.drop_path * i / max(spec.num_blocks - 1, 1) for i in range(spec.num_blocks)]
        self.blocks = nn.Sequential(*(MixerBlock(spec, r) for r in rates))
        self.norm = nn.LayerNorm(spec.hidden_dim, eps=1e-6)
        self.head = nn.Linear(spec.hidden_dim, spec.num_classes) if spec.num_classes else nn.Identity()
        self.grad_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Flax defaults as in the paper's code: lecun-normal kernels, zero biases, zero head."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                lecun_normal_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.constant_(self.head.bias, self.spec.head_bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass (for L and H at large batch)."""
        self.grad_checkpointing = enable

    def _check_input(self, x: torch.Tensor) -> None:
        expected = (self.spec.in_chans, self.spec.img_size, self.spec.img_size)
        if tuple(x.shape[1:]) != expected:
            raise UserError(
                f"this Mixer takes images of shape {expected} (C, H, W), got {tuple(x.shape[1:])}; "
                "resize the input or grow the model with grow_resolution()"
            )

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, S, C) after the last block, before the pre-head LayerNorm."""
        return self._token_major(x).transpose(0, 1)

    def _token_major(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (S, B, C) after the last block: the blocks run token-major."""
        self._check_input(x)
        x = self.stem.token_major(x)
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block.forward_token_major, x, use_reentrant=False)
            else:
                x = block.forward_token_major(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-logits: pre-head LayerNorm, then the mean over tokens."""
        return self.norm(self._token_major(x)).mean(dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def build_mixer(variant: str | None = None, num_classes: int = 1000, img_size: int = 224, **opts) -> Mixer:
    """A Mixer by the paper's variant name ("S/32" ... "H/14"); keyword arguments named as in the
    paper's code (patch_size, hidden_dim, num_blocks, tokens_mlp_dim, channels_mlp_dim) and the
    MixerSpec fields (in_chans, gelu, dropout, drop_path, head_bias) override the variant."""
    return Mixer(spec_for(variant, num_classes=num_classes, img_size=img_size, **opts))


def with_spec(spec: MixerSpec, **changes) -> MixerSpec:
    new = replace(spec, **changes)
    validate(new)
    return new
