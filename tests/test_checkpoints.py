"""Import (official Flax .npz, timm .pth/.safetensors, our checkpoints) and export (safetensors)."""
import json
import zipfile

import numpy as np
import pytest
import timm.models.mlp_mixer as timm_mixer
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mixer_cli.models import VARIANTS, build_mixer, load_mixer
from mixer_cli.models.checkpoints import export_safetensors, infer_spec


def _ours(gelu="tanh", classes=5):
    model = build_mixer(None, num_classes=classes, img_size=24, patch_size=4, hidden_dim=12, num_blocks=2,
                        tokens_mlp_dim=6, channels_mlp_dim=20, gelu=gelu).eval()
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


def test_official_npz_round_trip_gives_same_logits(tmp_path):
    ref = _ours()
    path = tmp_path / "Mixer-tiny.npz"
    np.savez(path, **_flax_params(ref))
    loaded = load_mixer(path)
    assert loaded.spec == ref.spec  # patch, width, depth, D_S, D_C, tokens, classes inferred from shapes
    assert loaded.spec.gelu == "tanh"
    torch.testing.assert_close(_logits(loaded, X), _logits(ref, X), atol=1e-5, rtol=1e-5)
    assert loaded.preprocess["img_size"] == 24 and loaded.preprocess["mean"] == [0.5, 0.5, 0.5]


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


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_state_dict_gives_timms_logits(tmp_path, suffix):
    ref = _timm_model()
    path = tmp_path / f"timm{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": ref.state_dict()}, path)
    else:
        save_file(ref.state_dict(), path)
    loaded = load_mixer(path)
    assert (loaded.spec.patch_size, loaded.spec.hidden_dim, loaded.spec.num_blocks) == (8, 16, 2)
    assert (loaded.spec.tokens_mlp_dim, loaded.spec.channels_mlp_dim, loaded.spec.num_tokens) == (8, 64, 16)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_logits(loaded, x), _logits(ref, x), atol=1e-5, rtol=1e-5)


def test_lightning_checkpoint_loads_with_recorded_spec(tmp_path):
    ref = _ours(gelu="exact")
    preprocess = {"img_size": 24, "channels": 3, "mean": [0.1] * 3, "std": [0.2] * 3, "interpolation": "bicubic",
                  "eval_crop": "resize-crop", "eval_resize": 28}
    ckpt = {"state_dict": {f"model.{k}": v for k, v in ref.state_dict().items()},
            "mixer": {"spec": ref.spec.to_dict(), "preprocess": preprocess}, "epoch": 3}
    torch.save(ckpt, tmp_path / "last.ckpt")
    loaded = load_mixer(tmp_path / "last.ckpt")
    assert loaded.spec == ref.spec and loaded.preprocess == preprocess
    torch.testing.assert_close(_logits(loaded, X), _logits(ref, X))


def test_export_round_trip_records_spec_and_preprocessing(tmp_path):
    ref = _ours()
    np.savez(tmp_path / "m.npz", **_flax_params(ref))
    model = load_mixer(tmp_path / "m.npz", drop_path=0.1)
    out = export_safetensors(model, tmp_path / "m.safetensors")
    with safe_open(out, framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["spec"])["drop_path"] == 0.1
    assert json.loads(meta["preprocess"])["interpolation"] == "bilinear"
    back = load_mixer(out)
    assert back.spec == model.spec and back.preprocess == model.preprocess
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


def _save_npz(tmp_path, model):
    path = tmp_path / "m.npz"
    np.savez(path, **_flax_params(model))
    return path


def test_shape_mismatch_names_parameter_and_both_shapes(tmp_path):
    path = _save_npz(tmp_path, _ours())
    with pytest.raises(ValueError, match=r"m\.npz: shape mismatch for head\.weight: the file has \(5, 12\), "
                                         r"the model expects \(10, 12\)$"):
        load_mixer(path, num_classes=10)


def test_inconsistent_file_names_the_parameter(tmp_path):
    params = _flax_params(_ours())
    params["MixerBlock_1/channel_mixing/Dense_0/kernel"] = np.zeros((12, 30), np.float32)
    np.savez(tmp_path / "bad.npz", **params)
    with pytest.raises(ValueError, match=r"shape mismatch for blocks\.1\.mlp_channels\.fc1\.weight: the file has "
                                         r"\(30, 12\), the model expects \(20, 12\)"):
        load_mixer(tmp_path / "bad.npz")


def test_spec_inferred_from_table1_shapes():
    with torch.device("meta"):
        state = build_mixer("B/16", num_classes=21843).state_dict()
    spec = infer_spec(state, "B16.npz")
    assert {k: getattr(spec, k) for k in VARIANTS["B/16"]} == VARIANTS["B/16"]
    assert (spec.img_size, spec.num_tokens, spec.num_classes) == (224, 196, 21843)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this object would create the marker file
        return (open, (str(self.marker), "w"))


def test_loading_never_unpickles_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": _ours().state_dict(), "extra": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"evil\.pth is not a readable checkpoint"):
        load_mixer(tmp_path / "evil.pth")
    np.save(tmp_path / "evil.npy", np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(tmp_path / "evil.npz", "w") as z:  # an .npz whose member is a pickled object array
        z.write(tmp_path / "evil.npy", "head/kernel.npy")
    with pytest.raises(ValueError, match=r"evil\.npz is not a readable \.npz file"):
        load_mixer(tmp_path / "evil.npz")
    assert not marker.exists()


def test_missing_and_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"^checkpoint .*nope\.ckpt does not exist$"):
        load_mixer(tmp_path / "nope.ckpt")
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
