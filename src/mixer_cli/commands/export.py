"""`mixer export`: a model as safetensors with timm's parameter names, or as ONNX with a dynamic batch that
onnxruntime has run; either way its spec and preprocessing in the metadata, so the file alone says how
to use it."""
from __future__ import annotations

from pathlib import Path

from mixer_cli.core.console import err_console
from mixer_cli.core.errors import UserError
from mixer_cli.models import Mixer, load_mixer
from mixer_cli.models.checkpoints import export_safetensors
from mixer_cli.models.onnx import export_onnx

SUFFIXES = {"safetensors": ".safetensors", "onnx": ".onnx"}


def export(checkpoint: Path, out: Path, fmt: str | None = None) -> None:
    fmt = export_format(out, fmt)
    if not out.parent.is_dir():
        raise UserError(f"--to {out}: folder {out.parent} does not exist")
    model = load_mixer(checkpoint)
    if fmt == "onnx":
        detail = write_onnx(model, out)
    else:
        export_safetensors(model, out)
        detail = ""
    # soft_wrap: one line however narrow the terminal, as scripts that read it expect
    err_console.print(f"wrote {out} ({sum(p.numel() for p in model.parameters()):,} parameters, "
                      f"{model.spec.img_size}px, {model.spec.num_classes} classes{detail})", highlight=False,
                      soft_wrap=True)


def export_format(out: Path, fmt: str | None) -> str:
    """The format --format names, else the one --to's suffix implies; when both are given they must agree."""
    if fmt is not None and fmt not in SUFFIXES:
        raise UserError(f"--format {fmt}: choose {' or '.join(SUFFIXES)}")
    implied = next((f for f, suffix in SUFFIXES.items() if out.suffix == suffix), None)
    if implied is None:
        wanted = [fmt] if fmt else list(SUFFIXES)
        raise UserError(f"--to {out}: the export is a {' or '.join(SUFFIXES[f] for f in wanted)} file, "
                        f"e.g. {' or '.join(str(out.with_suffix(SUFFIXES[f])) for f in wanted)}")
    if fmt is not None and fmt != implied:
        raise UserError(f"--to {out}: --format {fmt} writes a {SUFFIXES[fmt]} file, "
                        f"e.g. {out.with_suffix(SUFFIXES[fmt])}")
    return implied


def write_onnx(model: Mixer, out: Path) -> str:
    """Export and check; what the success line adds: the measured difference from PyTorch's logits, and its
    bound (LOGIT_TOLERANCE x (1 + max |logit|))."""
    difference, bound = export_onnx(model, out)
    return f", any batch size; onnxruntime's logits within {difference:.1e} of PyTorch's, bound {bound:.1e}"
