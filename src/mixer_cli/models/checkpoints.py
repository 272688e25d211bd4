"""Load Mixers from files and export them. Loading never executes code from a file: numpy without
pickles, safetensors, and torch.load(weights_only=True).

Formats `load_mixer` reads, told apart by content (the suffix does not matter):
- the paper's official Flax .npz (google-research/vision_transformer): `stem/kernel`,
  `MixerBlock_i/{LayerNorm_0, token_mixing, LayerNorm_1, channel_mixing}/...`,
  `pre_head_layer_norm/scale`, `head/kernel`; kernels are (in, out), convs (P, P, in, C);
- a timm `MlpMixer` state dict (.pth or .safetensors), the same names as ours;
- our Lightning checkpoint (.ckpt) and our safetensors export, which record the spec and the
  evaluation preprocessing. Where a file does not record the spec, it is inferred from the tensor
  shapes, and the preprocessing is that of the file's source.
Every loaded model's `pretrained_cfg` holds that preprocessing, in timm's keys.
A file that is empty, truncated, of another kind or of mismatching shapes is one UserError line
that names the file and the problem.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mixer_cli.core.errors import UserError
from mixer_cli.models.contract import ACTIVATION_KEY, LABEL_KEYS, with_class_names
from mixer_cli.models.mixer import CROP_MODES, Mixer, MixerSpec, make_pretrained_cfg, validate, with_spec

EXPORT_FORMAT = "mixer-cli/1"

# Evaluation preprocessing of files that record none (mean = std = 0.5, i.e. pixels in [-1, 1], for both).
# The official code (vit_jax input_pipeline) resizes evaluation images straight to the resolution, bilinearly.
FLAX_EVAL = {"interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "squash"}
# timm's default_cfgs for its mixer_* models: bicubic, shorter side to img_size / 0.875, centre crop.
TIMM_EVAL = {"interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center"}
EVAL_KEYS = ("mean", "std", "interpolation", "crop_pct", "crop_mode")
RECORDED_EXTRAS = (*LABEL_KEYS, ACTIVATION_KEY)  # what else our files may record: class names, head activation


def unreadable(path: Path, kind: str, error: BaseException | str) -> UserError:
    detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return UserError(f"{path}: cannot read this {kind} ({detail})")


def file_format(path: Path) -> str:
    """"safetensors", "npz" or "torch", from the first bytes (and a zip archive's member names)."""
    with open(path, "rb") as f:
        head = f.read(10)
    if head[8:10] == b'{"':  # an 8-byte header length, then the JSON header
        return "safetensors"
    if head[:4] == b"PK\x03\x04":  # torch's format and .npz are both zip archives
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            raise UserError(f"{path} is a truncated or corrupt zip archive (no member directory at its end): "
                            "an interrupted download or copy? Fetch or write it again") from None
        if any(n.endswith("data.pkl") for n in names):
            return "torch"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        raise UserError(f"{path} is a zip archive that is neither a PyTorch checkpoint nor an .npz of arrays")
    if head[:1] == b"\x80":  # a pickle: torch's legacy (pre-zip) format
        return "torch"
    raise UserError(f"{path} is not a checkpoint: load_mixer reads PyTorch files (.ckpt, .pth), .safetensors "
                    "and the paper's .npz")


# ---- the official Flax .npz -------------------------------------------------------------------

FLAX_MLP = {"token_mixing": "mlp_tokens", "channel_mixing": "mlp_channels"}
FLAX_NORM = {"LayerNorm_0": "norm1", "LayerNorm_1": "norm2"}


def flax_name(key: str, source: Path) -> str:
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
    raise UserError(f"{source}: unexpected parameter {key!r}: not an MLP-Mixer checkpoint of the paper's code")


def flax_to_torch(array: np.ndarray, key: str, source: Path) -> torch.Tensor:
    if array.dtype.kind not in "fiu":
        raise UserError(f"{source}: {key} holds {array.dtype} values, not numbers")
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if key.endswith("kernel") and t.ndim == 4:  # conv (P, P, in, C) -> (C, in, P, P)
        return t.permute(3, 2, 0, 1).contiguous()
    if key.endswith("kernel") and t.ndim == 2:  # dense (in, out) -> (out, in)
        return t.T.contiguous()
    return t


NPZ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error)  # a pickled array raises ValueError


def read_flax_npz(path: Path) -> dict[str, torch.Tensor]:
    try:
        archive = np.load(path, allow_pickle=False)
    except NPZ_ERRORS as e:
        raise unreadable(path, ".npz archive", e) from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise UserError(f"{path} holds a single array (.npy), not the parameter archive of an MLP-Mixer")
    try:
        with archive:
            arrays = {k: archive[k] for k in archive.files}
    except NPZ_ERRORS as e:
        raise unreadable(path, ".npz archive", e) from None
    return {flax_name(k, path): flax_to_torch(a, k, path) for k, a in arrays.items()}


