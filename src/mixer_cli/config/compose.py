"""Compose and validate configs (Hydra).

`recipe=NAME` on the command line selects recipes/NAME.yaml, a Hydra config that picks the
groups of conf/ and sets the paper's hyper-parameters; `key=value` overrides follow Hydra's grammar.
"""
from __future__ import annotations

import re
from contextlib import nullcontext
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from mixer_cli.config.recipes import config_name_of, recipe_command, recipe_names
from mixer_cli.config.schema import check_config
from mixer_cli.core.errors import UserError
from mixer_cli.core.files import package_root


def _to_hydra(override: str) -> str:
    # The recipe group lives in recipes/ (beside conf/), so Hydra knows it as `recipes`.
    return re.sub(r"^recipe=", "recipes=", override)


def hydra_overrides(overrides: list[str]) -> list[str]:
    """The user's overrides in Hydra's terms, with recipes/ on the search path."""
    return [f"hydra.searchpath=[file://{package_root()}]", *map(_to_hydra, overrides)]


def hydra_on_conf(root: Path):
    """Hydra looking at conf/: a new one, or the one a sweep's job (commands/sweep.py) already runs in."""
    if GlobalHydra.instance().is_initialized():
        return nullcontext()
    return initialize_config_dir(config_dir=str(root / "conf"), version_base=None)


def compose(overrides: list[str] = (), config_name: str = "config", resolve: bool = True) -> DictConfig:
    """The resolved, validated config for `config_name` (conf/<name>.yaml) with the user's overrides.
    resolve=False keeps interpolations and ??? values (for listing recipes without their data)."""
    root = package_root()
    _check_recipe(overrides, config_name)
    parsed = parse_overrides(overrides)
    check_no_sweep(parsed)
    try:
        with hydra_on_conf(root):
            cfg = hydra_compose(config_name=config_name, overrides=hydra_overrides(overrides))
    except MissingConfigException as e:
        raise UserError(_missing_option_message(e)) from None
    except ConfigCompositionException as e:
        raise UserError(_composition_message(e, parsed, root, config_name)) from None
    except HydraException as e:
        raise UserError(_bad_override_message(e)) from None
    return validate(cfg) if resolve else cfg


def parse_overrides(overrides: list[str]) -> list[Override]:
    """The user's overrides as Hydra reads them; a syntax error is one line."""
    try:
        return OverridesParser.create().parse_overrides(hydra_overrides(overrides))
    except OverrideParseException as e:
        raise UserError(_bad_override_message(e)) from None


def check_no_sweep(parsed: list[Override]) -> None:
    # Hydra would refuse a sweep outside --multirun too, in several lines that name its own flag.
    if any(o.is_sweep_override() for o in parsed):
        raise UserError("these overrides list several values (a sweep): add --multirun")


def load_recipe(name: str, resolve: bool = False) -> DictConfig:
    """recipes/NAME.yaml composed with the primary config of its command."""
    if name not in recipe_names():
        raise UserError(f"unknown recipe {name!r}; recipes: {', '.join(recipe_names())}")
    return compose([f"recipe={name}"], config_name=config_name_of(name), resolve=resolve)


def validate(cfg: DictConfig) -> DictConfig:
    """Resolve interpolations and check that every required value is set and of the right kind."""
    check_table_choice(cfg, "target", "targets", "fine-tuning target")
    check_table_choice(cfg, "subset", "subsets", "subset")
    fill_num_classes(cfg)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise UserError(f"bad config value: {str(e).splitlines()[0]}") from None
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        raise UserError(f"config value(s) {', '.join(sorted(missing))} must be set, e.g. {sorted(missing)[0]}=...")
    check_config(cfg)
    return cfg


def fill_num_classes(cfg: DictConfig) -> None:
    """data=hf with data.num_classes null: the number the label column's ClassLabel gives, before the
    model's head size interpolates it."""
    data = cfg.get("data")
    if data is not None and data.get("source") == "hf" and data.get("num_classes") is None:
        from mixer_cli.data.hf_source import hf_num_classes

        data.num_classes = hf_num_classes(data)


def check_table_choice(cfg: DictConfig, key: str, table: str, what: str) -> None:
    """A key that names a row of a table in the config (target -> targets) must name one."""
    if key in cfg and table in cfg and cfg[key] not in cfg[table]:
        raise UserError(f"unknown {what} {cfg[key]!r}; {table}: {', '.join(map(str, cfg[table]))}")


def _check_recipe(overrides, config_name: str) -> None:
    for o in overrides:
        if o.startswith("recipe="):
            name = o.split("=", 1)[1]
            if name not in recipe_names():
                raise UserError(f"unknown recipe {name!r}; recipes: {', '.join(recipe_names())} (see `mixer recipes`)")
            wanted, command = recipe_command(name)
            if wanted != config_name:
                fits = ", ".join(n for n in recipe_names() if recipe_command(n)[0] == config_name)
                raise UserError(f"{name} is a recipe for `{command} recipe={name}`; recipes of this command: {fits}")


def _bad_override_message(e: HydraException) -> str:
    return f"bad override: {str(e).splitlines()[0]}"


def _missing_option_message(e: MissingConfigException) -> str:
    group, _, option = (e.missing_cfg_file or "").rpartition("/")
    if not group:  # the primary config, not an option of a group
        return str(e).splitlines()[0]
    group = "recipe" if group == "recipes" else group
    return f"unknown {group} {option!r}; choose one of: {', '.join(e.options or ())}"


def _composition_message(e: ConfigCompositionException, parsed: list[Override], root: Path, config_name: str) -> str:
    if isinstance(e.__cause__, (ConfigAttributeError, ConfigKeyError)):  # OmegaConf's: the key is not in the config
        return _unknown_key_message(_overridden_key(parsed, e.__cause__.full_key), root, config_name)
    return _bad_override_message(e)


def _overridden_key(parsed: list[Override], missing: str) -> str:
    """The override Hydra could not apply, from the key OmegaConf found missing (its full_key, list
    items as [i]): the whole key (optim.lrr) or the first absent part of its path (foo of foo.bar).
    An earlier override under that path would have failed first or made it exist, so the first one
    under it is the culprit."""
    path = re.sub(r"\[(\d+)\]", r".\1", missing)
    under = (o.key_or_group for o in parsed if o.key_or_group == path or o.key_or_group.startswith(f"{path}."))
    return next(under, path)


def _unknown_key_message(key: str, root: Path, config_name: str) -> str:
    parent = key.rpartition(".")[0]
    with hydra_on_conf(root):
        base = hydra_compose(config_name=config_name, overrides=[f"hydra.searchpath=[file://{root}]"])
    node = OmegaConf.select(base, parent) if parent else base
    if isinstance(node, DictConfig):
        where = f"under '{parent}'" if parent else "at the top level"
        keys = ", ".join(k for k in node.keys() if not str(k).startswith("_"))  # not _target_, _partial_
        return f"unknown config key '{key}'; keys {where}: {keys} (or add one with +{key}=...)"
    return f"unknown config key '{key}'"
