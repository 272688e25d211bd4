"""`mixer recipes`: every recipe beside the numbers the paper reports for it."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table

from mixer_cli.config import compose, package_root, recipe_names
from mixer_cli.errors import UserError

# A recipe belongs to the command whose primary config it completes.
CONFIG_OF_PREFIX = {"ft_": "finetune", "shuffle_": "shuffle"}


def config_name_of(recipe: str) -> str:
    return next((c for p, c in CONFIG_OF_PREFIX.items() if recipe.startswith(p)), "config")


def load_recipe(name: str, resolve: bool = False) -> DictConfig:
    if name not in recipe_names():
        raise UserError(f"unknown recipe {name!r}; recipes: {', '.join(recipe_names())}")
    return compose([f"recipe={name}"], config_name=config_name_of(name), resolve=resolve)


def _get(cfg: DictConfig, key: str):
    try:
        return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
    except Exception:  # an interpolation of a value that must still be set (e.g. data.task)
        return None


def recipe_choice(name: str, group: str) -> str | None:
    """The option of `group` that recipes/NAME.yaml picks in its defaults list (`override /data: X`)."""
    defaults = OmegaConf.load(package_root() / "recipes" / f"{name}.yaml").get("defaults", [])
    return next((d[k] for d in defaults if isinstance(d, DictConfig) for k in d if k.endswith(f"/{group}")), None)


def recipe_row(name: str, cfg: DictConfig) -> list[str]:
    """name, model, data, resolution, length, paper top-1, paper throughput."""
    variant = _get(cfg, "model.variant")
    model = variant or ("--from" if name.startswith("ft_") else "custom")
    data_name = recipe_choice(name, "data") or _get(cfg, "data.source") or "-"
    steps, epochs = _get(cfg, "trainer.steps"), _get(cfg, "trainer.epochs")
    length = f"{steps:,} steps" if steps else f"{epochs} epochs"
    paper = cfg.get("paper") or {}
    top1 = f"{paper['imagenet_top1']:.2f}" if paper.get("imagenet_top1") is not None else "-"
    if paper.get("table"):
        top1 += f" (T{paper['table']})"
    throughput = f"{paper['throughput']:,}" if paper.get("throughput") else "-"
    return [name, model, data_name, str(_get(cfg, "data.img_size")), length, top1, throughput]


def print_recipes(console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="Recipes (paper: ImageNet top-1 %, img/s/core on TPU-v3)", title_style="bold")
    for col, justify in (("name", "left"), ("model", "left"), ("data", "left"), ("resolution", "right"),
                         ("length", "right"), ("paper top-1", "right"), ("paper img/s", "right")):
        table.add_column(col, justify=justify, style="cyan" if col == "name" else None, no_wrap=col == "name")
    for name in recipe_names():
        table.add_row(*recipe_row(name, load_recipe(name)))
    console.print(table)
    console.print("Show one resolved: [bold]mixer recipes NAME[/] · run: [bold]mixer pretrain recipe=NAME[/] or "
                  "[bold]mixer finetune --from CKPT recipe=ft_NAME[/]")


def print_recipe(name: str, console: Console | None = None) -> None:
    """The recipe's whole config, resolved where it can be (data paths that must be set stay ???)."""
    console = console or Console()
    try:
        cfg, note = load_recipe(name, resolve=True), None
    except UserError as e:
        cfg, note = load_recipe(name), str(e)
    console.print(Syntax(OmegaConf.to_yaml(cfg), "yaml", theme="ansi_dark", background_color="default"))
    if note:
        console.print(f"[yellow]to run it:[/] {note}")
