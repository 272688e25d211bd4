"""Recipes: every recipe's composed config against the paper's values (written out here, not read
from the recipes), every recipe composed and validated, and representative recipes run end to end
for 2 optimiser steps on shards (the `shards` fixture)."""
import json
from functools import cache
from pathlib import Path
from typing import NamedTuple

import pytest
from omegaconf import OmegaConf
from typer.testing import CliRunner

from mixer_cli.cli import app
from mixer_cli.commands.finetune import finetune
from mixer_cli.commands.pretrain import pretrain
from mixer_cli.commands.shuffle import run_experiment
from mixer_cli.config.compose import compose
from mixer_cli.config.recipes import config_name_of, recipe_names
from mixer_cli.core.devices import torch_threads
from mixer_cli.models import load_mixer

# ------------------------------------------------------------------------------------------------
# The paper's values


class Pretraining(NamedTuple):
    """A row of Table 4 (Appendix B), with the loss the authors' code trains it with."""

    variant: str
    data: str
    epochs: int
    lr: float
    wd: float
    randaug: int  # RandAugment magnitude m; 0 = none
    mixup: float  # mixup p; 0 = none
    dropout: float
    stoch_depth: float
    loss: str  # sigmoid: JFT-300M is multi-label; ImageNet as big_vision's configs/mlp_mixer_i1k.py


TABLE4 = {
    "i1k_b16": Pretraining("B/16", "imagenet", 300, 0.001, 0.1, 15, 0.5, 0.0, 0.1, "sigmoid"),
    "i1k_l16": Pretraining("L/16", "imagenet", 300, 0.001, 0.1, 15, 0.5, 0.0, 0.1, "sigmoid"),
    "i21k_b16": Pretraining("B/16", "imagenet21k", 300, 0.001, 0.1, 10, 0.2, 0.0, 0.1, "sigmoid"),
    "i21k_l16": Pretraining("L/16", "imagenet21k", 300, 0.001, 0.1, 20, 0.5, 0.0, 0.1, "sigmoid"),
    "jft_s32": Pretraining("S/32", "jft300m", 5, 0.003, 0.03, 0, 0.0, 0.0, 0.0, "sigmoid"),
    "jft_s16": Pretraining("S/16", "jft300m", 5, 0.003, 0.03, 0, 0.0, 0.0, 0.0, "sigmoid"),
    "jft_b32": Pretraining("B/32", "jft300m", 7, 0.003, 0.03, 0, 0.0, 0.0, 0.0, "sigmoid"),
    "jft_b16": Pretraining("B/16", "jft300m", 7, 0.003, 0.03, 0, 0.0, 0.0, 0.0, "sigmoid"),
    "jft_l32": Pretraining("L/32", "jft300m", 7, 0.001, 0.03, 0, 0.0, 0.0, 0.0, "sigmoid"),
    "jft_l16": Pretraining("L/16", "jft300m", 7, 0.001, 0.03, 0, 0.0, 0.0, 0.0, "sigmoid"),
    "jft_l16_14ep": Pretraining("L/16", "jft300m", 14, 0.001, 0.03, 0, 0.0, 0.0, 0.0, "sigmoid"),
    "jft_h14": Pretraining("H/14", "jft300m", 14, 0.001, 0.03, 0, 0.0, 0.0, 0.0, "sigmoid"),
}
NUM_CLASSES = {"imagenet": 1000, "imagenet21k": 21843, "jft300m": 18291}
# big_vision's configs/mlp_mixer_i1k.py trains on train[:99%] and reports a minival on the rest
DEV_FRACTION = {"imagenet": 0.01, "imagenet21k": 0.0, "jft300m": 0.0}

