"""The typed schema of every config: which values each key takes, checked when a config is composed.

`mixer_cli.config.validate` calls `check_config` on every composed config (each command's, each
point of a sweep, a resumed run's saved config with its overrides), after interpolations are
resolved and before anything is built or written. A bad value raises UserError with one line
naming the key, what it must be and the value given:

    optim.lr must be a number > 0, got -0.1

Why a table of key -> rule and not Hydra structured configs: the groups carry `_target_` keys
whose siblings differ by option (AdamW's `betas`, SGD's `momentum`), recipes add keys (`paper:`,
`targets:`), and the primary configs share groups with different needs (eval leaves the
preprocessing null for the checkpoint to fill). Dataclasses would need one class per group option
and could still not say "> 0" or "one per channel"; OmegaConf's type errors are several lines
that name neither the range nor the choices. One table reads as the documentation of every key;
a key that a config does not have is not checked, so the table serves every command.

Names whose list lives in a module that imports the config machinery (the benchmark's models,
modes and precisions, the shuffle experiment's models and pipelines) are checked by those
commands first thing; here they are checked for their type only.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, get_args

from omegaconf import DictConfig, OmegaConf

from mixer_cli.core.compiling import COMPILE_MODES
from mixer_cli.core.errors import UserError
from mixer_cli.core.files import package_root
from mixer_cli.data import SOURCES
from mixer_cli.data.inception_crop import CROP_SAMPLERS
from mixer_cli.data.transforms import EVAL_CROP_MODES
from mixer_cli.models.mixer import TOKEN_MIXING, VARIANTS


@dataclass(frozen=True)
class Rule:
    what: str  # completes "KEY must be ..."
    ok: Callable[[Any], bool]

    def __or__(self, other: Rule) -> Rule:
        return Rule(f"{self.what} or {other.what}", lambda v: self.ok(v) or other.ok(v))


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def above(low: float) -> Rule:
    return Rule(f"a number > {low}", lambda v: is_number(v) and v > low)


def at_least(low: float) -> Rule:
    return Rule(f"a number >= {low}", lambda v: is_number(v) and v >= low)


def whole(low: int, high: int | None = None) -> Rule:
    if high is None:
        return Rule(f"a whole number >= {low}", lambda v: is_whole(v) and v >= low)
    return Rule(f"a whole number in [{low}, {high}]", lambda v: is_whole(v) and low <= v <= high)


def interval(bounds: str) -> Rule:
    """A number in "[0, 1)", "(0, 1]" or "[0, 1]"."""
    low, high = (float(b) for b in bounds[1:-1].split(","))
    closed_low, closed_high = bounds[0] == "[", bounds[-1] == "]"
    return Rule(f"a number in {bounds}", lambda v: is_number(v) and (low <= v if closed_low else low < v)
                and (v <= high if closed_high else v < high))


def one_of(*choices) -> Rule:
    # by type too: YAML's true is not the whole number 1, nor is 32 the string "32"
    return Rule(f"one of {', '.join(dict.fromkeys(map(str, choices)))}",
                lambda v: any(v == c and type(v) is type(c) for c in choices))


def list_of(item: Rule, what: str, length: int | None = None) -> Rule:
    return Rule(what, lambda v: isinstance(v, list) and len(v) >= 1 and (length is None or len(v) == length)
                and all(item.ok(x) for x in v))


NULL = Rule("null", lambda v: v is None)
NUMBER = Rule("a number", is_number)
FLAG = Rule("true or false", lambda v: isinstance(v, bool))
FLAG_OR_COMPILE_MODE = Rule(f"true, false or a torch.compile mode ({', '.join(COMPILE_MODES)})",
                            lambda v: isinstance(v, bool) or v in COMPILE_MODES)
COMPILE_OR_AUTO = Rule(f"true, false, auto or a torch.compile mode ({', '.join(COMPILE_MODES)})",
                       lambda v: FLAG_OR_COMPILE_MODE.ok(v) or v == "auto")
TEXT = Rule("a non-empty string", lambda v: isinstance(v, str) and v.strip() != "")
RUN_NAME = Rule("a non-empty name without '/'", lambda v: isinstance(v, str) and v.strip() != "" and "/" not in v)
SEED = whole(0, 2**32 - 1)  # numpy's (and so Lightning's seed_everything's) bounds
PROBABILITY = interval("[0, 1)")  # p = 1 would drop everything
DEVICE = Rule("auto, cpu, cuda or cuda:N",
              lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None)
SHOTS = whole(1) | list_of(whole(1), "a non-empty list of whole numbers >= 1")
L2 = Rule("a number > 0 or 'select'", lambda v: above(0).ok(v) or v == "select")
DEFAULT_L2 = 2.0**10  # big_vision's l2_reg, the paper's setting: the few-shot probe's (evaluate/fewshot.py)

# timm's interpolation names (timm.data.transforms.str_to_interp_mode), which every transform reads.
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "box", "hamming", "lanczos")
DECAYS = ("linear", "cosine")  # train/optim.py lr_factor


def lightning_precisions() -> tuple:
    """Every value Trainer(precision=...) accepts: the literals of the type Lightning annotates it with."""
    from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT

    values = (v for literal in get_args(_PRECISION_INPUT) for v in get_args(literal))
    return tuple(sorted(values, key=lambda v: isinstance(v, int)))  # the names first, then 64, 32, 16


def lightning_accelerators() -> tuple:
    from lightning.pytorch.accelerators import AcceleratorRegistry

    return ("auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators()))


def lightning_strategies() -> tuple:
    from lightning.pytorch.strategies import StrategyRegistry

    return ("auto", *StrategyRegistry.available_strategies())


def device_ids_text(v: str) -> bool:
    """Lightning's device string: a count ("2"), all ("-1"), or ids ("0,1", "3,")."""
    parts = [p.strip() for p in v.split(",")]
    if len(parts) == 1:
        return parts[0] == "-1" or (parts[0].isdigit() and int(parts[0]) >= 1)
    ids = [p for p in parts if p]
    return bool(ids) and all(p.isdigit() for p in ids) and len(set(ids)) == len(ids)


