"""`mixer recipes`: every recipe beside the numbers the paper reports for it, and what pre-training
it would cost here: training FLOPs counted from the model, and device-hours from measured throughput."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table

from mixer_cli.config.compose import load_recipe
from mixer_cli.config.recipes import config_name_of, recipe_choice, recipe_names
from mixer_cli.core.errors import UserError
from mixer_cli.data import demo_arrays
from mixer_cli.models import VARIANTS, MixerSpec, variant_key
from mixer_cli.reporting.paper import benchmark_results


def _get(cfg: DictConfig, key: str):
    try:
        return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
    except Exception:  # an interpolation of a value that must still be set (e.g. data.task)
        return None


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


def print_recipes(console: Console | None = None, throughput: float | None = None, runs: Path = Path("runs")) -> None:
    """The recipes table, then the pre-training plan (print_plan)."""
    console = console or Console()
    recipes = {name: load_recipe(name) for name in recipe_names()}
    table = Table(title="Recipes (paper: ImageNet top-1 %, img/s/core on TPU-v3)", title_style="bold")
    for col, justify in (("name", "left"), ("model", "left"), ("data", "left"), ("resolution", "right"),
                         ("length", "right"), ("paper top-1", "right"), ("paper img/s", "right")):
        table.add_column(col, justify=justify, style="cyan" if col == "name" else None, no_wrap=col == "name")
    for name, cfg in recipes.items():
        table.add_row(*recipe_row(name, cfg))
    console.print(table)
    console.print("Show one resolved: [bold]mixer recipes NAME[/] · run: [bold]mixer pretrain recipe=NAME[/] or "
                  "[bold]mixer finetune --from CKPT recipe=ft_NAME[/]")
    print_plan(recipes, console, throughput, runs)


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


# ---- planning: what a pre-training recipe costs before it runs -----------------------------------

# Training-set sizes of the data sets whose configs leave the size to the user's shards (index.json).
NOMINAL_TRAIN_SIZES = {"imagenet21k": 14_197_122, "jft300m": 303_000_000}  # JFT-300M: 303M images (ViT paper)
SIZE_KEYS = ("patch_size", "hidden_dim", "num_blocks", "tokens_mlp_dim", "channels_mlp_dim")


def forward_flops(spec) -> int:
    """Matmul FLOPs of one image's forward pass (a multiply-add counts 2), from the spec of Eq. (1):
    stem: S patches x (P^2 C_in -> C); per block, token mixing C x (S -> D_S -> S) and channel
    mixing S x (C -> D_C -> C); head C -> classes. LayerNorm, GELU, biases and pooling are O(S C)
    element-wise work and are left out, as FLOP counters do."""
    tokens, width = spec.num_tokens, spec.hidden_dim
    stem = 2 * tokens * spec.patch_size**2 * spec.in_chans * width
    token_mixing = 2 * 2 * width * tokens * spec.tokens_mlp_dim
    channel_mixing = 2 * 2 * tokens * width * spec.channels_mlp_dim
    return stem + spec.num_blocks * (token_mixing + channel_mixing) + 2 * width * spec.num_classes


def spec_of(cfg: DictConfig):
    """The MixerSpec a pre-training config builds (a Table 1 variant, or custom sizes over it)."""
    m = cfg.model
    sizes = {**VARIANTS.get(m.get("variant"), {}), **{k: m[k] for k in SIZE_KEYS if m.get(k) is not None}}
    return MixerSpec(**sizes, img_size=cfg.data.img_size, in_chans=cfg.data.channels, num_classes=cfg.data.num_classes)


def images_seen(name: str, cfg: DictConfig) -> int | None:
    """Training images of the whole run: steps x batch, or epochs x the (fraction of the) training set."""
    if _get(cfg, "trainer.steps"):
        return cfg.trainer.steps * cfg.data.global_batch
    size = train_size(name, cfg)
    if size is None:
        return None
    return round(cfg.trainer.epochs * size * (_get(cfg, "data.train_fraction") or 1))


def train_size(name: str, cfg: DictConfig) -> int | None:
    """The training set's size: the config's, the bundled demo's, or the data set's nominal size."""
    if _get(cfg, "data.train_size"):
        return cfg.data.train_size
    if cfg.data.source == "demo":
        return len(demo_arrays("train")[1])
    return NOMINAL_TRAIN_SIZES.get(recipe_choice(name, "data"))


def train_rates(runs: Path) -> dict[tuple[str, int], tuple[float, str]]:
    """(benchmark model, resolution) -> (training img/s per device, basis), from the latest
    `mixer benchmark` that timed it: its training step, else its inference / 3 (backward = 2 forwards)."""
    rates: dict[tuple[str, int], tuple[float, str]] = {}
    for results in reversed(benchmark_results(runs)):  # oldest first: later runs overwrite
        rows = [r for r in results.get("results", []) if r.get("img_s_per_device")]
        for row in sorted(rows, key=lambda r: r.get("mode") == "train"):  # a training timing wins
            key = (row["model"], row["res"])
            rate = row["img_s_per_device"] if row["mode"] == "train" else row["img_s_per_device"] / 3
            rates[key] = (rate, "benchmark, train" if row["mode"] == "train" else "benchmark, infer / 3")
    return rates


def plan_row(name: str, cfg: DictConfig, throughput: float | None, rates: dict) -> list[str]:
    """recipe, model, images, GFLOP/image, training FLOPs, predicted device-hours, basis, paper core-days."""
    spec, images = spec_of(cfg), images_seen(name, cfg)
    train_flops = None if images is None else 3 * forward_flops(spec) * images  # backward = 2 forwards
    variant = _get(cfg, "model.variant")
    rate = rates.get((f"mixer-{variant_key(variant)}", spec.img_size)) if variant else None
    if throughput is not None and train_flops is not None:
        hours, basis = train_flops / (throughput * 1e12) / 3600, f"--throughput {throughput:g} TFLOP/s"
    elif rate is not None and images is not None:
        hours, basis = images / rate[0] / 3600, f"{rate[1]} ({rate[0]:,.0f} img/s)"
    else:
        hours, basis = None, "-"
    days = (cfg.get("paper") or {}).get("tpu_core_days")
    return [name, variant or "custom", _count(images), f"{forward_flops(spec) / 1e9:.2f}",
            "-" if train_flops is None else f"{train_flops:.2e}", _hours(hours), basis,
            "-" if days is None else f"{days:,g}"]


def _count(images: int | None) -> str:
    return "-" if images is None else f"{images:,}" if images < 10**7 else f"{images:.3g}"


def _hours(hours: float | None) -> str:
    return "-" if hours is None else f"{hours:,.0f}" if hours >= 100 else f"{hours:.3g}"


def print_plan(recipes: dict[str, DictConfig], console: Console, throughput: float | None = None,
               runs: Path = Path("runs")) -> None:
    """Per pre-training recipe: training FLOPs and the device-hours they take at the measured rate."""
    rates = train_rates(runs)
    table = Table(title="Pre-training cost: planned here, beside the paper's TPU-v3 core-days", title_style="bold")
    for col in ("recipe", "model", "images", "GFLOP/img (fwd)", "train FLOPs (3x fwd)", "device-hours", "from",
                "paper core-days"):
        table.add_column(col, justify="left" if col in ("recipe", "model", "from") else "right",
                         style="cyan" if col == "recipe" else None, no_wrap=col == "recipe")
    for name, cfg in recipes.items():
        if config_name_of(name) == "config":
            table.add_row(*plan_row(name, cfg, throughput, rates))
    console.print(table)
    if throughput is None and not rates:
        console.print(f"No `mixer benchmark` result under {runs}/: time the models with [bold]mixer benchmark "
                      "--train models=mixer-b16,mixer-l16[/], or give [bold]--throughput TFLOPS[/] (sustained "
                      "training TFLOP/s per device)")
