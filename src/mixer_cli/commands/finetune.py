"""`mixer finetune`: fine-tune a pre-trained Mixer on a target (Sec. 3, Appendix C, following ViT).

The body comes from the checkpoint; the head is new and zero-initialised for the target's classes;
a higher resolution grows the token-mixing MLPs by Appendix C. Optimiser, schedule and clipping
come from the config (conf/finetune.yaml: momentum SGD, warmup + cosine, no weight decay, clip 1).
`recipe=ft_vtab` fine-tunes the same checkpoint on each VTAB-1k task (`finetune_vtab`).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mixer_cli.commands.sweep import best_point, multirun
from mixer_cli.config.compose import compose
from mixer_cli.config.run_dirs import Run, is_global_zero_process
from mixer_cli.core.console import console
from mixer_cli.core.errors import UserError
from mixer_cli.data.shards import resolve_shards
from mixer_cli.evaluate import vtab
from mixer_cli.models import grow_resolution, load_mixer
from mixer_cli.models.growth import growth_factor
from mixer_cli.models.mixer import Mixer, variant_of
from mixer_cli.train.fit import build, build_datasets, spec_changes
from mixer_cli.train.fit import resume as resume_run


def check_variant(model: Mixer, variant: str | None, path: Path) -> None:
    """A recipe for one row of Table 2 (e.g. ft_i21k_l16_448) names the Mixer it fine-tunes."""
    if variant is None:
        return
    spec = model.spec
    if variant_of(spec) != variant:
        raise UserError(
            f"this recipe fine-tunes a Mixer-{variant}, but {path} holds patch {spec.patch_size}, width "
            f"{spec.hidden_dim}, {spec.num_blocks} blocks; pass a {variant} checkpoint or override model.variant=null"
        )


def pretrained_model(cfg: DictConfig) -> Mixer:
    """The checkpoint's Mixer, checked against the recipe and the data."""
    if not cfg.checkpoint:
        raise UserError("fine-tuning needs a pre-trained model: --from CKPT (.ckpt, .npz, .pth or .safetensors)")
    path, m = Path(cfg.checkpoint), cfg.model
    model = load_mixer(path, **spec_changes(m))
    check_variant(model, m.variant, path)
    if model.spec.in_chans != cfg.data.channels:
        raise UserError(f"{path} takes {model.spec.in_chans}-channel images, the data has {cfg.data.channels}")
    return model


def for_target(model: Mixer, cfg: DictConfig) -> Mixer:
    """`model` (changed in place) with a new zero head for the target, grown to data.img_size."""
    model.reset_classifier(cfg.data.num_classes)
    if cfg.data.img_size != model.spec.img_size:
        model = grow_resolution(model, cfg.data.img_size)
    return model


def finetune_model(cfg: DictConfig) -> Mixer:
    """The checkpoint's Mixer with a new zero head for the target, grown to data.img_size."""
    return for_target(pretrained_model(cfg), cfg)


def finetune(cfg: DictConfig, progress: bool = True, run_dir: Path | None = None, model: Mixer | None = None) -> dict:
    job = build(cfg, finetune_model(cfg) if model is None else model, build_datasets(cfg))
    job.record["from"] = str(cfg.checkpoint)
    return job.run("finetune", run_dir, progress)


def sweep_point(cfg: DictConfig, run_dir: Path) -> dict:
    return finetune(cfg, progress=False, run_dir=run_dir)


def run_finetune(overrides: list[str], checkpoint: Path | None = None, res: int | None = None, sweep: bool = False,
                 resume_dir: Path | None = None) -> None:
    """`mixer finetune`: one fine-tune, the target's lr sweep (`--multirun`), the VTAB-1k suite
    (`recipe=ft_vtab`), or a stopped run or suite continued (`--resume`)."""
    if resume_dir is not None:
        if (resume_dir / SUITE_FILE).is_file():
            resume_vtab(resume_dir, overrides)
        else:
            resume_run(resume_dir, overrides, "finetune")
        return
    overrides = list(overrides)
    if checkpoint is not None:
        overrides.append(f"checkpoint='{checkpoint.resolve()}'")  # quoted: any path is one Hydra value
    if res is not None:
        overrides.append(f"data.img_size={res}")
    if is_vtab_suite(overrides):
        if sweep:
            raise UserError("the VTAB-1k suite picks each task's lr itself (targets.vtab.lr_grid, on the 200 "
                            "val examples); drop --multirun")
        finetune_vtab(overrides)
    elif sweep:
        if checkpoint is not None:
            load_mixer(checkpoint)  # a bad --from fails before the sweep starts
        multirun("finetune", "finetune", with_lr_grid(overrides), sweep_point)
    else:
        finetune(compose(overrides, config_name="finetune"))


