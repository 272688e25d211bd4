"""Recipes: recipes/NAME.yaml, one per experiment of the paper; each belongs to one command."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from mixer_cli.core.files import package_root

# A recipe's name says which command runs it: ft_* fine-tune a checkpoint, shuffle_* are Figure 4
# experiments, the others pre-train from scratch.
RECIPE_COMMANDS = {
    "ft_": ("finetune", "mixer finetune --from CKPT"),
    "shuffle_": ("shuffle", "mixer shuffle-experiment"),
}
PRETRAIN = ("config", "mixer pretrain")


def recipe_command(name: str) -> tuple[str, str]:
    """(primary config, command line) of the command that runs recipe `name`."""
    return next((cmd for prefix, cmd in RECIPE_COMMANDS.items() if name.startswith(prefix)), PRETRAIN)


def config_name_of(recipe: str) -> str:
    """The primary config (conf/<name>.yaml) that recipe `recipe` completes."""
    return recipe_command(recipe)[0]


def recipe_names() -> list[str]:
    return sorted(p.stem for p in (package_root() / "recipes").glob("*.yaml"))


def recipe_choice(name: str, group: str) -> str | None:
    """The option of `group` that recipes/NAME.yaml picks in its defaults list (`override /data: X`)."""
    defaults = OmegaConf.load(package_root() / "recipes" / f"{name}.yaml").get("defaults", [])
    return next((d[k] for d in defaults if isinstance(d, DictConfig) for k in d if k.endswith(f"/{group}")), None)
