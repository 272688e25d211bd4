"""`mixer export --format onnx`: onnxruntime, run here, gives PyTorch's logits at batch sizes other than the
traced one; the metadata carries the spec, preprocessing and class names; the export's own check fails
when onnxruntime is off; bad --to/--format lines end in one line, exit 2, and no file."""
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from mixer_cli.cli import app
from mixer_cli.core.errors import UserError
from mixer_cli.models import MixerSpec, load_mixer
from mixer_cli.models.contract import class_names, with_class_names
from mixer_cli.models.onnx import TRACE_BATCH, export_onnx, tolerance

NAMES = ("cat", "dog", "eel", "fox", "gnu")


@pytest.fixture(scope="module")
def model(tiny_mixer):
    """Trained-looking (every weight random), RGB, named classes, a non-default crop and head activation:
    each shows if lost."""
    model = tiny_mixer(num_classes=len(NAMES), img_size=16, in_chans=3, num_blocks=2, trained=True).eval()
    model.pretrained_cfg = with_class_names({**model.pretrained_cfg, "crop_pct": 0.9, "mean": (0.4, 0.5, 0.6)},
                                            NAMES, [f"a {n}" for n in NAMES]) | {"head_activation": "sigmoid"}
    return model


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    difference, bound = export_onnx(model, folder / "m.onnx")
    return folder / "m.onnx", difference, bound


def _onnx_logits(path, pixels: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"pixels": pixels.numpy()})[0])


@pytest.mark.parametrize("batch", [1, 4])
def test_onnxruntime_gives_pytorchs_logits_at_any_batch_size(model, exported, batch):
    assert batch != TRACE_BATCH
    path, _, _ = exported
    pixels = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        expected = model(pixels)
    got = _onnx_logits(path, pixels)
    assert got.shape == (batch, len(NAMES))
    assert (got - expected).abs().max().item() <= tolerance(expected)
    assert expected.abs().max() > 0.1  # the logits are not all zero, so matching them says something


def test_the_export_reports_the_difference_it_measured(exported):
    path, difference, bound = exported
    assert 0 <= difference <= bound < 1e-3
    assert [p.name for p in path.parent.iterdir()] == ["m.onnx"]  # no temporary file left
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in session.get_inputs()] == [("pixels", ["batch", 3, 16, 16])]
    assert [(o.name, o.shape) for o in session.get_outputs()] == [("logits", ["batch", len(NAMES)])]


def test_metadata_carries_spec_preprocessing_and_class_names(model, exported):
    meta = ort.InferenceSession(str(exported[0]), providers=["CPUExecutionProvider"]).get_modelmeta()
    props = meta.custom_metadata_map
    assert props["format"] == "mixer-cli/1"
    assert MixerSpec(**json.loads(props["spec"])) == model.spec
    cfg = json.loads(props["pretrained_cfg"])
    assert cfg["input_size"] == [3, 16, 16] and cfg["mean"] == [0.4, 0.5, 0.6] and cfg["crop_pct"] == 0.9
    assert cfg["label_names"] == list(NAMES) and class_names(cfg) == [f"a {n}" for n in NAMES]
    assert cfg["head_activation"] == "sigmoid"


def test_cli_writes_onnx_that_matches_the_checkpoint(tiny_mixer, write_checkpoint, tmp_path):
    checkpoint = write_checkpoint(tiny_mixer(trained=True))
    r = CliRunner().invoke(app, ["export", "--from", str(checkpoint), "--to", str(tmp_path / "m.onnx"),
                                 "--format", "onnx"])
    assert r.exit_code == 0, r.output
    line, = r.stderr.splitlines()
    assert line.startswith(f"wrote {tmp_path / 'm.onnx'} (") and "onnxruntime's logits within" in line
    pixels = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = load_mixer(checkpoint).eval()(pixels)
    assert (_onnx_logits(tmp_path / "m.onnx", pixels) - expected).abs().max().item() <= tolerance(expected)


def _off_by_a_little(logits: np.ndarray) -> np.ndarray:
    logits = logits.copy()
    logits[0, 0] += 1e-2  # above the bound (1e-4 x (1 + a few)), far below what a broken export gives
    return logits


def _nan(logits: np.ndarray) -> np.ndarray:
    return np.full_like(logits, np.nan)


def _one_row_short(logits: np.ndarray) -> np.ndarray:
    return logits[1:]


@pytest.mark.parametrize("corrupt", [_off_by_a_little, _nan, _one_row_short])
def test_the_export_fails_and_writes_nothing_when_onnxruntime_disagrees(model, tmp_path, monkeypatch, corrupt):
    run = ort.InferenceSession.run
    monkeypatch.setattr(ort.InferenceSession, "run", lambda self, *a, **k: [corrupt(o) for o in run(self, *a, **k)])
    with pytest.raises(UserError, match=r"m\.onnx: onnxruntime's logits differ from PyTorch's by up to \S+, beyond "
                                        r"the bound \S+; nothing written$"):
        export_onnx(model, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,expected", [
    (["--to={tmp}/m.pt"], "--to {tmp}/m.pt: the export is a .safetensors or .onnx file, "
                          "e.g. {tmp}/m.safetensors or {tmp}/m.onnx"),
    (["--to={tmp}/m.pt", "--format=onnx"], "--to {tmp}/m.pt: the export is a .onnx file, e.g. {tmp}/m.onnx"),
    (["--to={tmp}/m.onnx", "--format=safetensors"],
     "--to {tmp}/m.onnx: --format safetensors writes a .safetensors file, e.g. {tmp}/m.safetensors"),
    (["--to={tmp}/m.safetensors", "--format=onnx"],
     "--to {tmp}/m.safetensors: --format onnx writes a .onnx file, e.g. {tmp}/m.onnx"),
    (["--to={tmp}/m.onnx", "--format=tflite"], "--format tflite: choose safetensors or onnx"),
    (["--to={tmp}/no/m.onnx"], "--to {tmp}/no/m.onnx: folder {tmp}/no does not exist"),
])
def test_a_bad_destination_is_one_line_exit_2_and_no_file(tiny_mixer, write_checkpoint, tmp_path, args, expected):
    checkpoint = write_checkpoint(tiny_mixer())
    r = CliRunner().invoke(app, ["export", f"--from={checkpoint}", *(a.format(tmp=tmp_path) for a in args)])
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [f"error: {expected.format(tmp=tmp_path)}"]
    assert list(tmp_path.iterdir()) == []
