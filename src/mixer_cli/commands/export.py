"""`mixer export`: a model as safetensors with timm's parameter names, its spec and preprocessing in
the metadata, so `load_mixer` (and timm) load it without guessing and without pickles."""
from __future__ import annotations

from pathlib import Path

from mixer_cli.core.console import err_console
from mixer_cli.core.errors import UserError
from mixer_cli.models import load_mixer
from mixer_cli.models.checkpoints import export_safetensors


def export(checkpoint: Path, out: Path) -> None:
    if out.suffix != ".safetensors":
        raise UserError(f"--to {out}: the export is a .safetensors file, e.g. {out.with_suffix('.safetensors')}")
    if not out.parent.is_dir():
        raise UserError(f"--to {out}: folder {out.parent} does not exist")
    model = load_mixer(checkpoint)
    export_safetensors(model, out)
    err_console.print(f"wrote {out} ({sum(p.numel() for p in model.parameters()):,} parameters, "
                      f"{model.spec.img_size}px, {model.spec.num_classes} classes)", highlight=False)