def lightning_devices(v) -> bool:
    """What Trainer(devices=...) takes: "auto", a count (-1: all), a list of ids, or a string of them."""
    if isinstance(v, str):
        return v == "auto" or device_ids_text(v)
    if isinstance(v, list):
        return len(v) >= 1 and all(is_whole(d) and d >= 0 for d in v) and len(set(v)) == len(v)
    return is_whole(v) and (v >= 1 or v == -1)


def increasing_pair(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(whole(1).ok(b) for b in v) and v[0] < v[1]


DEVICES = Rule("auto, a count >= 1 (-1: all), a list of device ids or a string of ids such as '0,1'",
               lightning_devices)
TARGET_CONFIG = Rule("a _target_ config", lambda v: isinstance(v, dict) and "_target_" in v)


@functools.cache
def group_options(group: str) -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in (package_root() / "conf" / group).glob("*.yaml")))


@functools.cache
def group_targets(group: str) -> Rule:
    """The `_target_`s of a group's files: a new optimiser, loss or schedule is a new conf/ file."""
    files = sorted((package_root() / "conf" / group).glob("*.yaml"))
    rule = one_of(*dict.fromkeys(t for t in (OmegaConf.load(f).get("_target_") for f in files) if t))
    return Rule(f"{rule.what} (the _target_ of a conf/{group} file)", rule.ok)


