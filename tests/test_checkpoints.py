"""Import (official Flax .npz, timm .pth/.safetensors, our checkpoints) and export (safetensors): the
weights, the recorded evaluation preprocessing (as timm resolves it), and one-line errors for bad files."""
import json
import re
import zipfile

import numpy as np
import pytest
import timm.models.mlp_mixer as timm_mixer
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from mixer_cli.models import VARIANTS, build_mixer, load_mixer
from mixer_cli.models.checkpoints import export_safetensors, infer_spec


def _ours(gelu="tanh", classes=5, channels_mlp_dim=20):  # kept: distinct sizes, 2 blocks, so a mis-mapped kernel fails
    model = build_mixer(None, num_classes=classes, img_size=24, patch_size=4, hidden_dim=12, num_blocks=2,
                        tokens_mlp_dim=6, channels_mlp_dim=channels_mlp_dim, gelu=gelu).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def _flax_params(model) -> dict[str, np.ndarray]:
    """The parameter tree of the paper's Flax code (vit_jax/models_mixer.py), flattened with '/',
    written out by hand: Dense kernels are (in, out), the conv stem kernel is (P, P, in, C)."""
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    out = {"stem/kernel": sd["stem.proj.weight"].transpose(2, 3, 1, 0), "stem/bias": sd["stem.proj.bias"]}
    for i in range(model.spec.num_blocks):
        b, f = f"blocks.{i}.", f"MixerBlock_{i}/"
        for flax_ln, ours_ln in (("LayerNorm_0", "norm1"), ("LayerNorm_1", "norm2")):
            out[f + flax_ln + "/scale"] = sd[b + ours_ln + ".weight"]
            out[f + flax_ln + "/bias"] = sd[b + ours_ln + ".bias"]
        for flax_mlp, ours_mlp in (("token_mixing", "mlp_tokens"), ("channel_mixing", "mlp_channels")):
            for dense, fc in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
                out[f"{f}{flax_mlp}/{dense}/kernel"] = sd[f"{b}{ours_mlp}.{fc}.weight"].T
                out[f"{f}{flax_mlp}/{dense}/bias"] = sd[f"{b}{ours_mlp}.{fc}.bias"]
    out["pre_head_layer_norm/scale"] = sd["norm.weight"]
    out["pre_head_layer_norm/bias"] = sd["norm.bias"]
    out["head/kernel"] = sd["head.weight"].T
    out["head/bias"] = sd["head.bias"]
    return out


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


X = torch.randn(3, 3, 24, 24)
IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (41, 57, 3), dtype=np.uint8))  # 57 x 41


def _timm_prepares(model, image=IMAGE) -> torch.Tensor:
    """What timm's own tools make of an image for this model."""
    return create_transform(**resolve_data_config({}, model=model))(image)


def _prepared(image, resize, crop, interpolation, mean=0.5, std=0.5) -> torch.Tensor:
    """An independent evaluation pipeline: torchvision resize (an int: the shorter side; a pair:
    both sides), centre crop, pixels to [0, 1], normalise."""
    image = TF.center_crop(TF.resize(image, resize, InterpolationMode(interpolation)), crop)
    return (TF.pil_to_tensor(image).float() / 255 - mean) / std


def _save_npz(tmp_path, model, name="m.npz"):
    path = tmp_path / name
    np.savez(path, **_flax_params(model))
    return path


def _save_ckpt(path, model, record):
    """As our Lightning checkpoints store it: weights under "model.", spec and preprocessing under "mixer"."""
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "mixer": {"spec": model.spec.to_dict(), **record}, "epoch": 3}, path)
    return path


def test_official_npz_round_trip_gives_same_logits_and_vit_jax_preprocessing(tmp_path):
    ref = _ours()
    loaded = load_mixer(_save_npz(tmp_path, ref, "Mixer-tiny.npz"))
    assert loaded.spec == ref.spec  # patch, width, depth, D_S, D_C, tokens, classes inferred from shapes
    assert loaded.spec.gelu == "tanh"
    torch.testing.assert_close(_logits(loaded, X), _logits(ref, X), atol=1e-5, rtol=1e-5)
    # vit_jax evaluates by resizing straight to the resolution, bilinearly, pixels to [-1, 1]
    assert loaded.pretrained_cfg == {"input_size": (3, 24, 24), "mean": (0.5,) * 3, "std": (0.5,) * 3,
                                     "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "squash",
                                     "num_classes": 5, "head_activation": "softmax"}
    torch.testing.assert_close(_timm_prepares(loaded), _prepared(IMAGE, [24, 24], 24, "bilinear"))


