"""Config composition, recipes, overrides, config errors and run directories."""
import pytest
from omegaconf import OmegaConf

from mixer_cli.config.compose import compose
from mixer_cli.config.recipes import recipe_names
from mixer_cli.config.run_dirs import load_run_config, make_run_dir, save_config
from mixer_cli.core.errors import UserError


def test_default_is_the_demo_recipe():
    cfg = compose([])
    assert cfg.name == "demo" and cfg.data.source == "demo"
    assert cfg.optim._target_ == "torch.optim.AdamW" and cfg.optim.betas == [0.9, 0.999]
    assert cfg.trainer.grad_clip == 1.0


def test_overrides_reach_every_group():
    cfg = compose(["optim.lr=0.5", "model.num_blocks=2", "trainer.epochs=3", "data.global_batch=64", "loss=sigmoid"])
    assert (cfg.optim.lr, cfg.model.num_blocks, cfg.trainer.epochs, cfg.data.global_batch) == (0.5, 2, 3, 64)
    assert cfg.loss._target_ == "mixer_cli.train.losses.SigmoidCrossEntropy"


def test_model_sizes_come_from_the_data():
    cfg = compose(["data=cifar10", "data.img_size=32"])
    assert (cfg.model.img_size, cfg.model.in_chans, cfg.model.num_classes) == (32, 3, 10)


def test_unknown_recipe_lists_the_recipes():
    with pytest.raises(UserError) as e:
        compose(["recipe=nope"])
    assert str(e.value) == f"unknown recipe 'nope'; recipes: {', '.join(recipe_names())} (see `mixer recipes`)"


def test_unknown_key_lists_the_keys_a_user_can_set():
    with pytest.raises(UserError) as e:
        compose(["optim.lrr=3"])
    assert str(e.value) == (
        "unknown config key 'optim.lrr'; keys under 'optim': lr, betas, weight_decay (or add one with +optim.lrr=...)"
    )


def test_unknown_group_option_lists_the_options():
    with pytest.raises(UserError) as e:
        compose(["optim=zz"])
    assert str(e.value) == "unknown optim 'zz'; choose one of: adamw, sgd"


def test_unknown_fine_tuning_target_lists_the_targets():
    with pytest.raises(UserError) as e:
        compose(["target=nope"], config_name="finetune")
    assert str(e.value).startswith("unknown fine-tuning target 'nope'; targets: imagenet, cifar10, cifar100, pets, ")


def test_missing_value_names_what_to_set():
    with pytest.raises(UserError, match=r"^config value\(s\) .*data\.num_classes, .*data\.task.* must be set, e\.g\. "):
        compose(["recipe=ft_vtab"], config_name="finetune")
    cfg = compose(["recipe=ft_vtab", "data.task=dtd", "data.num_classes=47"], config_name="finetune")
    assert cfg.data.train_path.endswith("/vtab/dtd/train800val200")


def test_run_directories_never_collide(tmp_path):
    cfg = compose([f"run_root={tmp_path}"])
    dirs = {make_run_dir(cfg, "pretrain") for _ in range(3)}  # same second, same name
    assert len(dirs) == 3 and all(d.parent == tmp_path / "pretrain" for d in dirs)


def test_saved_config_round_trips(tmp_path):
    cfg = compose([f"run_root={tmp_path}", "optim.lr=0.25"])
    run = make_run_dir(cfg, "pretrain")
    save_config(cfg, run)
    assert OmegaConf.to_container(load_run_config(run)) == OmegaConf.to_container(cfg)
    assert [p.name for p in run.iterdir()] == ["config.yaml"]


def test_a_folder_without_config_is_not_a_run(tmp_path):
    with pytest.raises(UserError) as e:
        load_run_config(tmp_path)
    assert str(e.value) == f"{tmp_path} is not a run directory (no config.yaml); pass the folder of an earlier run"