# Every key any config has, with the values it takes; a key a config lacks is skipped, `*` stands
# for each key of a table. Keys that others interpolate come first (data before model.img_size,
# targets before trainer.steps), so an error names the key the user set.
SCHEMA: dict[str, Rule | Callable[[], Rule]] = {
    # every command
    "name": RUN_NAME | NULL,
    "run_root": TEXT,
    "seed": SEED,
    "checkpoint": TEXT | NULL,
    # data: conf/data/*.yaml
    "data.source": one_of(*SOURCES),
    "data.num_classes": whole(2),
    "data.img_size": whole(1) | NULL,
    "data.channels": whole(1) | NULL,
    "data.mean": list_of(NUMBER, "a list of numbers") | NULL,
    "data.std": list_of(above(0), "a list of numbers > 0") | NULL,
    "data.interpolation": one_of(*INTERPOLATIONS) | NULL,
    "data.global_batch": whole(1),
    "data.num_workers": whole(0),
    "data.root": TEXT,
    "data.task": TEXT,
    "data.tasks": list_of(TEXT, "a non-empty list of VTAB-1k task names") | NULL,  # evaluate/vtab.py checks the names
    "data.resolutions.small": whole(1),
    "data.resolutions.large": whole(1),
    "data.train_path": TEXT | NULL,
    "data.eval_path": TEXT | NULL,
    "data.train_size": whole(1) | NULL,
    "data.eval_size": whole(1) | NULL,
    "data.shuffle_buffer": whole(1),
    "data.real_labels": TEXT | NULL,
    "data.dev_fraction": interval("[0, 1)"),
    "data.train_fraction": interval("(0, 1]"),
    "data.subset_seed": SEED,
    "data.decode": one_of("pil", "uint8", "gpu"),
    "data.image_key": TEXT,
    "data.label_key": TEXT,
    # aug: conf/aug/*.yaml
    "aug.inception_crop": FLAG,
    "aug.crop_area_min": interval("(0, 1]"),
    "aug.crop_sampler": one_of(*CROP_SAMPLERS),
    "aug.crop_antialias": FLAG,
    "aug.hflip": FLAG,
    "aug.randaug_layers": whole(0),
    "aug.randaug_magnitude": at_least(0),
    "aug.mixup": at_least(0),  # Beta(p, p)'s p, not a probability; 0 = off
    "aug.pad_crop": whole(0),
    "aug.eval_crop_mode": one_of(*EVAL_CROP_MODES) | NULL,
    "aug.eval_crop_pct": interval("(0, 1]") | NULL,
    "aug.eval_interpolation": one_of(*INTERPOLATIONS) | NULL,  # null: data.interpolation
    # finetune's target table; the data-set size study's subsets
    "targets.*.steps": whole(1),
    "targets.*.warmup_steps": whole(0),
    "targets.*.lr_grid": list_of(above(0), "a non-empty list of numbers > 0"),
    "targets.*.dev_fraction": interval("[0, 1)"),
    "subsets.*.fraction": interval("(0, 1]"),
    "subsets.*.epochs": whole(1),
    # model: conf/model/mixer.yaml (pretrain, shuffle), or the fine-tune's spec fields
    "model._target_": lambda: group_targets("model"),
    "model.variant": one_of(*VARIANTS) | NULL,
    "model.img_size": whole(1),
    "model.in_chans": whole(1),
    "model.num_classes": whole(2),
    "model.patch_size": whole(1) | NULL,  # null: the variant's
    "model.hidden_dim": whole(1) | NULL,
    "model.num_blocks": whole(1) | NULL,
    "model.tokens_mlp_dim": whole(1) | NULL,
    "model.channels_mlp_dim": whole(1) | NULL,
    "model.gelu": one_of("tanh", "exact") | NULL,
    "model.dropout": PROBABILITY,
    "model.drop_path": PROBABILITY,
    "model.drop_path_rescale": FLAG,
    "model.token_mixing": one_of(*TOKEN_MIXING) | NULL,
    "resnet._target_": lambda: group_targets("resnet"),
    # loss, optim, sched
    "loss._target_": lambda: group_targets("loss"),
    "optim._target_": lambda: group_targets("optim"),
    "optim.lr": above(0),
    "optim.betas": list_of(interval("[0, 1)"), "two numbers in [0, 1)", length=2),
    "optim.momentum": interval("[0, 1)"),
    "optim.weight_decay": at_least(0),
    "sched._target_": lambda: group_targets("sched"),
    "sched.warmup_steps": whole(0),
    "sched.decay": one_of(*DECAYS),
    # trainer: conf/trainer/*.yaml, in Lightning's argument names
    "trainer.accelerator": lambda: one_of(*lightning_accelerators()),
    "trainer.devices": DEVICES,
    "trainer.num_nodes": whole(1),
    "trainer.strategy": lambda: one_of(*lightning_strategies()) | TARGET_CONFIG,
    "trainer.precision": lambda: one_of("auto", *lightning_precisions()),
    "trainer.device_batch": whole(1) | NULL,
    "trainer.epochs": whole(1),
    "trainer.steps": whole(1) | NULL,
    "trainer.grad_clip": above(0) | NULL,
    "trainer.grad_checkpointing": FLAG,
    "trainer.compile": COMPILE_OR_AUTO,
    "trainer.val_every_epochs": whole(1),
    "trainer.log_every_steps": whole(1),
    "trainer.progress_every_steps": whole(1),
    "trainer.progress_every_seconds": above(0),
    "trainer.checkpoint_every_steps": whole(1) | NULL,
    "trainer.checkpoint_every_minutes": above(0) | NULL,
    # the few-shot probe: during pre-training and shuffle (every_n_steps), and `mixer fewshot`
    "fewshot.every_n_steps": whole(0),
    "fewshot.shots": SHOTS,
    "fewshot.l2": L2,
    "fewshot.seed": SEED,
    "fewshot.seeds": whole(1),
    "fewshot.held_out": whole(1),
    "fewshot.batch_size": whole(1),
    "fewshot.num_workers": whole(0),
    "fewshot.device": DEVICE,
    "fewshot.data": lambda: one_of(*group_options("data")) | NULL,
    # shuffle-experiment (run_experiment checks the names)
    "shuffle.models": list_of(TEXT, "a non-empty list of model names"),
    "shuffle.pipelines": list_of(TEXT, "a non-empty list of pipeline names"),
    "shuffle.seed": SEED,
    "shuffle.tolerance": interval("[0, 1)"),
    "shuffle.progress": FLAG,
    # eval
    "eval.batch_size": whole(1),
    "eval.class_map": TEXT | NULL,
    "eval.accelerator": lambda: one_of(*lightning_accelerators()),
    "eval.devices": DEVICES,
    "eval.num_nodes": whole(1),
    "eval.precision": lambda: one_of(*lightning_precisions()),
    # predict
    "predict.topk": whole(1),
    "predict.class_map": TEXT | NULL,
    "predict.batch_size": whole(1),
    "predict.num_workers": whole(0),
    "predict.device": DEVICE,
    "predict.show": whole(0),
    # benchmark (plan_from_config checks the model names and modes)
    "models": list_of(TEXT, "a non-empty list of model names"),
    "res": list_of(whole(1), "a non-empty list of whole numbers >= 1"),
    "modes": list_of(TEXT, "a non-empty list of modes"),
    "precision": TEXT,
    "compile": FLAG_OR_COMPILE_MODE,
    "grad_checkpointing": FLAG,
    "device": DEVICE,
    "threads": whole(1) | NULL,
    "batch_sizes": list_of(whole(1), "a non-empty list of whole numbers >= 1") | NULL,
    "warmup": whole(0),
    "iters": whole(1) | NULL,
    "repeats": whole(1),
    "clock": TEXT,
    "memory": FLAG,
    "memory_batches": Rule("two increasing batch sizes, e.g. [32, 64]", increasing_pair),
}