# ---- torch and safetensors files ----------------------------------------------------------------


def read_torch_file(path: Path):
    # torch warns of a pickle protocol other than its own before it reads or refuses the file: the
    # warning is kept here, so the user sees the file's one error line, or nothing
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with open(path, "rb") as f:  # a file object: torch.load would treat a `.safetensors` name as safetensors
                return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a file that is not a checkpoint
            protocol = re.search(r"Detected pickle protocol (\d+)", " ".join(str(w.message) for w in caught))
            raise torch_file_error(path, e, protocol and protocol.group(1)) from None


def torch_file_error(path: Path, error: Exception, protocol: str | None) -> UserError:
    """One line for torch.load's error; its weights-only refusals are paragraphs of advice around
    the unpickler's own message."""
    message = str(error)
    if found := re.search(r"GLOBAL (\S+)", message):
        return UserError(f"{path} holds pickled Python objects besides tensors ({found.group(1)}); "
                         "unpickling them could run code, so the file is refused")
    if protocol and "Unsupported operand" in message:
        return UserError(f"{path} is pickled with protocol {protocol}, which torch's safe loader does not read "
                         "(torch.save writes protocol 2); unpickling it otherwise could run code, so it is refused")
    if message.startswith("Weights only load failed"):
        advice = ("Weights only load failed", "Check the documentation")
        return unreadable(path, "PyTorch file", next(
            (p.strip() for p in message.split("\n\n") if p.strip() and not p.startswith(advice)), message))
    return unreadable(path, "PyTorch file", error)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    except Exception as e:  # SafetensorError for a bad header, OSError or others for bad tensor data
        raise unreadable(path, "safetensors file", e) from None


def unwrap_state_dict(obj) -> dict[str, torch.Tensor]:
    """A timm state dict, possibly saved inside {"state_dict": ...} or {"model": ...}, or with a
    `module.` (DDP) or `model.` (Lightning) prefix."""
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("not a state dict")
    for prefix in ("module.", "model."):
        if all(k.startswith(prefix) for k in obj):
            obj = {k.removeprefix(prefix): v for k, v in obj.items()}
    return obj


# ---- what a file records ------------------------------------------------------------------------


def pretrained_cfg_from_preprocess(preprocess: dict) -> dict:
    """Files written before `pretrained_cfg` recorded `preprocess`. Its eval_crop "none" resized
    straight to img_size; "resize-crop" resized to eval_resize x eval_resize pixels and
    "resmall-crop" the shorter side to eval_resize, both then centre-cropping img_size."""
    crop = preprocess.get("eval_crop", "none")
    # timm resizes to floor(img_size / crop_pct) pixels; the half pixel keeps that floor at eval_resize.
    crop_pct = 1.0 if crop == "none" else preprocess["img_size"] / (preprocess["eval_resize"] + 0.5)
    return {"mean": preprocess["mean"], "std": preprocess["std"],
            "interpolation": preprocess.get("interpolation", "bilinear"), "crop_pct": crop_pct,
            "crop_mode": {"none": "squash", "resize-crop": "squash", "resmall-crop": "center"}.get(crop, crop)}


def recorded_model(record: dict, source: Path) -> tuple[MixerSpec, dict]:
    """The spec and evaluation preprocessing our files record: {"spec": ..., "pretrained_cfg": ...}."""
    try:
        spec = MixerSpec(**record["spec"])
    except (KeyError, TypeError) as e:
        raise UserError(f"{source}: the recorded model spec is missing or not one this version reads ({e})") from None
    validate(spec)
    try:
        recorded = record["pretrained_cfg"] if "pretrained_cfg" in record else pretrained_cfg_from_preprocess(
            record["preprocess"])
        cfg = {k: recorded[k] for k in EVAL_KEYS} | {k: recorded[k] for k in RECORDED_EXTRAS if recorded.get(k)}
    except KeyError as e:
        raise UserError(f"{source}: the recorded preprocessing lacks {e}") from None
    crop_pct = cfg["crop_pct"]
    if cfg["crop_mode"] not in CROP_MODES or not isinstance(crop_pct, (int, float)) or not 0 < crop_pct <= 1:
        raise UserError(f"{source}: recorded crop_mode {cfg['crop_mode']!r} and crop_pct {crop_pct!r} must be "
                        f"one of {', '.join(CROP_MODES)} and in (0, 1]")
    if not len(cfg["mean"]) == len(cfg["std"]) == spec.in_chans:
        raise UserError(f"{source}: the recorded mean/std do not have one value per input channel ({spec.in_chans})")
    return spec, cfg


