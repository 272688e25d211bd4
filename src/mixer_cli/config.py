"""Compose and validate configs (Hydra), and create run directories.

`recipe=NAME` on the command line selects recipes/NAME.yaml, a Hydra config that picks the
groups of conf/ and sets the paper's hyper-parameters; `key=value` overrides follow Hydra's grammar.
"""
from __future__ import annotations

import datetime as _dt
import os
import re
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mixer_cli.errors import UserError


def package_root() -> Path:
    """The folder holding conf/ and recipes/: the package in a wheel, the repository otherwise."""
    here = Path(__file__).resolve().parent
    for root in (here, here.parents[1]):
        if (root / "conf").is_dir() and (root / "recipes").is_dir():
            return root
    raise RuntimeError(f"conf/ and recipes/ not found near {here}")


def recipe_names() -> list[str]:
    return sorted(p.stem for p in (package_root() / "recipes").glob("*.yaml"))


def _to_hydra(override: str) -> str:
    # The recipe group lives in recipes/ (beside conf/), so Hydra knows it as `recipes`.
    return re.sub(r"^recipe=", "recipes=", override)


def compose(overrides: list[str] = (), config_name: str = "config") -> DictConfig:
    """The resolved config for `config_name` (conf/<name>.yaml) with the user's overrides."""
    root = package_root()
    _check_recipe(overrides)
    hydra_overrides = [f"hydra.searchpath=[file://{root}]", *map(_to_hydra, overrides)]
    try:
        with initialize_config_dir(config_dir=str(root / "conf"), version_base=None):
            cfg = hydra_compose(config_name=config_name, overrides=hydra_overrides)
        OmegaConf.resolve(cfg)
    except MissingConfigException as e:
        raise UserError(_missing_option_message(str(e))) from None
    except HydraException as e:
        raise UserError(_override_message(str(e), root, config_name)) from None
    except OmegaConfBaseException as e:
        raise UserError(f"bad config value: {str(e).splitlines()[0]}") from None
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        raise UserError(f"config value(s) {', '.join(sorted(missing))} must be set, e.g. {sorted(missing)[0]}=...")
    return cfg


def _check_recipe(overrides) -> None:
    for o in overrides:
        if o.startswith("recipe="):
            name = o.split("=", 1)[1]
            if name not in recipe_names():
                raise UserError(f"unknown recipe {name!r}; recipes: {', '.join(recipe_names())} (see `mixer recipes`)")


def _missing_option_message(msg: str) -> str:
    m = re.search(r"Could not find '([^/']+)/([^']+)'", msg)
    options = re.findall(r"^\t(\S+)$", msg.split("Config search path")[0], flags=re.M)
    if m:
        group = "recipe" if m.group(1) == "recipes" else m.group(1)
        return f"unknown {group} {m.group(2)!r}; choose one of: {', '.join(options)}"
    return msg.splitlines()[0]


def _override_message(msg: str, root: Path, config_name: str) -> str:
    m = re.search(r"Could not override '([^']+)'", msg)
    if not m:
        return f"bad override: {msg.splitlines()[0]}"
    key = m.group(1)
    parent, _, leaf = key.rpartition(".")
    with initialize_config_dir(config_dir=str(root / "conf"), version_base=None):
        base = hydra_compose(config_name=config_name, overrides=[f"hydra.searchpath=[file://{root}]"])
    node = OmegaConf.select(base, parent) if parent else base
    if isinstance(node, DictConfig):
        where = f"under '{parent}'" if parent else "at the top level"
        return f"unknown config key '{key}'; keys {where}: {', '.join(node.keys())} (or add one with +{key}=...)"
    return f"unknown config key '{key}'"


def make_run_dir(cfg: DictConfig, command: str) -> Path:
    """A new, empty directory runs/<command>/<timestamp>-<name>[-k]; never reuses an existing one."""
    root = Path(cfg.run_root) / command
    root.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = f"{stamp}-{cfg.name}"
    for k in range(1000):
        path = root / (base if k == 0 else f"{base}-{k}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise UserError(f"could not create a new run directory under {root}")


def save_config(cfg: DictConfig, run_dir: Path) -> Path:
    path = run_dir / "config.yaml"
    write_atomic(path, OmegaConf.to_yaml(cfg, resolve=True))
    return path


def load_run_config(run_dir: Path) -> DictConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml); pass the folder of an earlier run")
    return OmegaConf.load(path)


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that readers see the old content or the new, never half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