# null means "the checkpoint's" where a checkpoint supplies the value: the run name and the
# preprocessing of the configs that only read a model (eval, fewshot, predict: they have no trainer), the
# GELU of a fine-tune (its model has no _target_). A config that builds these itself must set them.
FROM_CHECKPOINT_UNLESS_TRAINING = ("name", "data.img_size", "data.channels", "data.mean", "data.std",
                                   "data.interpolation", "aug.eval_crop_mode", "aug.eval_crop_pct")


def set_here(cfg: DictConfig) -> set[str]:
    """The nullable keys that this config must set, no checkpoint filling them."""
    return {*(FROM_CHECKPOINT_UNLESS_TRAINING if "trainer" in cfg else ()),
            *(("model.gelu",) if OmegaConf.select(cfg, "model._target_") else ())}


def not_null(rule: Rule) -> Rule:
    return Rule(rule.what.removesuffix(" or null"), lambda v: v is not None and rule.ok(v))


_ABSENT = object()


def plain(value):
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def shown(value) -> str:
    """A value as the user writes it on the command line (null, true, 'text', [1, 2])."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return repr(value)


def values_at(cfg: DictConfig, pattern: str) -> Iterator[tuple[str, Any]]:
    """(key, value) of every key the pattern names in cfg; `*` stands for each key of a table."""
    head, star, rest = pattern.partition(".*.")
    if not star:
        value = OmegaConf.select(cfg, pattern, default=_ABSENT)
        if value is not _ABSENT:
            yield pattern, plain(value)
        return
    table = OmegaConf.select(cfg, head)
    if isinstance(table, DictConfig):
        for name in table:
            yield from values_at(cfg, f"{head}.{name}.{rest}")


def bad_value(key: str, what: str, value) -> UserError:
    return UserError(f"{key} must be {what}, got {shown(value)}")


def check_values(cfg: DictConfig) -> None:
    required = set_here(cfg)
    for pattern, rule in SCHEMA.items():
        rule = rule if isinstance(rule, Rule) else rule()
        for key, value in values_at(cfg, pattern):
            checked = not_null(rule) if key in required else rule
            if not checked.ok(value):
                raise bad_value(key, checked.what, value)


def check_per_channel(cfg: DictConfig) -> None:
    """data.mean and data.std hold one value per image channel."""
    channels = OmegaConf.select(cfg, "data.channels")
    for key in ("data.mean", "data.std"):
        values = plain(OmegaConf.select(cfg, key))
        if channels is not None and values is not None and len(values) != channels:
            numbers = "one number" if channels == 1 else f"{channels} numbers, one per channel"
            raise bad_value(key, f"a list of {numbers} (data.channels={channels})", values)


def patch_size(model: DictConfig) -> tuple[int, str] | None:
    """The model's patch size where the config knows it, and where it comes from."""
    if model.get("patch_size"):
        return model.patch_size, f"model.patch_size={model.patch_size}"
    if model.get("variant"):
        p = VARIANTS[model.variant]["patch_size"]
        return p, f"the {model.variant} patch size {p}"
    return None