# Table 3, Mixer rows: ImNet top-1, ReaL top-1, Avg. 5, img/s/core, TPU-v3 core-days (0.01k = 10).
TABLE3 = {
    "i1k_b16": (76.44, 82.36, 88.33, 1384, 10), "i1k_l16": (71.76, 77.08, 87.25, 419, 40),
    "i21k_b16": (80.64, 85.80, 92.50, 1384, 150), "i21k_l16": (82.89, 87.54, 93.63, 419, 410),
    "jft_s32": (68.70, 75.83, 87.13, 11489, 10), "jft_b32": (75.53, 81.94, 90.99, 4208, 50),
    "jft_s16": (73.83, 80.60, 89.50, 3994, 30), "jft_b16": (80.00, 85.56, 92.60, 1384, 80),
    "jft_l32": (80.67, 85.62, 93.24, 1314, 120), "jft_l16": (84.05, 88.14, 94.51, 419, 230),
    "jft_l16_14ep": (84.82, 88.48, 94.77, 419, 450), "jft_h14": (86.32, 89.14, 95.49, 194, 1010),
    "ft_i21k_l16_448": (83.91, 87.75, 93.86, 105, 410), "ft_jft_l16_448": (86.78, 89.72, 95.13, 105, 450),
}
# Table 2: ImNet top-1, ReaL top-1, Avg. 5, VTAB-1k, img/s/core, core-days.
TABLE2 = {"ft_i21k_l16_448": (84.15, 87.86, 93.91, 74.95, 105, 410),
          "ft_jft_h14_448": (87.94, 90.18, 95.71, 75.33, 40, 1010)}


class Target(NamedTuple):
    """A row of the ViT paper's fine-tuning table, which the MLP-Mixer paper follows."""

    steps: int
    lr_grid: list[float]
    dev_fraction: float  # held out of train to pick the lr: vit_jax train[98%:], ImageNet [99%:]; big_vision's
    # transfer configs Pets and Flowers train[90%:]; VTAB 200 of 1,000
    warmup_steps: int | None  # vit_jax's default 500; big_vision's Pets/Flowers configs 100; None: no source


FINE_TUNE_TARGETS = {
    "imagenet": Target(20000, [0.003, 0.01, 0.03, 0.06], 0.01, 500),
    "cifar10": Target(10000, [0.001, 0.003, 0.01, 0.03], 0.02, 500),
    "cifar100": Target(10000, [0.001, 0.003, 0.01, 0.03], 0.02, 500),
    "pets": Target(500, [0.001, 0.003, 0.01, 0.03], 0.1, 100),
    "flowers102": Target(500, [0.001, 0.003, 0.01, 0.03], 0.1, 100),
    "vtab": Target(2500, [0.01], 0.2, None),
}
# recipe: (target, resolution, the Mixer it fine-tunes); Table 2 fine-tunes at 448.
FINE_TUNES = {
    "ft_imagenet": ("imagenet", 224, None), "ft_cifar10": ("cifar10", 224, None),
    "ft_cifar100": ("cifar100", 224, None), "ft_pets": ("pets", 224, None),
    "ft_flowers102": ("flowers102", 224, None), "ft_vtab": ("vtab", 224, None),
    "ft_i21k_l16_448": ("imagenet", 448, "L/16"), "ft_jft_l16_448": ("imagenet", 448, "L/16"),
    "ft_jft_h14_448": ("imagenet", 448, "H/14"),
}

# Figure 4 (Sec. 3.4): both models pre-trained on JFT-300M as Sec. 3 says (Table 4's B row: 7 epochs,
# lr 0.003, wd 0.03, Inception crop + flip only), 5-shot linear probes on ImageNet.
FIGURE4 = "shuffle_b16_r50"

# Sec. 3.3: JFT-300M subsets of 3/10/30/100% for 233/70/23/7 epochs (the same number of steps), each
# model otherwise as its Table 4 JFT row: recipe -> that row's recipe.
DATA_SIZE_EPOCHS = {0.03: 233, 0.1: 70, 0.3: 23, 1.0: 7}
DATA_SIZE = {"jft_data_size_b32": "jft_b32", "jft_data_size_l32": "jft_l32", "jft_data_size_l16": "jft_l16"}

DEMOS = {"demo", "ft_demo", "shuffle_demo"}  # not paper rows: the bundled demo


@cache
def composed(name: str):
    """The recipe's config as its command composes it, unresolved (data paths may need $MIXER_DATA)."""
    return compose([f"recipe={name}"], config_name=config_name_of(name), resolve=False)


def data_set(cfg) -> str:
    """The data set a config reads: the folder its root names under $MIXER_DATA."""
    return OmegaConf.to_container(cfg.data)["root"].split("}/", 1)[1].split("/")[0]


def test_every_recipe_is_checked_against_the_paper():
    assert set(recipe_names()) == set(TABLE4) | set(FINE_TUNES) | {FIGURE4} | set(DATA_SIZE) | DEMOS