def with_lr_grid(overrides: list[str]) -> list[str]:
    """The overrides of a fine-tuning sweep: the target's lr grid (conf/finetune.yaml) unless the
    user sweeps optim.lr themselves."""
    if any(o.startswith("optim.lr=") for o in overrides):
        return overrides
    cfg = compose([o for o in overrides if o.startswith(("recipe=", "target="))], "finetune", resolve=False)
    return [*overrides, "optim.lr=" + ",".join(map(str, cfg.targets[cfg.target].lr_grid))]


# ---- VTAB-1k: one fine-tune per task --------------------------------------------------------------

# The suite sets these from its task table; a user's value would be overwritten without a word.
SET_PER_TASK = ("data.task", "data.num_classes", "data.img_size")
SUITE_FILE = "suite.json"  # the overrides a suite started with, for --resume


def is_vtab_suite(overrides: list[str]) -> bool:
    """The data config (recipe ft_vtab: data/vtab.yaml) lists tasks: fine-tune a suite, not one run."""
    cfg = compose([o for o in overrides if o.startswith(("recipe=", "data="))], "finetune", resolve=False)
    return "tasks" in cfg.data


def vtab_configs(overrides: list[str]) -> dict[str, DictConfig]:
    """One checked config per task of the suite: the user's overrides, then the task's folder, class
    count and resolution (the BiT-HyperRule's choice of data.resolutions.small or .large)."""
    for o in overrides:
        if o.split("=", 1)[0].lstrip("+~") in SET_PER_TASK:
            raise UserError(f"the VTAB-1k suite sets {', '.join(SET_PER_TASK)} (--res) per task; drop {o} "
                            "(tasks: data.tasks=[...]; resolutions: data.resolutions.small=... .large=...)")
    names = OmegaConf.select(compose(overrides, "finetune", resolve=False), "data.tasks")
    return {t.name: compose([*overrides, f"data.task={t.name}", f"data.num_classes={t.num_classes}",
                             f"data.img_size=${{data.resolutions.{t.images}}}"], "finetune")
            for t in vtab.select_tasks(None if names is None else list(names))}


def check_vtab_data(cfgs: dict[str, DictConfig]) -> None:
    """Every task's shards exist: a suite should not stop at its 12th task for want of data."""
    missing = []
    for cfg in cfgs.values():
        for key in ("train_path", "eval_path"):
            try:
                resolve_shards(cfg.data[key], None, key)
            except UserError:
                missing.append(cfg.data[key])
    if missing:
        raise UserError(f"no VTAB-1k shards in {', '.join(missing)}; write each split with "
                        "`mixer data write --from FOLDER --to PATH` (the root is $MIXER_DATA/vtab/<task>/)")


def lr_grid(cfg: DictConfig) -> list[float]:
    """The lrs a task tries: the target's grid where it has several values (picked on the dev
    split), else optim.lr (which is the grid's one value unless overridden)."""
    grid = list(cfg.targets[cfg.target].lr_grid)
    if len(grid) == 1:
        return [cfg.optim.lr]
    if not cfg.data.dev_fraction:
        raise UserError("picking the lr from several needs a dev split: set data.dev_fraction (VTAB-1k: 0.2, "
                        "the 200 val examples of 1,000)")
    return grid


def with_values(cfg: DictConfig, values: dict) -> DictConfig:
    out = copy.deepcopy(cfg)
    for key, value in values.items():
        OmegaConf.update(out, key, value)
    return out


def say(text: str) -> None:
    if is_global_zero_process():
        console.print(text, highlight=False, soft_wrap=True)