def check_patches_tile_the_image(cfg: DictConfig) -> None:
    model, size = cfg.get("model"), OmegaConf.select(cfg, "data.img_size")
    known = patch_size(model) if isinstance(model, DictConfig) else None
    if known is None or size is None or size % known[0] == 0:
        return
    p, source = known
    lower = size - size % p
    suggestions = f"{lower} or {lower + p}" if lower else str(p)
    raise bad_value("data.img_size", f"a multiple of {source} (e.g. {suggestions})", size)


def check_probe_l2_while_training(cfg: DictConfig) -> None:
    """The probe during training (fewshot.every_n_steps) draws its curves at one given l2; choosing
    l2 on held-out examples is `mixer fewshot`'s."""
    if OmegaConf.select(cfg, "fewshot.every_n_steps") and OmegaConf.select(cfg, "fewshot.l2") == "select":
        raise UserError(f"fewshot.l2=select is for `mixer fewshot`; during training give a number "
                        f"(default {DEFAULT_L2:g})")


def check_shuffle_probe_runs(cfg: DictConfig) -> None:
    """The shuffle experiment's curves are the probe's evaluations during training."""
    if "shuffle" in cfg and OmegaConf.select(cfg, "fewshot.every_n_steps") == 0:
        raise bad_value("fewshot.every_n_steps", "at least 1 (the curves)", 0)


def check_config(cfg: DictConfig) -> None:
    """Raise UserError (one line: key, what it must be, value given) at the first bad value of a
    resolved config."""
    check_values(cfg)
    check_per_channel(cfg)
    check_patches_tile_the_image(cfg)
    check_probe_l2_while_training(cfg)
    check_shuffle_probe_runs(cfg)
