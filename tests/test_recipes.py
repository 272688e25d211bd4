"""Recipes: one per Mixer row of Tables 2-3 and per fine-tuning target, with the paper's numbers."""
import pytest
from typer.testing import CliRunner

from mixer_cli.cli import app
from mixer_cli.config import compose, recipe_names
from mixer_cli.recipes import config_name_of, load_recipe

# Table 3, Mixer rows at 224 (ImNet top-1, ReaL, Avg. 5, img/s/core), as printed in the paper.
TABLE3 = {
    "i1k_b16": (76.44, 82.36, 88.33, 1384), "i1k_l16": (71.76, 77.08, 87.25, 419),
    "i21k_b16": (80.64, 85.80, 92.50, 1384), "i21k_l16": (82.89, 87.54, 93.63, 419),
    "jft_s32": (68.70, 75.83, 87.13, 11489), "jft_b32": (75.53, 81.94, 90.99, 4208),
    "jft_s16": (73.83, 80.60, 89.50, 3994), "jft_b16": (80.00, 85.56, 92.60, 1384),
    "jft_l32": (80.67, 85.62, 93.24, 1314), "jft_l16": (84.05, 88.14, 94.51, 419),
    "jft_l16_14ep": (84.82, 88.48, 94.77, 419), "jft_h14": (86.32, 89.14, 95.49, 194),
}
# The 448 rows: Table 3 (i21k L/16, JFT L/16 14 ep) and Table 2 (with VTAB-1k).
ROWS_448 = {
    "ft_i21k_l16_448": ("L/16", 83.91, 87.75, 93.86, None, 105),
    "ft_jft_l16_448": ("L/16", 86.78, 89.72, 95.13, None, 105),
    "ft_i21k_l16_448_table2": ("L/16", 84.15, 87.86, 93.91, 74.95, 105),
    "ft_jft_h14_448_table2": ("H/14", 87.94, 90.18, 95.71, 75.33, 40),
}
# Table 4 (Appendix B): variant, data, epochs, lr, wd, RandAugment m, mixup p, stochastic depth.
TABLE4 = {
    "i1k_b16": ("B/16", "imagenet", 300, 0.001, 0.1, 15, 0.5, 0.1),
    "i1k_l16": ("L/16", "imagenet", 300, 0.001, 0.1, 15, 0.5, 0.1),
    "i21k_b16": ("B/16", "imagenet21k", 300, 0.001, 0.1, 10, 0.2, 0.1),
    "i21k_l16": ("L/16", "imagenet21k", 300, 0.001, 0.1, 20, 0.5, 0.1),
    "jft_s32": ("S/32", "jft300m", 5, 0.003, 0.03, 0, 0.0, 0.0),
    "jft_b32": ("B/32", "jft300m", 7, 0.003, 0.03, 0, 0.0, 0.0),
    "jft_s16": ("S/16", "jft300m", 5, 0.003, 0.03, 0, 0.0, 0.0),
    "jft_b16": ("B/16", "jft300m", 7, 0.003, 0.03, 0, 0.0, 0.0),
    "jft_l32": ("L/32", "jft300m", 7, 0.001, 0.03, 0, 0.0, 0.0),
    "jft_l16": ("L/16", "jft300m", 7, 0.001, 0.03, 0, 0.0, 0.0),
    "jft_l16_14ep": ("L/16", "jft300m", 14, 0.001, 0.03, 0, 0.0, 0.0),
    "jft_h14": ("H/14", "jft300m", 14, 0.001, 0.03, 0, 0.0, 0.0),
}
# Fine-tuning (Appendix C): steps and lr grid per target.
FINETUNE = {
    "ft_imagenet": (20000, [0.003, 0.01, 0.03, 0.06]), "ft_cifar10": (10000, [0.003, 0.01, 0.03, 0.06]),
    "ft_cifar100": (10000, [0.003, 0.01, 0.03, 0.06]), "ft_pets": (500, [0.003, 0.01, 0.03, 0.06]),
    "ft_flowers102": (500, [0.003, 0.01, 0.03, 0.06]), "ft_vtab": (2500, [0.003, 0.01, 0.03]),
}