def test_npz_saved_with_optimizer_wrapper_loads(tmp_path):
    ref = _ours()
    path = tmp_path / "old.npz"
    np.savez(path, **{f"opt/target/{k}": v for k, v in _flax_params(ref).items()})
    torch.testing.assert_close(_logits(load_mixer(path), X), _logits(ref, X), atol=1e-5, rtol=1e-5)


def _timm_model():
    model = timm_mixer.MlpMixer(num_classes=7, img_size=32, patch_size=8, num_blocks=2, embed_dim=16,
                                mlp_ratio=(0.5, 4.0)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".bin"])
def test_timm_state_dict_gives_timms_logits_and_preprocessing(tmp_path, suffix):
    ref = _timm_model()
    path = tmp_path / f"timm{suffix}"
    if suffix == ".safetensors":
        save_file(ref.state_dict(), path)
    else:
        torch.save({"state_dict": ref.state_dict()}, path)
    loaded = load_mixer(path)
    assert (loaded.spec.patch_size, loaded.spec.hidden_dim, loaded.spec.num_blocks) == (8, 16, 2)
    assert (loaded.spec.tokens_mlp_dim, loaded.spec.channels_mlp_dim, loaded.spec.num_tokens) == (8, 64, 16)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_logits(loaded, x), _logits(ref, x), atol=1e-5, rtol=1e-5)
    # timm's default_cfgs for mixer_*: bicubic, shorter side to floor(32 / 0.875) = 36, centre crop
    assert resolve_data_config({}, model=loaded)["crop_mode"] == "center"
    torch.testing.assert_close(_timm_prepares(loaded), _prepared(IMAGE, 36, 32, "bicubic"))


def test_lightning_checkpoint_loads_with_recorded_spec_and_preprocessing(tmp_path):
    ref = _ours(gelu="exact")
    cfg = {"input_size": [3, 24, 24], "mean": [0.1, 0.2, 0.3], "std": [0.2, 0.3, 0.4], "interpolation": "bicubic",
           "crop_pct": 0.75, "crop_mode": "center", "num_classes": 5}
    loaded = load_mixer(_save_ckpt(tmp_path / "last.ckpt", ref, {"pretrained_cfg": cfg}))
    assert loaded.spec == ref.spec
    torch.testing.assert_close(_logits(loaded, X), _logits(ref, X))
    mean, std = torch.tensor(cfg["mean"])[:, None, None], torch.tensor(cfg["std"])[:, None, None]
    torch.testing.assert_close(_timm_prepares(loaded), _prepared(IMAGE, 32, 24, "bicubic", mean, std))


# (eval_crop, eval_resize) of files written before pretrained_cfg; 50 is a size where img/eval_resize
# as crop_pct would make timm resize to 49 pixels
@pytest.mark.parametrize("eval_crop,eval_resize,resize", [
    ("none", 28, [28, 28]), ("resize-crop", 32, [32, 32]), ("resize-crop", 50, [50, 50]),
    ("resmall-crop", 32, 32), ("resmall-crop", 50, 50),
])
def test_older_checkpoints_recording_preprocess_keep_their_pipeline(tmp_path, eval_crop, eval_resize, resize,
                                                                   tiny_mixer):
    ref = tiny_mixer(num_classes=3, in_chans=3)
    preprocess = {"img_size": 28, "channels": 3, "mean": [0.1] * 3, "std": [0.2] * 3, "interpolation": "bilinear",
                  "eval_crop": eval_crop, "eval_resize": eval_resize}
    loaded = load_mixer(_save_ckpt(tmp_path / "old.ckpt", ref, {"preprocess": preprocess}))
    # the pipeline those files were evaluated with (data/transforms.py before pretrained_cfg)
    torch.testing.assert_close(_timm_prepares(loaded), _prepared(IMAGE, resize, 28, "bilinear", 0.1, 0.2))
    assert loaded.pretrained_cfg["crop_mode"] == ("center" if eval_crop == "resmall-crop" else "squash")


