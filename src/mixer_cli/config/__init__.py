"""Configs: Hydra composition and validation, recipes, run directories.

`compose(overrides, config_name)` is the entry point for users' scripts as for the commands."""
from mixer_cli.config.compose import compose, load_recipe, validate
from mixer_cli.config.recipes import recipe_names
from mixer_cli.config.run_dirs import make_run_dir, resume_config, save_config

__all__ = ["compose", "load_recipe", "make_run_dir", "recipe_names", "resume_config", "save_config", "validate"]
