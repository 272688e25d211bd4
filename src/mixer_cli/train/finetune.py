"""`mixer finetune`: fine-tune a pre-trained Mixer on a target (Sec. 3, Appendix C, following ViT).

The body comes from the checkpoint; the head is new and zero-initialised for the target's classes;
a higher resolution grows the token-mixing MLPs by Appendix C. Optimiser, schedule and clipping
come from the config (conf/finetune.yaml: momentum SGD, warmup + cosine, no weight decay, clip 1).
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from mixer_cli.errors import UserError
from mixer_cli.models import grow_resolution, load_mixer
from mixer_cli.models.mixer import VARIANTS, Mixer
from mixer_cli.train.fit import fit, probes


def check_variant(model: Mixer, variant: str | None, path: Path) -> None:
    """A recipe for one row of Table 2 (e.g. ft_i21k_l16_448) names the Mixer it fine-tunes."""
    if variant is None:
        return
    spec = model.spec
    if {k: getattr(spec, k) for k in VARIANTS[variant]} != VARIANTS[variant]:
        raise UserError(
            f"this recipe fine-tunes a Mixer-{variant}, but {path} holds patch {spec.patch_size}, width "
            f"{spec.hidden_dim}, {spec.num_blocks} blocks; pass a {variant} checkpoint or override model.variant=null"
        )


def finetune_model(cfg: DictConfig) -> Mixer:
    """The checkpoint's Mixer with a new zero head for the target, grown to data.img_size."""
    if not cfg.checkpoint:
        raise UserError("fine-tuning needs a pre-trained model: --from CKPT (.ckpt, .npz, .pth or .safetensors)")
    path, m = Path(cfg.checkpoint), cfg.model
    model = load_mixer(path, dropout=m.dropout, drop_path=m.drop_path,
                       drop_path_rescale=m.get("drop_path_rescale", False),
                       **({"gelu": m.gelu} if m.gelu else {}))
    check_variant(model, m.variant, path)
    if model.spec.in_chans != cfg.data.channels:
        raise UserError(f"{path} takes {model.spec.in_chans}-channel images, the data has {cfg.data.channels}")
    model.reset_classifier(cfg.data.num_classes)
    if cfg.data.img_size != model.spec.img_size:
        model = grow_resolution(model, cfg.data.img_size)
    return model


def finetune(cfg: DictConfig, progress: bool = True, run_dir: Path | None = None) -> dict:
    return fit(cfg, finetune_model(cfg), "finetune", run_dir=run_dir, progress=progress,
               extra_results={"from": str(cfg.checkpoint)}, callbacks=probes(cfg))


def with_lr_grid(overrides: list[str]) -> list[str]:
    """The overrides of a fine-tuning sweep: the target's lr grid (conf/finetune.yaml) unless the
    user sweeps optim.lr themselves."""
    if any(o.startswith("optim.lr=") for o in overrides):
        return overrides
    from mixer_cli.config import compose

    cfg = compose([o for o in overrides if o.startswith(("recipe=", "target="))], "finetune", resolve=False)
    return [*overrides, "optim.lr=" + ",".join(map(str, cfg.targets[cfg.target].lr_grid))]