def check_pretraining_setup(cfg) -> None:
    """Sec. 3 / Appendix B for every pre-training: 224, batch 4096, Adam (0.9, 0.999) with decoupled
    decay, 10k linear warmup then linear decay, clipping at global norm 1, Inception crop + flip."""
    assert (cfg.data.img_size, cfg.data.global_batch, cfg.trainer.grad_clip) == (224, 4096, 1.0)
    assert (cfg.optim._target_, list(cfg.optim.betas)) == ("torch.optim.AdamW", [0.9, 0.999])
    assert (cfg.sched.warmup_steps, cfg.sched.decay) == (10000, "linear")
    assert cfg.aug.inception_crop and cfg.aug.hflip
    assert (cfg.aug.eval_crop_mode, cfg.aug.eval_crop_pct) == ("center", 0.875)  # big_vision: resize 256, crop 224
    assert cfg.trainer.steps is None


def check_row(cfg, row: Pretraining) -> None:
    assert cfg.model.variant == row.variant
    assert data_set(cfg) == row.data and cfg.data.num_classes == NUM_CLASSES[row.data]
    assert cfg.data.dev_fraction == DEV_FRACTION[row.data]
    assert (cfg.trainer.epochs, cfg.optim.lr, cfg.optim.weight_decay) == (row.epochs, row.lr, row.wd)
    assert (cfg.aug.randaug_magnitude, cfg.aug.mixup) == (row.randaug, row.mixup)
    assert not row.randaug or cfg.aug.randaug_layers == 2
    assert (cfg.model.dropout, cfg.model.drop_path, cfg.model.drop_path_rescale) == (row.dropout, row.stoch_depth,
                                                                                     False)
    assert cfg.loss._target_ == f"mixer_cli.train.losses.{row.loss.capitalize()}CrossEntropy"


@pytest.mark.parametrize("name", list(TABLE4))
def test_pretraining_recipes_follow_table4(name):
    cfg = composed(name)
    check_pretraining_setup(cfg)
    check_row(cfg, TABLE4[name])
    paper = cfg.paper
    assert (paper.imagenet_top1, paper.real_top1, paper.avg5, paper.throughput, paper.tpu_core_days) == TABLE3[name]


@pytest.mark.parametrize("name", list(FINE_TUNES))
def test_fine_tuning_recipes_follow_the_vit_fine_tuning_table(name):
    cfg = composed(name)
    target_name, resolution, variant = FINE_TUNES[name]
    target = FINE_TUNE_TARGETS[target_name]
    assert cfg.target == target_name and data_set(cfg) == target_name
    assert (cfg.trainer.steps, list(cfg.targets[target_name].lr_grid), cfg.data.dev_fraction) == (
        target.steps, target.lr_grid, target.dev_fraction)
    assert cfg.optim.lr in target.lr_grid
    assert target.warmup_steps is None or cfg.sched.warmup_steps == target.warmup_steps
    assert (cfg.data.img_size, cfg.model.variant) == (resolution, variant)
    # Sec. 3: momentum SGD, no weight decay, cosine with linear warmup, clip 1, batch 512
    assert (cfg.optim._target_, cfg.optim.momentum, cfg.optim.weight_decay) == ("torch.optim.SGD", 0.9, 0.0)
    assert (cfg.sched.decay, cfg.trainer.grad_clip, cfg.data.global_batch) == ("cosine", 1.0, 512)
    assert cfg.aug.inception_crop and cfg.aug.hflip and not cfg.aug.randaug_magnitude and not cfg.aug.mixup
    assert (cfg.aug.eval_crop_mode, cfg.aug.eval_crop_pct) == ("squash", 1.0)  # vit_jax: resize to the resolution
    assert cfg.loss._target_ == "mixer_cli.train.losses.SoftmaxCrossEntropy"


def test_vtab_fine_tunes_at_one_lr():
    assert composed("ft_vtab").optim.lr == 0.01


@pytest.mark.parametrize("name", ["ft_i21k_l16_448", "ft_jft_l16_448", "ft_jft_h14_448"])
def test_448_rows_carry_tables_2_and_3(name):
    paper = composed(name).paper
    assert paper.table == (3 if name in TABLE3 else 2)
    if name in TABLE3:
        assert (paper.imagenet_top1, paper.real_top1, paper.avg5, paper.throughput, paper.tpu_core_days) == (
            TABLE3[name])
    if name in TABLE2:
        row = paper.get("table2", paper)  # a Table 3 row keeps its Table 2 twin in a sub-block
        assert (row.imagenet_top1, row.real_top1, row.avg5, row.vtab1k, paper.throughput, paper.tpu_core_days) == (
            TABLE2[name])