def test_checkpoint_records_its_token_mixing_layout_and_loads_into_another(tmp_path):
    """The layout is how the model computes, not what it computes: a checkpoint keeps the one it was
    trained with, and an override (finetune's model.token_mixing) loads the same weights into another."""
    ref = _ours(gelu="exact")
    ref = load_mixer(_save_ckpt(tmp_path / "a.ckpt", ref, {"pretrained_cfg": ref.pretrained_cfg}),
                     token_mixing="matmul")
    assert ref.spec.token_mixing == "matmul"
    kept = load_mixer(_save_ckpt(tmp_path / "matmul.ckpt", ref, {"pretrained_cfg": ref.pretrained_cfg}))
    assert kept.spec == ref.spec and kept.blocks[1].mlp_tokens.token_mixing == "matmul"
    einsum = load_mixer(tmp_path / "matmul.ckpt", token_mixing="einsum")
    assert einsum.blocks[0].mlp_tokens.token_mixing == "einsum"
    torch.testing.assert_close(_logits(einsum, X), _logits(ref, X), atol=1e-5, rtol=1e-5)


def test_export_round_trip_records_spec_and_pretrained_cfg(tmp_path):
    ref = _ours()
    model = load_mixer(_save_npz(tmp_path, ref), drop_path=0.1)
    out = export_safetensors(model, tmp_path / "m.safetensors")
    with safe_open(out, framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["spec"])["drop_path"] == 0.1
    assert json.loads(meta["pretrained_cfg"])["crop_mode"] == "squash"
    back = load_mixer(out)
    assert back.spec == model.spec and back.pretrained_cfg == model.pretrained_cfg
    torch.testing.assert_close(_logits(back, X), _logits(ref, X), atol=1e-5, rtol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npz", "m.safetensors"]  # no temporary file left


def test_exported_file_loads_into_timm_strictly(tmp_path):
    model = load_mixer(_save_npz(tmp_path, _ours(gelu="exact")), gelu="exact")
    path = export_safetensors(model, tmp_path / "m.safetensors")
    ref = timm_mixer.MlpMixer(num_classes=5, img_size=24, patch_size=4, num_blocks=2, embed_dim=12,
                              mlp_ratio=(0.5, 20 / 12))
    with safe_open(path, framework="pt") as f:
        ref.load_state_dict({k: f.get_tensor(k) for k in f.keys()}, strict=True)
    torch.testing.assert_close(_logits(ref, X), _logits(model, X), atol=1e-5, rtol=1e-5)


def test_files_are_told_apart_by_content_not_suffix(tmp_path):
    ref = _ours()
    export_safetensors(ref, tmp_path / "m.safetensors").rename(tmp_path / "m.pth")
    _save_npz(tmp_path, ref).rename(tmp_path / "m.ckpt")
    for name in ("m.pth", "m.ckpt"):
        torch.testing.assert_close(_logits(load_mixer(tmp_path / name), X), _logits(ref, X), atol=1e-5, rtol=1e-5)


def test_shape_mismatch_names_parameter_and_both_shapes(tmp_path):
    path = _save_npz(tmp_path, _ours())
    with pytest.raises(ValueError, match=r"m\.npz: shape mismatch for head\.weight: the file has \(5, 12\), "
                                         r"the model expects \(10, 12\)$"):
        load_mixer(path, num_classes=10)


def test_spec_inferred_from_table1_shapes():
    with torch.device("meta"):
        state = build_mixer("B/16", num_classes=21843).state_dict()
    spec = infer_spec(state, "B16.npz")
    assert {k: getattr(spec, k) for k in VARIANTS["B/16"]} == VARIANTS["B/16"]
    assert (spec.img_size, spec.num_tokens, spec.num_classes) == (224, 196, 21843)


# --- bad files: one line that names the file and the problem ------------------------------------------

def _write(fmt, path, model):
    if fmt == ".npz":
        np.savez(path, **_flax_params(model))
    elif fmt == ".safetensors":
        export_safetensors(model, path)
    elif fmt == ".pth":
        torch.save(model.state_dict(), path)
    else:
        _save_ckpt(path, model, {"pretrained_cfg": model.pretrained_cfg})


def _mismatched(fmt, path):
    """A file whose tensors contradict each other: block 1's channel MLP is wider than block 0's
    (for our checkpoint: than its recorded spec)."""
    model, wide = _ours(), _ours(channels_mlp_dim=30)
    model.blocks[1].mlp_channels = wide.blocks[1].mlp_channels
    if fmt == ".ckpt":
        torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                    "mixer": {"spec": _ours().spec.to_dict(), "pretrained_cfg": model.pretrained_cfg}}, path)
    else:
        _write(fmt, path, model)


