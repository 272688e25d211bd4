"""A Mixer as an ONNX model with a dynamic batch, kept only once onnxruntime's logits match PyTorch's.

Input `pixels` (batch, C, H, W), float32, preprocessed as `pretrained_cfg` says; output `logits`
(batch, classes). The model's `metadata_props` hold what our safetensors export records (format, spec,
pretrained_cfg with the preprocessing, class names and head activation), so the .onnx file alone says how
to prepare images and what each logit means.
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import torch

from mixer_cli.core.errors import UserError
from mixer_cli.models.checkpoints import export_metadata
from mixer_cli.models.mixer import Mixer

INPUT, OUTPUT = "pixels", "logits"
# onnxruntime's logits may differ from PyTorch's by at most LOGIT_TOLERANCE x (1 + max |logit|). Both compute
# in float32 (2^-24 ~ 6e-8 relative) but sum the matmuls in another order and fuse LayerNorm and GELU; Mixer-S/16
# and B/16 at 224 px (random weights) differ by ~2e-7 x (1 + max |logit|), so 1e-4 leaves ~500x headroom for
# deeper models and larger activations, while a wrong weight, operator or layout moves logits by 1e-2 and more.
# The `1 +` keeps the bound absolute for logits near zero.
LOGIT_TOLERANCE = 1e-4
TRACE_BATCH = 2
# Batch sizes the check runs, both other than TRACE_BATCH: the file must not have fixed the batch it was traced with.
CHECK_BATCHES = (3, 1)


def tolerance(logits: torch.Tensor) -> float:
    return LOGIT_TOLERANCE * (1 + logits.abs().max().item())


def export_onnx(model: Mixer, path: str | Path) -> tuple[float, float]:
    """Write `model` (moved to CPU, float32, eval mode) to `path` as ONNX; return the largest difference
    between onnxruntime's and PyTorch's logits and its bound. Beyond the bound it is a UserError and nothing
    is written; the file appears complete or not at all."""
    path = Path(path)
    model = model.to("cpu", torch.float32).eval()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write_onnx(model, tmp)
        difference, bound = check_against_pytorch(model, tmp)
        if not difference <= bound:  # written so that a NaN fails too
            raise UserError(f"{path}: onnxruntime's logits differ from PyTorch's by up to {difference:.3g}, beyond "
                            f"the bound {bound:.3g}; nothing written")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return difference, bound


def write_onnx(model: Mixer, path: Path) -> None:
    example = torch.zeros(TRACE_BATCH, *input_shape(model))
    # verbose=False: torch.onnx otherwise prints each export stage; its warnings (about its internals, not
    # the model) would bury the command's one line
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), dynamo=True, verbose=False, input_names=[INPUT],
                                    output_names=[OUTPUT], dynamic_shapes=({0: torch.export.Dim("batch")},))
    program.model.metadata_props.update(export_metadata(model))
    # one self-contained file: protobuf caps it at 2 GB, above Mixer-H/14's 1.7 GB of float32 weights
    program.save(path, external_data=False)


def input_shape(model: Mixer) -> tuple[int, int, int]:
    return model.spec.in_chans, model.spec.img_size, model.spec.img_size


def check_against_pytorch(model: Mixer, path: Path) -> tuple[float, float]:
    """(largest |onnxruntime - PyTorch| logit difference, its bound) over seeded standard-normal images
    (normalised pixels' range) in batches of CHECK_BATCHES; a misshapen output is an infinite difference."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: onnxruntime's notes on graph optimisation are not the user's
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    expected, got = [], []
    for batch in CHECK_BATCHES:
        pixels = torch.randn(batch, *input_shape(model), generator=generator)
        with torch.no_grad():
            expected.append(model(pixels))
        got.append(torch.from_numpy(session.run([OUTPUT], {INPUT: pixels.numpy()})[0]))
    bound = tolerance(torch.cat(expected))
    if any(g.shape != e.shape for g, e in zip(got, expected)):
        return math.inf, bound
    return (torch.cat(got) - torch.cat(expected)).abs().max().item(), bound