def test_figure4_recipe_pretrains_both_models_on_jft_and_probes_imagenet():
    cfg = composed(FIGURE4)
    check_pretraining_setup(cfg)
    check_row(cfg, TABLE4["jft_b16"])
    assert cfg.resnet.model_name == "resnetv2_50x1_bit"  # BiT's ResNet50x1
    assert list(cfg.shuffle.models) == ["mixer", "resnet"]
    assert list(cfg.shuffle.pipelines) == ["original", "patch_pixel", "global_pixel"]
    assert (cfg.fewshot.data, cfg.fewshot.shots) == ("imagenet", 5)
    assert cfg.paper.mixer_global_pixel_drop == 0.45 and cfg.paper.resnet_global_pixel_drop == 0.75


@pytest.mark.parametrize("name", list(DATA_SIZE))
def test_data_size_recipes_cover_every_subset_with_the_same_steps(name):
    """Each `subset=` choice of the recipe: its fraction of JFT-300M and its epochs (Sec. 3.3)."""
    lengths = {}
    for subset in composed(name).subsets:
        cfg = compose([f"recipe={name}", f"subset={subset}"], resolve=False)
        check_pretraining_setup(cfg)
        check_row(cfg, TABLE4[DATA_SIZE[name]]._replace(epochs=cfg.trainer.epochs))
        lengths[cfg.data.train_fraction] = cfg.trainer.epochs
    assert lengths == DATA_SIZE_EPOCHS