def finetune_vtab(overrides: list[str], suite_dir: Path | None = None) -> dict:
    """VTAB-1k as the paper runs it: each task fine-tuned from the same checkpoint at its resolution;
    where the lr grid has several values, each trains on the 800 and is scored on the 200 held out
    (data.dev_fraction), the best is trained again on all 1,000; top-1 on the test split. Writes
    runs/finetune/<stamp>-<name>/ (or continues `suite_dir`): a run directory per task (and per lr
    tried), suite.json, vtab.json, vtab.csv and results.json; returns results.json's content."""
    cfgs = vtab_configs(overrides)
    check_vtab_data(cfgs)
    first = next(iter(cfgs.values()))
    pretrained = pretrained_model(first)
    grids = {name: lr_grid(cfg) for name, cfg in cfgs.items()}
    for cfg in cfgs.values():
        growth_factor(pretrained, cfg.data.img_size)  # every resolution is reachable before anything trains
    # A new suite, or (suite_dir, or under a requeued SLURM job) the one it started; suite.json is its record.
    with Run(first, "finetune", path=suite_dir, same_run=lambda d: started_with(d, quiet=True) == overrides,
             record=False) as suite:
        if not (suite.path / SUITE_FILE).is_file():
            suite.write(SUITE_FILE, json.dumps({"overrides": overrides}, indent=2))
        say(f"VTAB-1k: {len(cfgs)} task(s) from {first.checkpoint} -> {suite.path} "
            f"(if stopped: mixer finetune --resume {suite.path})")
        results = [vtab_task(cfg, pretrained, grids[name], suite.path, f"{i}/{len(cfgs)}")
                   for i, (name, cfg) in enumerate(cfgs.items(), 1)]
        scores = vtab.write_suite(suite.path, str(first.checkpoint), results) if suite.is_main else None
        seconds = sum(r.train_seconds for r in results)
        record = {"command": "finetune", "name": first.name, "from": str(first.checkpoint), "tasks": len(results),
                  "vtab1k": scores, "train_seconds": round(seconds, 1),
                  "device_hours": round(sum(r.device_hours for r in results), 4), "run_dir": str(suite.path)}
        suite.finish(record)
    return record


def vtab_task(cfg: DictConfig, pretrained: Mixer, lrs: list[float], suite_dir: Path, step: str) -> vtab.TaskResult:
    """One task: the lr pick (if any), then the run on all 1,000 examples that gives its score."""
    t = vtab.task(cfg.data.task)
    tried = f"picking the lr of {', '.join(f'{lr:g}' for lr in lrs)} on the dev split" if len(lrs) > 1 \
        else f"lr {lrs[0]:g}"
    say(f"[{step}] {t.name} ({t.group}, {t.num_classes} classes, {cfg.data.img_size}px): {tried}, "
        f"{cfg.trainer.steps:,} steps")
    runs = [train_vtab(with_values(cfg, {"optim.lr": lr}), pretrained, suite_dir / f"{t.name}-lr{lr:g}")
            for lr in lrs] if len(lrs) > 1 else []
    picks = [{"lr": lr, "dev_top1": r["dev_top1"], "run_dir": r["run_dir"]} for lr, r in zip(lrs, runs)]
    lr = lrs[best_point(runs)] if runs else lrs[0]
    final = train_vtab(with_values(cfg, {"optim.lr": lr, "data.dev_fraction": 0.0}), pretrained, suite_dir / t.name)
    runs.append(final)
    say(f"[{step}] {t.name}: test top-1 {100 * final['top1']:.2f}% at lr {lr:g} "
        f"({sum(r['train_seconds'] for r in runs):.0f} s) -> {final['run_dir']}")
    return vtab.TaskResult(t, cfg.data.img_size, lr, final["top1"], final["num_samples"], final["run_dir"], picks,
                           train_seconds=sum(r["train_seconds"] for r in runs),
                           device_hours=sum(r["device_hours"] for r in runs))


def train_vtab(cfg: DictConfig, pretrained: Mixer, run_dir: Path) -> dict:
    """A normal fine-tuning run in `run_dir`, from a copy of the pre-trained model. In a suite that
    is continued, a run it finished is read back and one it stopped in continues from its last.ckpt."""
    if (run_dir / "results.json").is_file():
        return json.loads((run_dir / "results.json").read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    return finetune(cfg, progress=False, run_dir=run_dir, model=for_target(copy.deepcopy(pretrained), cfg))


def started_with(suite_dir: Path, quiet: bool = False) -> list[str] | None:
    """The overrides the suite in `suite_dir` started with (its suite.json); a damaged record is an
    error, or None when `quiet`."""
    path = suite_dir / SUITE_FILE
    try:
        return list(json.loads(path.read_text())["overrides"])
    except (OSError, ValueError, KeyError, TypeError):
        if quiet:
            return None
        raise UserError(f"{path} is damaged: not the JSON object with the overrides the suite started with, "
                        "so the suite cannot be continued") from None


def resume_vtab(suite_dir: Path, overrides: list[str]) -> dict:
    """Continue a stopped suite with the overrides it started with (then `overrides`): the tasks it
    finished count as they are, the one it stopped in continues, the rest train."""
    return finetune_vtab([*started_with(suite_dir), *overrides], suite_dir)