def test_every_row_and_target_has_a_recipe():
    assert set(TABLE3) | set(ROWS_448) | set(FINETUNE) <= set(recipe_names())


@pytest.mark.parametrize("name", list(TABLE3))
def test_pretraining_recipes_follow_table4_and_carry_table3(name):
    cfg = load_recipe(name)
    variant, data, epochs, lr, wd, m, p, sd = TABLE4[name]
    assert cfg.model.variant == variant and cfg.data.img_size == 224 and cfg.data.global_batch == 4096
    assert cfg.data.num_classes == {"imagenet": 1000, "imagenet21k": 21843, "jft300m": 18291}[data]
    assert (cfg.trainer.epochs, cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == (epochs, "adamw", lr, wd)
    assert (cfg.aug.randaug_magnitude, cfg.aug.mixup, cfg.model.drop_path, cfg.model.dropout) == (m, p, sd, 0.0)
    assert (cfg.sched.name, cfg.sched.warmup_steps, cfg.trainer.grad_clip) == ("warmup_linear", 10000, 1.0)
    assert cfg.aug.inception_crop and cfg.aug.hflip
    paper = cfg.paper
    assert (paper.imagenet_top1, paper.real_top1, paper.avg5, paper.throughput) == TABLE3[name]


@pytest.mark.parametrize("name", list(ROWS_448))
def test_448_rows_fine_tune_at_448(name):
    cfg = load_recipe(name)
    variant, top1, real, avg5, vtab, ips = ROWS_448[name]
    assert (cfg.model.variant, cfg.data.img_size, cfg.aug.eval_resize, cfg.trainer.steps) == (variant, 448, 512, 20000)
    paper = cfg.paper
    assert (paper.imagenet_top1, paper.real_top1, paper.avg5, paper.throughput) == (top1, real, avg5, ips)
    assert cfg.paper.get("vtab1k") == vtab


@pytest.mark.parametrize("name", list(FINETUNE) + list(ROWS_448))
def test_fine_tuning_recipes_follow_appendix_c(name):
    cfg = load_recipe(name)
    steps, grid = FINETUNE.get(name, (20000, [0.003, 0.01, 0.03, 0.06]))
    assert (cfg.optim.name, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 0.9, 0.0)
    assert (cfg.sched.name, cfg.trainer.grad_clip, cfg.data.global_batch) == ("warmup_cosine", 1.0, 512)
    assert cfg.trainer.steps == steps and list(cfg.paper.lr_grid) == grid and cfg.optim.lr in grid
    assert not cfg.aug.randaug_magnitude and not cfg.aug.mixup


def test_every_recipe_composes_with_its_command():
    for name in recipe_names():
        cfg = load_recipe(name)
        assert cfg.name == name, name
        assert config_name_of(name) == ("finetune" if name.startswith("ft_") else "shuffle" if name.startswith(
            "shuffle_") else "config")


def test_missing_data_path_is_a_clear_error():
    with pytest.raises(ValueError, match=r"^config value\(s\) .*data.num_classes, .*data.task.* must be set"):
        compose(["recipe=ft_vtab"], config_name="finetune")


def test_recipes_command_lists_the_paper_numbers():
    r = CliRunner().invoke(app, ["recipes"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    row = next(line for line in r.output.splitlines() if "jft_h14 " in line)
    assert all(cell in row for cell in ("H/14", "jft300m", "224", "14 epochs", "86.32", "194"))
    row = next(line for line in r.output.splitlines() if "ft_jft_h14_448_table2" in line)
    assert "448" in row and "87.94 (T2)" in row and " 40 " in row


def test_recipes_command_shows_one_resolved():
    r = CliRunner().invoke(app, ["recipes", "i21k_b16"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "randaug_magnitude: 10" in r.output and "variant: B/16" in r.output and "imagenet_top1: 80.64" in r.output
    assert "${" not in r.output  # resolved
    r = CliRunner().invoke(app, ["recipes", "nope"])
    assert r.exit_code == 2 and r.output.startswith("error: unknown recipe 'nope'; recipes: ")
