"""Load Mixers from files and export them. Loading never executes code from a file: numpy without
pickles, safetensors, and torch.load(weights_only=True).

Formats `load_mixer` reads, told apart by content:
- the paper's official Flax .npz (google-research/vision_transformer): `stem/kernel`,
  `MixerBlock_i/{LayerNorm_0, token_mixing, LayerNorm_1, channel_mixing}/...`,
  `pre_head_layer_norm/scale`, `head/kernel`; kernels are (in, out), convs (P, P, in, C);
- a timm `MlpMixer` state dict (.pth or .safetensors), the same names as ours;
- our Lightning checkpoint (.ckpt) and our safetensors export, which record the spec and the
  preprocessing. Where a file does not record the spec, it is inferred from the tensor shapes.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mixer_cli.errors import UserError
from mixer_cli.models.mixer import Mixer, MixerSpec, with_spec

EXPORT_FORMAT = "mixer-cli/1"

# The official code scales inputs to [-1, 1] and resizes evaluation images straight to the model's
# resolution, bilinearly (vit_jax input_pipeline); timm's configs for these weights keep mean/std
# 0.5, resize the shorter side bicubically to img_size / 0.875 and centre-crop.
FLAX_PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear",
                   "eval_crop": "none", "eval_resize": 1.0}
TIMM_PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                   "eval_crop": "resmall-crop", "eval_resize": 1 / 0.875}


# ---- the official Flax .npz -------------------------------------------------------------------

FLAX_MLP = {"token_mixing": "mlp_tokens", "channel_mixing": "mlp_channels"}
FLAX_NORM = {"LayerNorm_0": "norm1", "LayerNorm_1": "norm2"}


def flax_name(key: str) -> str:
    """`MixerBlock_3/token_mixing/Dense_1/kernel` -> `blocks.3.mlp_tokens.fc2.weight`, etc."""
    key = key.removeprefix("opt/target/")  # checkpoints saved with the optimiser state around them
    parts = key.split("/")
    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}.get(parts[-1], parts[-1])
    if parts[0] == "stem":
        return f"stem.proj.{leaf}"
    if parts[0] == "pre_head_layer_norm":
        return f"norm.{leaf}"
    if parts[0] == "head":
        return f"head.{leaf}"
    m = re.fullmatch(r"MixerBlock_(\d+)", parts[0])
    if m and len(parts) == 3 and parts[1] in FLAX_NORM:
        return f"blocks.{m.group(1)}.{FLAX_NORM[parts[1]]}.{leaf}"
    if m and len(parts) == 4 and parts[1] in FLAX_MLP and parts[2] in ("Dense_0", "Dense_1"):
        fc = "fc1" if parts[2] == "Dense_0" else "fc2"
        return f"blocks.{m.group(1)}.{FLAX_MLP[parts[1]]}.{fc}.{leaf}"
    raise UserError(f"unexpected parameter {key!r}: not an MLP-Mixer checkpoint of the paper's code")


def flax_to_torch(array: np.ndarray, key: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if key.endswith("kernel") and t.ndim == 4:  # conv (P, P, in, C) -> (C, in, P, P)
        return t.permute(3, 2, 0, 1).contiguous()
    if key.endswith("kernel"):  # dense (in, out) -> (out, in)
        return t.T.contiguous()
    return t


def read_flax_npz(path: Path) -> dict[str, torch.Tensor]:
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (ValueError, OSError) as e:  # also what a pickled object array raises
        raise UserError(f"{path} is not a readable .npz file ({str(e).splitlines()[0]})") from None
    return {flax_name(k): flax_to_torch(a, k) for k, a in arrays.items()}


# ---- torch and safetensors files ----------------------------------------------------------------


def read_torch_file(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a file that is not a checkpoint
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def read_lightning_checkpoint(path: Path) -> dict:
    ckpt = read_torch_file(path)
    if not isinstance(ckpt, dict) or "mixer" not in ckpt or "state_dict" not in ckpt:
        raise UserError(f"{path} is not a checkpoint written by mixer (no model spec inside)")
    return ckpt


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]})") from None


def unwrap_state_dict(obj) -> dict[str, torch.Tensor]:
    """A timm state dict, possibly saved inside {"state_dict": ...} or {"model": ...}, or with a
    `module.` (DDP) or `model.` (Lightning) prefix."""
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("not a state dict")
    for prefix in ("module.", "model."):
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k.removeprefix(prefix): v for k, v in obj.items()}
    return obj


# ---- spec inference and strict loading ----------------------------------------------------------


def infer_spec(state: dict[str, torch.Tensor], source: Path, **known) -> MixerSpec:
    """The Mixer a state dict (timm names) describes, from its tensor shapes."""
    try:
        out, in_chans, patch, _ = state["stem.proj.weight"].shape
        tokens_mlp_dim, num_tokens = state["blocks.0.mlp_tokens.fc1.weight"].shape
        channels_mlp_dim = state["blocks.0.mlp_channels.fc1.weight"].shape[0]
    except (KeyError, ValueError):
        raise UserError(f"{source} does not hold MLP-Mixer weights (no stem.proj / blocks.0 MLP tensors)") from None
    grid = math.isqrt(num_tokens)
    if grid * grid != num_tokens:
        raise UserError(f"{source}: {num_tokens} tokens do not form a square grid of patches")
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    head = state.get("head.weight")
    fields = dict(
        patch_size=patch, hidden_dim=out, num_blocks=len(blocks), tokens_mlp_dim=tokens_mlp_dim,
        channels_mlp_dim=channels_mlp_dim, img_size=grid * patch, in_chans=in_chans,
        num_classes=0 if head is None else head.shape[0],
    )
    return MixerSpec(**{**fields, **known})


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """load_state_dict(strict=True), with errors that name the parameter (and both shapes)."""
    expected = model.state_dict()
    for name, tensor in state.items():
        if name not in expected:
            raise UserError(f"{source}: parameter {name!r} has no place in this Mixer (not an MLP-Mixer checkpoint?)")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise UserError(
                f"{source}: shape mismatch for {name}: the file has {tuple(tensor.shape)}, "
                f"the model expects {tuple(expected[name].shape)}"
            )
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UserError(f"{source}: parameter {missing[0]} is missing ({len(missing)} missing in all)")
    model.load_state_dict(state, strict=True)


def _build(state, spec: MixerSpec, preprocess: dict, source: Path, overrides: dict) -> Mixer:
    model = Mixer(with_spec(spec, **overrides))
    load_weights(model, state, source)
    model.preprocess = {**preprocess, "img_size": model.spec.img_size}
    return model


def _default_preprocess(spec: MixerSpec, base: dict) -> dict:
    """The preprocessing of a file that records none: its source's conventions at its resolution."""
    return {**base, "img_size": spec.img_size, "channels": spec.in_chans, "mean": base["mean"][: spec.in_chans],
            "std": base["std"][: spec.in_chans], "eval_resize": round(spec.img_size * base["eval_resize"])}


