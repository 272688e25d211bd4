"""MLP-Mixer (Tolstikhin et al., 2021): Eq. (1), the Table 1 variants and timm's model contract.

Parameter names follow timm's ``MlpMixer`` (stem.proj, blocks.N.norm1, blocks.N.mlp_tokens.fc1,
..., norm, head) so timm state dicts load strictly; initialisation follows the paper's Flax code
(lecun-normal kernels, zero biases, zero head, LayerNorm eps 1e-6). Like every timm model, a Mixer
has `forward_features` (tokens), `forward_head` (pooling and classifier), `reset_classifier` and a
`pretrained_cfg` that declares its evaluation preprocessing, so `timm.data.resolve_data_config({},
model=m)` and `timm.data.create_transform(**cfg)` prepare images for it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from timm.layers import DropPath, lecun_normal_
from torch import nn

from mixer_cli.core.errors import UserError


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
    drop_path_rescale: bool = False  # False: the paper's code drops branches unscaled; True: timm's DropPath
    head_bias: float = 0.0  # -6.9 = log(1/1000) for sigmoid cross-entropy from scratch
    token_mixing: str = "transpose"  # how the token-mixing MLP is computed (TOKEN_MIXING); same function

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


def variant_key(variant: str) -> str:
    """A variant's name in model names and files: "B/16" -> "b16" (`mixer benchmark`'s mixer-b16)."""
    return variant.lower().replace("/", "")


def variant_of(spec: MixerSpec) -> str | None:
    """The Table 1 variant whose sizes `spec` has, or None for a custom Mixer."""
    return next((name for name, sizes in VARIANTS.items() if all(getattr(spec, k) == v for k, v in sizes.items())),
                None)


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
    check_known(fields)
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
    if spec.token_mixing not in TOKEN_MIXING:
        raise UserError(f"token_mixing must be one of {', '.join(TOKEN_MIXING)}, not {spec.token_mixing!r}")


def check_known(fields) -> None:
    unknown = set(fields) - set(MixerSpec.__dataclass_fields__)
    if unknown:
        raise UserError(f"unknown Mixer option(s) {', '.join(sorted(unknown))}")


def with_spec(spec: MixerSpec, **changes) -> MixerSpec:
    check_known(changes)
    new = replace(spec, **changes)
    validate(new)
    return new


CROP_MODES = ("center", "squash")


def make_pretrained_cfg(
    spec: MixerSpec, *, interpolation: str = "bilinear", crop_pct: float = 0.875, crop_mode: str = "center",
    mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
) -> dict:
    """The evaluation preprocessing in timm's `pretrained_cfg` keys. The defaults are the paper's
    code (big_vision's ImageNet configs): pixels mapped to [-1, 1] (mean = std = 0.5), the shorter
    side resized bilinearly to img_size / 0.875, then a central crop."""
    channels = spec.in_chans
    return {
        "input_size": (channels, spec.img_size, spec.img_size),
        "mean": tuple(mean) if mean is not None else (0.5,) * channels,
        "std": tuple(std) if std is not None else (0.5,) * channels,
        "interpolation": interpolation,
        "crop_pct": float(crop_pct),
        "crop_mode": crop_mode,
        "num_classes": spec.num_classes,
    }


class PatchStem(nn.Module):
    """Per-patch linear embedding as a strided convolution; output (B, S, C), tokens in row-major
    patch order."""

    def __init__(self, spec: MixerSpec):
        super().__init__()
        self.proj = nn.Conv2d(spec.in_chans, spec.hidden_dim, spec.patch_size, stride=spec.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, gelu: str, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh" if gelu == "tanh" else "none")
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


# The layouts of the token-mixing product W1 LayerNorm(X)^T of Eq. (1), for X of shape (B, S, C):
#   transpose  nn.Linear on the transposed tokens (B, C, S), then back (timm's; two transposes);
#   matmul     W1 @ X, the (D_S, S) weight broadcast over the batch: (B, D_S, C), no transpose;
#   einsum     torch.einsum("ts,bsc->btc", W1, X), left to torch to lay out.
# All three use the same parameters (fc1.weight is W1), so checkpoints do not depend on the choice.
TOKEN_MIXING = ("transpose", "matmul", "einsum")


class TokenMixingMlp(Mlp):
    """The token-mixing MLP of Eq. (1), W2 gelu(W1 X^T)^T on tokens X (B, S, C): an MLP across the S
    tokens, shared by the C channels, computed in the layout `token_mixing` names (TOKEN_MIXING).
    The layouts differ only in speed, which depends on the device and on torch.compile
    (`mixer benchmark models=[mixer-b16,mixer-b16-matmul,mixer-b16-einsum]` measures them)."""

    def __init__(self, spec: MixerSpec):
        super().__init__(spec.num_tokens, spec.tokens_mlp_dim, spec.gelu, spec.dropout)
        self.token_mixing = spec.token_mixing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.token_mixing == "transpose":
            return super().forward(x.transpose(1, 2)).transpose(1, 2)
        h = self.drop(self.act(self.across_tokens(self.fc1, x)))
        return self.drop(self.across_tokens(self.fc2, h))

    def across_tokens(self, fc: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """fc applied along dim 1 of (B, S, C): W @ x + b, the bias broadcast over the channels."""
        if self.token_mixing == "matmul":
            out = torch.matmul(fc.weight, x)
        else:
            out = torch.einsum("ts,bsc->btc", fc.weight, x)
        return out + fc.bias.unsqueeze(-1)


def stochastic_depth(rate: float, rescale: bool) -> nn.Module:
    """Drops a block's residual branch for whole samples in training; identity at evaluation.
    Without rescale as the paper's code (big_vision: branch x (1 - bernoulli(rate))), with rescale
    as timm's DropPath (kept branches x 1 / (1 - rate), so the expected output is unchanged)."""
    return DropPath(rate, scale_by_keep=rescale) if rate > 0 else nn.Identity()


class MixerBlock(nn.Module):
    """One layer of Eq. (1) on tokens X of shape (B, S, C):
        U = X + W2 gelu(W1 LayerNorm(X)^T)^T    token mixing: an MLP across the S tokens, per channel
        Y = U + W4 gelu(W3 LayerNorm(U))        channel mixing: an MLP across the C channels, per token
    """

    def __init__(self, spec: MixerSpec, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(spec.hidden_dim, eps=1e-6)
        self.mlp_tokens = TokenMixingMlp(spec)
        self.norm2 = nn.LayerNorm(spec.hidden_dim, eps=1e-6)
        self.mlp_channels = Mlp(spec.hidden_dim, spec.channels_mlp_dim, spec.gelu, spec.dropout)
        self.drop_path = stochastic_depth(drop_path, spec.drop_path_rescale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.mlp_tokens(self.norm1(x)))
        return x + self.drop_path(self.mlp_channels(self.norm2(x)))


class Mixer(nn.Module):
    def __init__(self, spec: MixerSpec):
        super().__init__()
        validate(spec)
        self.spec = spec
        self.pretrained_cfg = make_pretrained_cfg(spec)
        self.stem = PatchStem(spec)
        rates = [spec.drop_path * i / max(spec.num_blocks - 1, 1) for i in range(spec.num_blocks)]
        self.blocks = nn.Sequential(*(MixerBlock(spec, r) for r in rates))
        self.norm = nn.LayerNorm(spec.hidden_dim, eps=1e-6)
        self.head = self._new_head(spec.num_classes)
        self.grad_checkpointing = False
        self.reset_parameters()

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def num_features(self) -> int:  # the width of forward_head(x, pre_logits=True), as timm names it
        return self.spec.hidden_dim

    def _new_head(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.spec.hidden_dim, num_classes) if num_classes else nn.Identity()

    def _zero_head(self) -> None:
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.constant_(self.head.bias, self.spec.head_bias)

    def reset_parameters(self) -> None:
        """Flax defaults as in the paper's code: lecun-normal kernels, zero biases, zero head."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                lecun_normal_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self._zero_head()

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """A new zero-initialised head (weight and bias 0) for `num_classes` (0: no head), as the
        paper fine-tunes; the spec and pretrained_cfg follow."""
        self.spec = replace(self.spec, num_classes=num_classes, head_bias=0.0)
        self.head = self._new_head(num_classes).to(self.norm.weight).train(self.training)
        self._zero_head()
        # a new head predicts new classes: the old head's names (pretrained_cfg label_names) go with it
        kept = {k: v for k, v in self.pretrained_cfg.items() if not k.startswith("label_")}
        self.pretrained_cfg = {**kept, "num_classes": num_classes}

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

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) images -> (B, S, C) tokens after the last block and the pre-head LayerNorm."""
        self._check_input(x)
        x = self.stem(x)
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, S, C) tokens -> the mean over tokens (pre-logits), then the classifier unless pre_logits."""
        x = x.mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build_mixer(variant: str | None = None, num_classes: int = 1000, img_size: int = 224, **opts) -> Mixer:
    """A Mixer by the paper's variant name ("S/32" ... "H/14"); keyword arguments named as in the
    paper's code (patch_size, hidden_dim, num_blocks, tokens_mlp_dim, channels_mlp_dim) and the
    MixerSpec fields (in_chans, gelu, dropout, drop_path, drop_path_rescale, head_bias, token_mixing) override the
    variant. Its `pretrained_cfg` holds the paper's evaluation preprocessing at `img_size`."""
    return Mixer(spec_for(variant, num_classes=num_classes, img_size=img_size, **opts))