PROBLEMS = {
    "empty": (lambda fmt, path: path.write_bytes(b""), r"is empty \(0 bytes\)"),
    "truncated": (lambda fmt, path: (_write(fmt, path, _ours()), path.write_bytes(path.read_bytes()[:1000])),
                  r"is a truncated or corrupt zip archive|cannot read this safetensors file"),
    "text": (lambda fmt, path: path.write_text("step,loss\n1,0.5\n"), r"is not a checkpoint: load_mixer reads"),
    "image": (lambda fmt, path: IMAGE.save(path, format="PNG"), r"is not a checkpoint: load_mixer reads"),
    "other zip": (lambda fmt, path: zipfile.ZipFile(path, "w").writestr("notes.txt", "hello"),
                  r"is a zip archive that is neither a PyTorch checkpoint nor an \.npz"),
    "shapes": (_mismatched, r": shape mismatch for blocks\.1\.mlp_channels\.fc1\.(weight|bias): the file has \(30"),
}


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("fmt", [".ckpt", ".pth", ".safetensors", ".npz"])
def test_bad_file_is_one_line_naming_file_and_problem(tmp_path, fmt, problem):
    path = tmp_path / f"model{fmt}"
    make, message = PROBLEMS[problem]
    make(fmt, path)
    with pytest.raises(ValueError) as error:
        load_mixer(path)
    text = str(error.value)
    assert "\n" not in text and text.startswith(str(path)), text
    assert re.search(message, text), text


def test_recorded_spec_and_preprocessing_problems_name_the_file(tmp_path):
    model = _ours()
    spec = {**model.spec.to_dict(), "attention_heads": 8}
    torch.save({"state_dict": {}, "mixer": {"spec": spec, "pretrained_cfg": model.pretrained_cfg}}, tmp_path / "a.ckpt")
    with pytest.raises(ValueError, match=r"a\.ckpt: the recorded model spec is missing or not one this version reads"):
        load_mixer(tmp_path / "a.ckpt")
    cfg = {k: v for k, v in model.pretrained_cfg.items() if k != "crop_mode"}
    _save_ckpt(tmp_path / "b.ckpt", model, {"pretrained_cfg": cfg})
    with pytest.raises(ValueError, match=r"^.*b\.ckpt: the recorded preprocessing lacks 'crop_mode'$"):
        load_mixer(tmp_path / "b.ckpt")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this object would create the marker file
        return (open, (str(self.marker), "w"))


def test_loading_never_unpickles_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": _ours().state_dict(), "extra": _Payload(marker)}, tmp_path / "evil.pth")
    # names the first (Python 3.12 calls it _io.open)
    refused = r"evil\.pth holds pickled Python objects besides tensors \(_?io\.open\); .* refused$"
    with pytest.raises(ValueError, match=refused):
        load_mixer(tmp_path / "evil.pth")
    np.save(tmp_path / "evil.npy", np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(tmp_path / "evil.npz", "w") as z:  # an .npz whose member is a pickled object array
        z.write(tmp_path / "evil.npy", "head/kernel.npy")
    with pytest.raises(ValueError, match=r"evil\.npz: cannot read this \.npz archive \(Object arrays cannot be loaded"):
        load_mixer(tmp_path / "evil.npz")
    assert not marker.exists()


def test_missing_and_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"^checkpoint .*nope\.ckpt does not exist$"):
        load_mixer(tmp_path / "nope.ckpt")
    with pytest.raises(ValueError, match=r"^checkpoint .* is not a file$"):
        load_mixer(tmp_path)
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match=r"resnet\.pth does not hold MLP-Mixer weights"):
        load_mixer(tmp_path / "resnet.pth")


def test_export_command_writes_safetensors_from_an_npz(tmp_path):
    from typer.testing import CliRunner

    from mixer_cli.cli import app

    ref = _ours()
    src = _save_npz(tmp_path, ref)
    r = CliRunner().invoke(app, ["export", "--from", str(src), "--to", str(tmp_path / "m.safetensors")])
    assert r.exit_code == 0, r.output
    exported = load_mixer(tmp_path / "m.safetensors")
    torch.testing.assert_close(_logits(exported, X), _logits(ref, X), atol=1e-5, rtol=1e-5)
    r = CliRunner().invoke(app, ["export", "--from", str(src), "--to", str(tmp_path / "m.pt")])
    assert r.exit_code == 2 and r.output.startswith("error: --to ") and "m.safetensors" in r.output