def test_recipes_command_lists_the_paper_numbers():
    r = CliRunner().invoke(app, ["recipes"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    row = next(line for line in r.output.splitlines() if "jft_h14 " in line)
    assert all(cell in row for cell in ("H/14", "jft300m", "224", "14 epochs", "86.32", "194"))
    row = next(line for line in r.output.splitlines() if "ft_jft_h14_448" in line)
    assert "448" in row and "87.94 (T2)" in row and " 40 " in row


def test_recipes_command_shows_one_resolved():
    r = CliRunner().invoke(app, ["recipes", "i21k_b16"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "randaug_magnitude: 10" in r.output and "variant: B/16" in r.output and "imagenet_top1: 80.64" in r.output
    assert "${" not in r.output  # resolved
    r = CliRunner().invoke(app, ["recipes", "nope"])
    assert r.exit_code == 2 and r.output.startswith("error: unknown recipe 'nope'; recipes: ")


# ------------------------------------------------------------------------------------------------
# Every recipe composes and validates; representatives train 2 optimiser steps, a tiny model

# What a recipe cannot set itself: the checkpoint a fine-tuning starts from, the task of a suite.
REQUIRED = {"finetune": ["checkpoint=last.ckpt"], "config": [], "shuffle": []}


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_composes_and_validates(name):
    task = ["data.task=tiny", "data.num_classes=4"] if OmegaConf.is_missing(composed(name).data, "task") else []
    cfg = compose([f"recipe={name}", *REQUIRED[config_name_of(name)], *task], config_name_of(name))
    assert cfg.name == name and not OmegaConf.missing_keys(cfg)


# Training covers what composing cannot: one recipe per code path a run takes. Pre-training: the demo
# (softmax, demo digits) and i1k_b16 (sigmoid, shards, RandAugment + mixup; no recipe pre-trains on
# shards with softmax); fine-tuning: ft_demo (demo digits), ft_i21k_l16_448 (shards at twice the
# pre-training resolution: the model grows) and ft_vtab (a suite of tasks); both shuffle recipes (the
# demo's small ResNet, the paper's BiT ResNet). The other recipes differ from these in values only.
TRAINED = ["demo", "i1k_b16", "ft_demo", "ft_i21k_l16_448", "ft_vtab", "shuffle_demo", "shuffle_b16_r50"]
DEMO_IMG = 28  # the demo digits: 7 x 7 patches of 4 px
RUN = ["trainer=default", "trainer.steps=2", "data.num_workers=0"]
TINY_RESNET = {  # the recipe's ResNet family, narrow enough to train in a blink
    "small": ["resnet.channels=[8,16,16,16]", "resnet.stem_width=8"],
    "resnetv2_50x1_bit": ["+resnet.channels=[128,128,128,128]", "+resnet.stem_chs=32"],  # GroupNorm: 32 groups
}


def test_trained_recipes_are_recipes():
    assert set(TRAINED) <= set(recipe_names())


@pytest.fixture(scope="session")
def checkpoints(shards, tiny_mixer, write_checkpoint):
    """Tiny pre-trained Mixers: (channels, resolution) -> checkpoint path."""
    shapes = {(3, shards.img_size): 8, (3, shards.img_size // 2): 8, (1, DEMO_IMG): 4}  # -> patch size
    return {(c, s): write_checkpoint(tiny_mixer(num_classes=7, img_size=s, in_chans=c, patch_size=p, trained=True))
            for (c, s), p in shapes.items()}


def data_overrides(cfg, shard_data) -> list[str]:
    if cfg.data.source == "demo":  # batches of 64: the 1,000 test digits in 16 evaluation batches, not 125
        return ["data.global_batch=64"]
    task = ["data.task=tiny"] if OmegaConf.is_missing(cfg.data, "task") else []
    return [*shard_data, "data.global_batch=8", *task]


def checkpoint_for(cfg, checkpoints, shards):
    """A checkpoint at the resolution the recipe's model was pre-trained at, in tiny: a 448 recipe
    fine-tunes a 224 model, so here a 16 px model grows to 32 px by Appendix C."""
    if cfg.data.source == "demo":
        return checkpoints[(1, DEMO_IMG)]
    return checkpoints[(3, shards.img_size * 224 // cfg.data.img_size)]


def run_recipe(name: str, tmp_path, shards, shard_data, checkpoints, tiny_run, cpu_run):
    """Run the recipe with its command's function; returns (results, the checkpoint it started from)."""
    cfg = composed(name)
    common = [f"recipe={name}", *RUN, *data_overrides(cfg, shard_data), f"run_root={tmp_path}"]
    patch = [f"model.patch_size={4 if cfg.data.source == 'demo' else 8}"]
    if config_name_of(name) == "finetune":
        start = checkpoint_for(cfg, checkpoints, shards)
        return finetune(compose([*common, *cpu_run, "model.variant=null", f"checkpoint={start}"], "finetune"),
                        False), start
    if config_name_of(name) == "shuffle":
        probe = ["fewshot.every_n_steps=1", "fewshot.shots=1", "fewshot.seeds=1", "fewshot.data=null",
                 "shuffle.pipelines=[original]", "shuffle.progress=false"]
        resnet = TINY_RESNET[cfg.resnet.get("model_name", "small")]
        return run_experiment(compose([*common, *tiny_run, *patch, *probe, *resnet], "shuffle")), None
    return pretrain(compose([*common, *tiny_run, *patch]), progress=False), None


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy machine their waiting costs 2-4x."""
    with torch_threads(1):
        yield


@pytest.mark.parametrize("name", TRAINED)
def test_representative_recipes_run_two_steps(name, tmp_path, shards, shard_data, checkpoints, tiny_run, cpu_run,
                                              one_thread):
    results, start = run_recipe(name, tmp_path, shards, shard_data, checkpoints, tiny_run, cpu_run)
    demo = composed(name).data.source == "demo"
    if config_name_of(name) == "shuffle":
        assert [(r["model"], r["pipeline"], r["steps"]) for r in results] == [("mixer", "original", 2),
                                                                               ("resnet", "original", 2)]
        return
    eval_size = 1000 if demo else shards.classes * shards.test_per_class  # exact and unpadded
    assert (results["name"], results["steps"], results["num_samples"]) == (name, 2, eval_size)
    # a held-out dev split (i1k_*: big_vision's 1% minival; fine-tuning: the lr pick) is reported beside test
    assert ("dev_top1" in results) == bool(composed(name).data.dev_fraction)
    run = Path(results["run_dir"])
    assert run.parent == tmp_path / results["command"]
    assert json.loads((run / "results.json").read_text())["top1"] == results["top1"]
    if start is not None:  # the fine-tuned model: a new head for the target, at the target's resolution
        tuned = load_mixer(run / "last.ckpt")
        assert results["from"] == str(start)
        assert (tuned.spec.num_classes, tuned.spec.img_size) == ((10, DEMO_IMG) if demo else
                                                                 (shards.classes, shards.img_size))
