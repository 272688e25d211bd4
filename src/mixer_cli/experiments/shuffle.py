"""`mixer shuffle-experiment`: Mixer vs ResNet under fixed pixel shuffles (Sec. 3.4, Figure 4).

Three input pipelines, each one fixed permutation of the pixels applied to every image (train and
eval alike, after augmentation): `original`; `patch_pixel`, the order of the Mixer's P x P patches
permuted and the pixels inside every patch permuted by one shared permutation; `global_pixel`, all
pixels permuted. A Mixer is equivariant to `patch_pixel` (permute its stem kernels and token-mixing
weights to match and it computes the same function), so its curves match the original's; a ResNet's
convolutions rely on neighbouring pixels and suffer. Both suffer under `global_pixel`.
"""
from __future__ import annotations

import torch
from torch import nn

PIPELINES = ("original", "patch_pixel", "global_pixel")


def patch_pixel_permutation(
    img_size: int, patch_size: int, patch_order: torch.Tensor, pixel_order: torch.Tensor
) -> torch.Tensor:
    """Flat pixel indices of the image whose patch s is input patch `patch_order[s]` with its
    pixels taken in `pixel_order` (row-major inside the patch): shuffled.flat = image.flat[perm]."""
    g, p = img_size // patch_size, patch_size
    # pixel index of (patch, position in patch), patches and positions both row-major
    by_patch = torch.arange(img_size * img_size).view(g, p, g, p).permute(0, 2, 1, 3).reshape(g * g, p * p)
    shuffled = by_patch[patch_order][:, pixel_order]
    return shuffled.view(g, g, p, p).permute(0, 2, 1, 3).reshape(-1)


def draw_permutations(img_size: int, patch_size: int, seed: int) -> dict[str, torch.Tensor]:
    """One fixed flat pixel permutation per pipeline, reproducible from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    num_patches = (img_size // patch_size) ** 2
    patch_order = torch.randperm(num_patches, generator=gen)
    pixel_order = torch.randperm(patch_size**2, generator=gen)
    return {
        "original": torch.arange(img_size * img_size),
        "patch_pixel": patch_pixel_permutation(img_size, patch_size, patch_order, pixel_order),
        "global_pixel": torch.randperm(img_size * img_size, generator=gen),
    }


class ShufflePixels(nn.Module):
    """The same pixel permutation for every image and every channel: (..., H, W) -> (..., H, W)."""

    def __init__(self, perm: torch.Tensor):
        super().__init__()
        self.register_buffer("perm", perm.long(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(-2)[..., self.perm].view(x.shape)

    def inverse(self) -> ShufflePixels:
        return ShufflePixels(torch.argsort(self.perm))
