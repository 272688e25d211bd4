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
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

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
    try:
        with hydra_on_conf(root):
            cfg = hydra_compose(config_name=config_name, overrides=hydra_overrides(overrides))
    except MissingConfigException as e:
        raise UserError(_missing_option_message(str(e))) from None
    except HydraException as e:
        raise UserError(_override_message(str(e), root, config_name)) from None
    return validate(cfg) if resolve else cfg


def load_recipe(name: str, resolve: bool = False) -> DictConfig:
    """recipes/NAME.yaml composed with the primary config of its command."""
    if name not in recipe_names():
        raise UserError(f"unknown recipe {name!r}; recipes: {', '.join(recipe_names())}")
    return compose([f"recipe={name}"], config_name=config_name_of(name), resolve=resolve)


def validate(cfg: DictConfig) -> DictConfig:
    """Resolve interpolations and check that every required value is set and of the right kind."""
    check_table_choice(cfg, "target", "targets", "fine-tuning target")
    check_table_choice(cfg, "subset", "subsets", "subset")
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise UserError(f"bad config value: {str(e).splitlines()[0]}") from None
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        raise UserError(f"config value(s) {', '.join(sorted(missing))} must be set, e.g. {sorted(missing)[0]}=...")
    check_config(cfg)
    return cfg


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


def _missing_option_message(msg: str) -> str:
    m = re.search(r"Could not find '([^/']+)/([^']+)'", msg)
    options = re.findall(r"^\t(\S+)$", msg.split("Config search path")[0], flags=re.M)
    if m:
        group = "recipe" if m.group(1) == "recipes" else m.group(1)
        return f"unknown {group} {m.group(2)!r}; choose one of: {', '.join(options)}"
    return msg.splitlines()[0]


def _override_message(msg: str, root: Path, config_name: str) -> str:
    if msg.startswith("Ambiguous value for argument"):
        return "these overrides list several values (a sweep): add --multirun"
    m = re.search(r"Could not override '([^']+)'", msg)
    if not m:
        return f"bad override: {msg.splitlines()[0]}"
    key = m.group(1)
    parent, _, leaf = key.rpartition(".")
    with hydra_on_conf(root):
        base = hydra_compose(config_name=config_name, overrides=[f"hydra.searchpath=[file://{root}]"])
    node = OmegaConf.select(base, parent) if parent else base
    if isinstance(node, DictConfig):
        where = f"under '{parent}'" if parent else "at the top level"
        keys = ", ".join(k for k in node.keys() if not str(k).startswith("_"))  # not _target_, _partial_
        return f"unknown config key '{key}'; keys {where}: {keys} (or add one with +{key}=...)"
    return f"unknown config key '{key}'"