def load_mixer(path: str | Path, **overrides) -> Mixer:
    """The model a file describes, with its weights. `overrides` change spec fields; one that
    changes a weight's shape (e.g. num_classes) is a shape-mismatch error naming the parameter.
    `model.preprocess` says how images must be prepared for it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    if path.suffix == ".npz":
        state = read_flax_npz(path)
        spec = infer_spec(state, path, gelu="tanh")  # the released code's GELU
        return _build(state, spec, _default_preprocess(spec, FLAX_PREPROCESS), path, overrides)
    if path.suffix == ".safetensors":
        state, meta = read_safetensors(path)
        if meta.get("format") == EXPORT_FORMAT:
            spec = MixerSpec(**json.loads(meta["spec"]))
            return _build(state, spec, json.loads(meta["preprocess"]), path, overrides)
        spec = infer_spec(state, path, gelu="exact")  # timm's MlpMixer uses erf-GELU
        return _build(state, spec, _default_preprocess(spec, TIMM_PREPROCESS), path, overrides)
    obj = read_torch_file(path)
    if isinstance(obj, dict) and "mixer" in obj and "state_dict" in obj:  # our Lightning checkpoint
        state = {k.removeprefix("model."): v for k, v in obj["state_dict"].items() if k.startswith("model.")}
        spec = MixerSpec(**obj["mixer"]["spec"])
        return _build(state, spec, obj["mixer"]["preprocess"], path, overrides)
    try:
        state = unwrap_state_dict(obj)
    except ValueError:
        raise UserError(
            f"{path} is neither a mixer checkpoint nor a state dict; expected a .ckpt, .pth, .safetensors or .npz"
        ) from None
    spec = infer_spec(state, path, gelu="exact")
    return _build(state, spec, _default_preprocess(spec, TIMM_PREPROCESS), path, overrides)


# ---- export -------------------------------------------------------------------------------------


def export_safetensors(model: Mixer, path: str | Path) -> Path:
    """Write the weights (timm names, so timm loads them too) with the spec and preprocessing in
    the safetensors metadata; atomically, so a reader never sees half a file."""
    from safetensors.torch import save_file

    path = Path(path)
    preprocess = getattr(model, "preprocess", None)
    if preprocess is None:
        raise UserError("this model records no preprocessing; load it with load_mixer() before exporting")
    meta = {"format": EXPORT_FORMAT, "spec": json.dumps(model.spec.to_dict()), "preprocess": json.dumps(preprocess)}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(state, tmp, metadata=meta)
    os.replace(tmp, path)
    return path