def export_record(meta: dict[str, str], source: Path) -> dict:
    try:
        return {k: json.loads(v) for k, v in meta.items() if k in ("spec", "pretrained_cfg", "preprocess")}
    except json.JSONDecodeError as e:
        raise UserError(f"{source}: corrupt metadata ({e})") from None


def infer_spec(state: dict[str, torch.Tensor], source: Path, **known) -> MixerSpec:
    """The Mixer a state dict (timm names) describes, from its tensor shapes."""
    try:
        out, in_chans, patch, _ = state["stem.proj.weight"].shape
        tokens_mlp_dim, num_tokens = state["blocks.0.mlp_tokens.fc1.weight"].shape
        channels_mlp_dim = state["blocks.0.mlp_channels.fc1.weight"].shape[0]
    except (KeyError, ValueError, IndexError):
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


def read_model_file(path: Path) -> tuple[dict[str, torch.Tensor], MixerSpec, dict]:
    """(weights, spec, evaluation preprocessing) of a file in any of the formats above."""
    kind = file_format(path)
    if kind == "npz":
        state = read_flax_npz(path)
        return state, infer_spec(state, path, gelu="tanh"), FLAX_EVAL  # the released code's GELU
    if kind == "safetensors":
        state, meta = read_safetensors(path)
        if meta.get("format") == EXPORT_FORMAT:
            return state, *recorded_model(export_record(meta, path), path)
        return state, infer_spec(state, path, gelu="exact"), TIMM_EVAL  # timm's MlpMixer uses erf-GELU
    obj = read_torch_file(path)
    if isinstance(obj, dict) and "mixer" in obj and "state_dict" in obj:  # our Lightning checkpoint
        state = {k.removeprefix("model."): v for k, v in obj["state_dict"].items() if k.startswith("model.")}
        return state, *recorded_model(obj["mixer"], path)
    try:
        state = unwrap_state_dict(obj)
    except ValueError:
        raise UserError(
            f"{path} is neither a mixer checkpoint nor a state dict; expected a .ckpt, .pth, .safetensors or .npz"
        ) from None
    return state, infer_spec(state, path, gelu="exact"), TIMM_EVAL


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


def load_mixer(path: str | Path, **overrides) -> Mixer:
    """The model a file describes, with its weights and, in `model.pretrained_cfg`, the evaluation
    preprocessing the file records (or its source's, where it records none). `overrides` change spec
    fields; one that changes a weight's shape (e.g. num_classes) is a shape-mismatch error naming
    the parameter."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise UserError(f"checkpoint {path} is not a file")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty (0 bytes): an interrupted download or copy? Fetch or write it again")
    state, spec, eval_cfg = read_model_file(path)
    model = Mixer(with_spec(spec, **overrides))
    load_weights(model, state, path)
    preprocessing = make_pretrained_cfg(model.spec, **{k: v for k, v in eval_cfg.items() if k in EVAL_KEYS})
    names = {k: eval_cfg[k] for k in LABEL_KEYS if k in eval_cfg} or imagenet_names(preprocessing)
    model.pretrained_cfg = with_class_names(preprocessing, names.get("label_names"), names.get("label_descriptions"))
    model.pretrained_cfg[ACTIVATION_KEY] = eval_cfg.get(ACTIVATION_KEY, "softmax")
    return model


def imagenet_names(pretrained_cfg: dict) -> dict:
    """For a file that names no classes: ImageNet's synsets and descriptions (shipped with timm) where
    the head has as many classes as ImageNet-1k or -21k, as the paper's and timm's released weights do."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(pretrained_cfg)
    if subset is None:
        return {}
    info = ImageNetInfo(subset)
    return {"label_names": info.label_names(), "label_descriptions": info.label_descriptions()}


# ---- export -------------------------------------------------------------------------------------


def export_metadata(model: Mixer) -> dict[str, str]:
    """What every export records beside the weights, as string pairs (safetensors metadata, ONNX
    metadata_props): the format, the spec, and pretrained_cfg (preprocessing, class names, head activation)."""
    return {"format": EXPORT_FORMAT, "spec": json.dumps(model.spec.to_dict()),
            "pretrained_cfg": json.dumps(model.pretrained_cfg)}


def export_safetensors(model: Mixer, path: str | Path) -> Path:
    """Write the weights (timm names, so timm loads them too) with the spec and pretrained_cfg in
    the safetensors metadata; atomically, so a reader never sees half a file."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(state, tmp, metadata=export_metadata(model))
    os.replace(tmp, path)
    return path
